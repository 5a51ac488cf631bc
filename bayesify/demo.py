"""The built-in example behind ``bayesify demo``: scikit-learn digits, point model vs baselines vs bayesify.

One small CNN (with dropout) is pretrained on digits 0-7; then, from that same network:
MC dropout, a deep ensemble (it and more networks pretrained from other seeds),
``bf.bayesify(point)`` fine-tuned with ``bf.optim.IVON``, and ``bf.bayesify(point,
variational="rank1")`` (rank-1 multiplicative factors) fine-tuned with the ELBO and Adam. The table compares in-distribution
fit and calibration and out-of-distribution detection (held-out digits 8/9, noise images).

Library code does not print: :func:`run_demo` writes to the ``rich`` consoles it is given
(the CLI passes its stdout / stderr) and raises :class:`DemoError` for a missing dependency.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

__all__ = ["DemoError", "run_demo", "demo_finetune", "IN_CLASSES"]

IN_CLASSES = 8  # digits 0-7 are in-distribution; 8 and 9 are held out as out-of-distribution inputs


class DemoError(ValueError):
    """The demo cannot run (a missing optional dependency)."""


def _digits(seed: int) -> dict[str, Any]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DemoError("bayesify demo needs scikit-learn: pip install 'bayesify[demo]'") from None
    import torch

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    keep = y < IN_CLASSES
    x_in, y_in = x[keep], y[keep]
    i_train, i_test = train_test_split(range(len(y_in)), test_size=0.4, stratify=y_in.numpy(), random_state=seed)
    gen = torch.Generator().manual_seed(seed)
    return {"x_train": x_in[i_train], "y_train": y_in[i_train], "x_test": x_in[i_test], "y_test": y_in[i_test],
            "x_heldout": x[~keep], "x_noise": torch.rand((300, 1, 8, 8), generator=gen)}


def _cnn() -> Any:
    from torch import nn

    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
                         nn.Dropout(0.25), nn.Linear(64, IN_CLASSES))


def _batches(n_epochs: int, n: int, batch: int, seed: int) -> Iterator[Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, batch):
            yield perm[s:s + batch]


def pretrain(x: Any, y: Any, epochs: int, seed: int) -> Any:
    """The point network: Adam with a cosine decay to 0 (converged even in a short run)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    net = _cnn()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(y) // 64))
    net.train()
    for idx in _batches(epochs, len(y), 64, seed):
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def demo_finetune(point: Any, x: Any, y: Any, epochs: int, samples: int, seed: int,
                  advance: Callable[[], None] = lambda: None, map_control: bool = False,
                  rank1: bool = False) -> Any:
    """The demo's recipe: ``bf.bayesify(point)`` with the defaults, then ``bf.optim.IVON`` on the
    expected NLL (``bf.NLLLoss``: IVON applies the prior itself). ``map_control``: the same loop
    (batches, steps, samples) with zero variance (``variational="pointmass"``) and Adam, which
    separates what the posterior buys from what the extra training does. ``rank1``: the same loop
    with ``variational="rank1"`` and the ELBO (``bf.ELBOLoss``, the factors' KL) under Adam, the
    weights at lr 1e-3 and the factors at 1e-2 (docs/uncertainty.md, the rank-1 section)."""
    import torch

    import bayesify as bf

    torch.manual_seed(seed)
    if map_control and rank1:
        raise ValueError("demo_finetune: map_control and rank1 are exclusive; pass one of them")
    loss_fn: Any = bf.NLLLoss("categorical")
    if map_control:
        bnn = bf.bayesify(point, variational="pointmass")
        opt = torch.optim.Adam(bnn.parameters(), lr=1e-3)
    elif rank1:
        bnn = bf.bayesify(point, variational="rank1")
        opt = torch.optim.Adam(bf.train.param_groups(bnn))  # weights 1e-3, factors 1e-2
        loss_fn = bf.ELBOLoss("categorical", dataset_size=len(y))
    else:
        bnn = bf.bayesify(point)
        opt = bf.optim.IVON(bnn, lr=0.1, ess=len(y))
    bnn.train()
    for idx in _batches(epochs, len(y), 64, seed):
        loss = loss_fn(bnn(x[idx], samples=samples), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        advance()
    return bnn.eval()


def _metrics(data: dict[str, Any], predict: Callable[[Any], Any]) -> dict[str, float]:
    import torch

    from . import metrics as m

    p = {k: predict(data[k]) for k in ("x_test", "x_heldout", "x_noise")}
    h = {k: torch.special.entr(v).sum(-1) for k, v in p.items()}
    probs, labels = p["x_test"], data["y_test"]
    return {"accuracy": m.accuracy(probs, labels), "NLL": m.nll(probs, labels), "ECE": m.ece(probs, labels),
            "Brier": m.brier(probs, labels), "AUROC held-out 8/9": m.auroc(h["x_test"], h["x_heldout"]),
            "AUROC noise": m.auroc(h["x_test"], h["x_noise"])}


def run_demo(fast: bool, seed: int, out: Any, err: Any) -> dict[str, dict[str, float]]:
    """Run the demo; the table goes to ``out``, progress lines to ``err`` (``rich`` consoles)."""
    import torch
    from rich.table import Table

    import bayesify as bf

    start = time.perf_counter()
    torch.set_num_threads(1)  # a tiny network: more threads only add contention
    data = _digits(seed)
    pre_epochs, members, fine_epochs, samples, eval_samples = (15, 3, 6, 2, 20) if fast else (30, 5, 20, 2, 100)
    x, y = data["x_train"], data["y_train"]

    def say(msg: str) -> None:
        err.print(f"[{time.perf_counter() - start:5.1f} s] {msg}", highlight=False)

    say(f"pretraining the point CNN ({pre_epochs} epochs, {len(y)} images of digits 0-{IN_CLASSES - 1})")
    point = pretrain(x, y, pre_epochs, seed)
    results: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        results["point"] = _metrics(data, lambda v: torch.softmax(point(v), -1))

        def dropout(v: Any) -> Any:
            torch.manual_seed(seed)
            point.train()
            p = torch.stack([torch.softmax(point(v), -1) for _ in range(eval_samples)]).mean(0)
            point.eval()
            return p
        results["MC dropout"] = _metrics(data, dropout)
    nets = [point]
    for k in range(1, members):
        say(f"pretraining ensemble member {k + 1}/{members}")
        nets.append(pretrain(x, y, pre_epochs, seed + 1000 * k))
    with torch.no_grad():
        results[f"ensemble ({members})"] = _metrics(
            data, lambda v: torch.stack([torch.softmax(n(v), -1) for n in nets]).mean(0))
    steps = fine_epochs * -(-len(y) // 64)
    say(f"MAP fine-tune (the same loop, zero variance): {steps} steps")
    control = demo_finetune(point, x, y, fine_epochs, samples, seed, map_control=True)
    with torch.no_grad():
        results["MAP fine-tune"] = _metrics(data, lambda v: torch.softmax(control.model(v), -1))
    say(f"bf.bayesify(point) + bf.optim.IVON: {steps} steps x {samples} samples")
    bnn = demo_finetune(point, x, y, fine_epochs, samples, seed)
    gen = torch.Generator().manual_seed(seed)
    results["bayesify + IVON"] = _metrics(
        data, lambda v: bf.predict(bnn, v, samples=eval_samples, likelihood="categorical", generator=gen).probs)
    rank1_samples = 4  # the rank-1 recipe's 4 samples per step (2: NLL .028 vs .021, AUROC .973 vs .981)
    say(f"bf.bayesify(point, variational=\"rank1\") + ELBO/Adam: {steps} steps x {rank1_samples} samples")
    t_rank1 = time.perf_counter()
    rank1 = demo_finetune(point, x, y, fine_epochs, rank1_samples, seed, rank1=True)
    t_rank1 = time.perf_counter() - t_rank1
    gen = torch.Generator().manual_seed(seed)
    results["bayesify rank-1"] = _metrics(
        data, lambda v: bf.predict(rank1, v, samples=eval_samples, likelihood="categorical", generator=gen).probs)
    say("done")

    table = Table(title=f"scikit-learn digits: classes 0-{IN_CLASSES - 1} in-distribution, "
                        f"{len(y)} train / {len(data['y_test'])} test images",
                  caption=f"OOD: held-out digits 8/9 ({len(data['x_heldout'])}) and uniform noise "
                          f"({len(data['x_noise'])}); OOD score: predictive entropy; {eval_samples} samples "
                          "for MC dropout and bayesify; the same pretrained network for every column")
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    better = {"accuracy": max, "NLL": min, "ECE": min, "Brier": min}
    for key in results["point"]:
        arrow = "↑" if better.get(key, max) is max else "↓"
        vals = [r[key] for r in results.values()]
        best = better.get(key, max)(vals)
        table.add_row(f"{key} {arrow}", *[(f"[bold]{v:.3f}[/bold]" if v == best else f"{v:.3f}") for v in vals])
    out.print(table)
    out.print(f"pretrain {pre_epochs} epochs per network; MAP (Adam) and IVON fine-tunes {steps} steps x {samples} "
              f"samples, rank-1 (ELBO, Adam) {steps} steps x {rank1_samples} samples ({t_rank1:.1f} s); "
              f"total {time.perf_counter() - start:.1f} s. Full comparison: benchmarks/quality.py, "
              "docs/uncertainty.md", soft_wrap=True)
    return results
