"""Calibration and OOD detection on scikit-learn digits: point CNN vs MC dropout vs bayesify.

Protocol (the same split and the same pretrained network for every method):

- in-distribution: digits 0-7 (8x8 images), a fixed stratified 60/40 train/test split;
- shifted test set: the test images translated by a random sub-pixel offset of up to
  0.75 pixel per axis, plus Gaussian pixel noise (std 0.1 on the [0, 1] scale), drawn
  once with a fixed seed;
- out-of-distribution: the held-out classes 8 and 9 (never seen in training), and
  uniform-noise images;
- the pretrained network: a small CNN with dropout (p = 0.25), trained with Adam and a
  cosine learning-rate decay; one per seed, shared by all methods:

  - **point**: the network in eval mode;
  - **MC dropout**: the same network with dropout on at test time, averaged over the samples;
  - **MAP fine-tune** (a control): ``bf.bayesify(point, variational="pointmass")`` run through
    the same fine-tune loop, i.e. the extra training without any weight uncertainty;
  - **bayesify**: ``bf.bayesify(point)`` with the library defaults and the recipe's
    fine-tune (docs/uncertainty.md): ELBO, 20 epochs, Adam at lr 1e-3 for the means and
    1e-2 for the spreads, 4 samples per step.

The OOD score is the predictive entropy (total uncertainty) for every method; the
mutual-information AUROCs of the sampled methods are printed below the table.

Run::

    python examples/digits.py            # 3 seeds, the table in the README
    python examples/digits.py --fast     # 1 seed, fewer epochs (CI)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bayesify as bf

IN_CLASSES = 8  # digits 0-7 in-distribution, 8 and 9 held out


# -- data -------------------------------------------------------------------------------------------
@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_shift: Tensor
    x_heldout: Tensor
    x_noise: Tensor


def shift_images(x: Tensor, max_shift: float, noise: float, gen: torch.Generator) -> Tensor:
    """Translate each image by a random sub-pixel offset of up to ``max_shift`` pixels per axis
    (bilinear, zero fill) and add Gaussian pixel noise of std ``noise``."""
    n, _, h, w = x.shape
    offset = (torch.rand((n, 2), generator=gen) * 2 - 1) * max_shift
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = offset[:, 0] * 2 / w  # affine_grid works in [-1, 1] coordinates
    theta[:, 1, 2] = offset[:, 1] * 2 / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out + noise * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def load_data() -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    keep = y < IN_CLASSES
    x_in, y_in = x[keep], y[keep]
    i_train, i_test = train_test_split(range(len(y_in)), test_size=0.4, stratify=y_in.numpy(), random_state=0)
    gen = torch.Generator().manual_seed(0)
    x_test = x_in[i_test]
    return Data(
        x_train=x_in[i_train], y_train=y_in[i_train], x_test=x_test, y_test=y_in[i_test],
        x_shift=shift_images(x_test, 0.75, 0.1, gen),
        x_heldout=x[~keep],
        x_noise=torch.rand((500, 1, 8, 8), generator=gen),
    )


# -- models -----------------------------------------------------------------------------------------
def cnn(dropout: float = 0.0) -> nn.Sequential:
    drop = [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), *drop,
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(), *drop,
        nn.Linear(64, IN_CLASSES),
    )


def batches(n: int, batch_size: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    for s in range(0, n, batch_size):
        yield perm[s:s + batch_size]


def train_point(model: nn.Module, data: Data, epochs: int, seed: int, lr: float = 3e-3) -> nn.Module:
    """Adam with a cosine learning-rate decay to 0, so the point model is a converged network."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(data.y_train) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        for idx in batches(len(data.y_train), 64, gen):
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def finetune_bayes(point: nn.Module, data: Data, epochs: int, seed: int, lr: float = 1e-3,
                   samples: int = 4, spread_lr: float | None = None, **convert) -> bf.BayesianModel:
    """``bf.bayesify(point)`` (library defaults unless ``convert`` overrides them) + ELBO fine-tune.

    One Adam optimiser over all of the model's parameters (posterior means and spreads);
    ``spread_lr`` optionally gives the spread parameters (``*_rho``) their own step size.
    """
    gen = torch.Generator().manual_seed(seed)
    bnn = bf.bayesify(point, **convert)
    loss_fn = bf.ELBOLoss("categorical", dataset_size=len(data.y_train))
    spreads = [p for n, p in bnn.named_parameters() if n.endswith("_rho")]
    means = [p for n, p in bnn.named_parameters() if not n.endswith("_rho")]
    opt = torch.optim.Adam([{"params": means}, {"params": spreads, "lr": spread_lr or lr}], lr=lr)
    bnn.train()
    for _ in range(epochs):
        for idx in batches(len(data.y_train), 64, gen):
            loss = loss_fn(bnn(data.x_train[idx], samples=samples), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return bnn.eval()


# -- evaluation -------------------------------------------------------------------------------------
def summarise(predict, data: Data) -> dict[str, float]:
    """Metrics of one method; ``predict(x)`` returns (probs, entropy, mutual information or None)."""
    m = bf.metrics
    p_test, h_test, mi_test = predict(data.x_test)
    p_shift, _, _ = predict(data.x_shift)
    _, h_held, mi_held = predict(data.x_heldout)
    _, h_noise, mi_noise = predict(data.x_noise)
    row = {
        "acc": m.accuracy(p_test, data.y_test), "nll": m.nll(p_test, data.y_test),
        "ece": m.ece(p_test, data.y_test), "brier": m.brier(p_test, data.y_test),
        "shift_acc": m.accuracy(p_shift, data.y_test), "shift_nll": m.nll(p_shift, data.y_test),
        "shift_ece": m.ece(p_shift, data.y_test), "shift_brier": m.brier(p_shift, data.y_test),
        "auroc_heldout": m.auroc(h_test, h_held), "auroc_noise": m.auroc(h_test, h_noise),
    }
    if mi_test is not None:
        row["mi_auroc_heldout"] = m.auroc(mi_test, mi_held)
        row["mi_auroc_noise"] = m.auroc(mi_test, mi_noise)
    return row


def point_predictor(model: nn.Module):
    @torch.no_grad()
    def predict(x: Tensor):
        probs = torch.softmax(model.eval()(x), -1)
        return probs, torch.special.entr(probs).sum(-1), None
    return predict


def dropout_predictor(model: nn.Module, samples: int):
    @torch.no_grad()
    def predict(x: Tensor):
        model.train()  # dropout on
        sample_probs = torch.stack([torch.softmax(model(x), -1) for _ in range(samples)])
        model.eval()
        probs = sample_probs.mean(0)
        entropy = torch.special.entr(probs).sum(-1)
        mi = (entropy - torch.special.entr(sample_probs).sum(-1).mean(0)).clamp_min(0)
        return probs, entropy, mi
    return predict


def bayes_predictor(bnn: bf.BayesianModel, samples: int, seed: int):
    def predict(x: Tensor):
        pred = bf.predict(bnn, x, samples=samples, generator=torch.Generator().manual_seed(seed))
        return pred.probs, pred.entropy, pred.mutual_information
    return predict


# -- main -------------------------------------------------------------------------------------------
COLUMNS = [("acc", "acc"), ("nll", "NLL"), ("ece", "ECE"), ("brier", "Brier"),
           ("shift_acc", "shift acc"), ("shift_nll", "shift NLL"), ("shift_ece", "shift ECE"),
           ("auroc_heldout", "AUROC 8/9"), ("auroc_noise", "AUROC noise")]


def run(seeds: list[int], pretrain_epochs: int, finetune_epochs: int, samples: int,
        log=lambda msg: print(msg, flush=True)) -> dict[str, list[dict[str, float]]]:
    data = load_data()
    results: dict[str, list[dict[str, float]]] = {"point": [], "MC dropout": [], "MAP fine-tune": [],
                                                  "bayesify": []}
    for seed in seeds:
        torch.manual_seed(seed)
        log(f"seed {seed}: pre-training the point CNN ({pretrain_epochs} epochs) ...")
        t = time.perf_counter()
        point = train_point(cnn(dropout=0.25), data, pretrain_epochs, seed)
        log(f"seed {seed}: point CNN in {time.perf_counter() - t:.1f} s; ELBO fine-tune ...")
        results["point"].append(summarise(point_predictor(point), data))
        results["MC dropout"].append(summarise(dropout_predictor(point, samples), data))
        torch.manual_seed(seed)
        t = time.perf_counter()
        bnn = finetune_bayes(point, data, finetune_epochs, seed, spread_lr=1e-2)
        log(f"seed {seed}: ELBO fine-tune {finetune_epochs} epochs in {time.perf_counter() - t:.1f} s")
        results["bayesify"].append(summarise(bayes_predictor(bnn, samples, seed), data))
        log(f"seed {seed}: MAP fine-tune (the control) ...")
        torch.manual_seed(seed)
        control = finetune_bayes(point, data, finetune_epochs, seed, samples=1, variational="pointmass")
        results["MAP fine-tune"].append(summarise(point_predictor(control.to_point()), data))
    return results


def table(results: dict[str, list[dict[str, float]]]) -> str:
    def cell(vals: list[float]) -> str:
        t = torch.tensor(vals, dtype=torch.float64)
        return f"{t.mean():.3f}" if len(vals) == 1 else f"{t.mean():.3f} ± {t.std():.3f}"

    lines = ["| method | " + " | ".join(name for _, name in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for method, rows in results.items():
        lines.append(f"| {method} | " + " | ".join(cell([r[k] for r in rows]) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def means(results: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {m: {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} for m, rows in results.items()}


def plot(results: dict[str, list[dict[str, float]]], path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3))
    for ax, (key, name) in zip(fig.subplots(1, 3), [("shift_nll", "shifted NLL (lower is better)"),
                                                     ("shift_ece", "shifted ECE (lower is better)"),
                                                     ("auroc_heldout", "AUROC held-out 8/9 (higher)")]):
        ms = list(results)
        vals = [torch.tensor([r[key] for r in results[m]], dtype=torch.float64) for m in ms]
        ax.bar(range(len(ms)), [v.mean() for v in vals], yerr=[v.std() if len(v) > 1 else 0 for v in vals],
               capsize=3)
        ax.set_xticks(range(len(ms)), [m.replace(" ", "\n") for m in ms])
        if key.startswith("auroc"):
            ax.set_ylim(0.9, 1.0)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="1 seed, fewer epochs (CI)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="out")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [0] if args.fast else list(range(args.seeds))
    pre, fine, samples = (60, 15, 30) if args.fast else (60, 20, 100)
    t = time.perf_counter()
    results = run(seeds, pre, fine, samples)
    print(f"\nscikit-learn digits, {len(seeds)} seed(s), mean ± std; OOD score: predictive entropy")
    print(table(results))
    avg = means(results)
    for method in ("MC dropout", "bayesify"):
        print(f"{method} with mutual information as the OOD score: AUROC 8/9 "
              f"{avg[method]['mi_auroc_heldout']:.3f}, noise {avg[method]['mi_auroc_noise']:.3f}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "digits.png")
    plot(results, path)
    print(f"wrote {path} ({time.perf_counter() - t:.0f} s)")
    return avg


if __name__ == "__main__":
    main(sys.argv[1:])
