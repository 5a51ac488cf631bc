"""1-D regression with a gap in the data: point MLP -> ``bf.bayesify`` -> ELBO fine-tune.

The training inputs lie in two clusters with no data between them. A point network
predicts one curve everywhere; a Bayesian fine-tune should be *more* uncertain in the
gap than on the data. Two conversions of the same point MLP, both with the library
defaults and the same fine-tune (learned observation noise):

- ``bf.bayesify(point, include=["out"])``: Bayesian output layer (the headline);
- ``bf.bayesify(point)``: every layer Bayesian (mean-field over all weights).

The script prints the epistemic standard deviation (the spread of the sampled
predictions) in the gap and on the data, and their ratio, and plots the predictive
mean ± 2 standard deviations (epistemic + learned observation noise).

Run::

    python examples/regression_gap.py           # 5 seeds; writes out/regression_gap.png (seed 0)
    python examples/regression_gap.py --fast    # 1 seed, fewer steps (CI)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bayesify as bf

CLUSTERS = ((-3.0, -1.0), (1.0, 3.0))  # training inputs; (-1, 1) is the gap
GAP = (-0.75, 0.75)  # where the gap spread is measured (away from the cluster edges)
NOISE = 0.1


def target(x: Tensor) -> Tensor:
    return torch.sin(1.5 * x) + 0.2 * x


def make_data(n_per_cluster: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    xs = [lo + (hi - lo) * torch.rand(n_per_cluster, 1, generator=gen) for lo, hi in CLUSTERS]
    x = torch.cat(xs)
    return x, target(x) + NOISE * torch.randn(x.shape, generator=gen)


def mlp(width: int = 64) -> nn.Sequential:
    return nn.Sequential(OrderedDict(hidden1=nn.Linear(1, width), act1=nn.ReLU(),
                                     hidden2=nn.Linear(width, width), act2=nn.ReLU(),
                                     out=nn.Linear(width, 1)))


def train_point(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def finetune(point: nn.Module, x: Tensor, y: Tensor, steps: int, samples: int = 8,
             **convert) -> tuple[bf.BayesianModel, bf.ELBOLoss]:
    """``bf.bayesify(point)`` with the library defaults + an ELBO fine-tune with learned noise."""
    bnn = bf.bayesify(point, **convert)
    loss_fn = bf.ELBOLoss("normal", dataset_size=len(x), noise_std="learn")
    # The recipe: means at lr 1e-3; spreads (``*_rho``) and the learned noise (which starts
    # at 1) at 1e-2, so they reach their scale in a few hundred steps.
    named = list(bnn.named_parameters())
    opt = torch.optim.Adam([{"params": [p for n, p in named if not n.endswith("_rho")], "lr": 1e-3},
                            {"params": [p for n, p in named if n.endswith("_rho")], "lr": 1e-2},
                            {"params": loss_fn.parameters(), "lr": 1e-2}])
    bnn.train()
    for _ in range(steps):
        loss = loss_fn(bnn(x, samples=samples), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return bnn.eval(), loss_fn


def spreads(bnn: bf.BayesianModel, x_train: Tensor, samples: int, seed: int) -> dict[str, float]:
    """Mean epistemic std in the gap and on the training inputs."""
    gen = torch.Generator().manual_seed(seed)
    x_gap = torch.linspace(*GAP, 100).unsqueeze(1)
    pred = bf.predict(bnn, torch.cat([x_gap, x_train]), samples=samples, likelihood="normal", generator=gen)
    std = pred.epistemic_variance.sqrt().squeeze(1)
    gap, data = float(std[:100].mean()), float(std[100:].mean())
    return {"gap": gap, "data": data, "ratio": gap / data}


def plot(models: dict[str, tuple[bf.BayesianModel, float]], point: nn.Module, x: Tensor, y: Tensor,
         samples: int, path: str) -> None:
    from matplotlib.figure import Figure

    grid = torch.linspace(-5, 5, 400).unsqueeze(1)
    g = grid.squeeze(1)
    fig = Figure(figsize=(10, 3.5))
    for ax, (name, (bnn, noise_std)) in zip(fig.subplots(1, len(models), sharey=True), models.items()):
        pred = bf.predict(bnn, grid, samples=samples, likelihood="normal", noise_std=noise_std,
                          generator=torch.Generator().manual_seed(1))
        mean = pred.mean.squeeze(1)
        total, epi = pred.variance.sqrt().squeeze(1), pred.epistemic_variance.sqrt().squeeze(1)
        ax.axvspan(*GAP, color="0.92", label="gap (measured)")
        ax.fill_between(g, mean - 2 * total, mean + 2 * total, alpha=0.25, color="C0", label="± 2 std (total)")
        ax.fill_between(g, mean - 2 * epi, mean + 2 * epi, alpha=0.5, color="C0", label="± 2 std (epistemic)")
        ax.plot(g, mean, color="C0", label="bayesify mean")
        with torch.no_grad():
            ax.plot(g, point(grid).squeeze(1), "--", color="C3", label="point MLP")
        ax.plot(g, target(g), ":", color="k", label="truth")
        ax.scatter(x.squeeze(1), y.squeeze(1), s=4, color="k", alpha=0.5)
        ax.set_title(f"Bayesian {name}", fontsize=9)
        ax.set_ylim(-4, 4)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="fewer steps (CI)")
    ap.add_argument("--seeds", type=int, default=5, help="data / network seeds 0..N-1 (--fast: 1)")
    ap.add_argument("--out", default="out")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    seeds = [0] if args.fast else list(range(args.seeds))
    steps, samples = (400, 100) if args.fast else (2000, 500)
    variants = {'include=["out"]': ["out"], "(all layers)": None}
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for seed in seeds:
        torch.manual_seed(seed)
        x, y = make_data(100, torch.Generator().manual_seed(seed))
        point = train_point(mlp(), x, y, 1000 if args.fast else 2000)
        print(f"seed {seed}: point MLP trained ({time.perf_counter() - t:.0f} s)", flush=True)
        models = {}
        for name, include in variants.items():
            torch.manual_seed(seed)
            bnn, loss_fn = finetune(point, x, y, steps, include=include)
            rows[name].append({**spreads(bnn, x, samples, seed), "noise_std": loss_fn.noise_std.item()})
            print(f"seed {seed}: bayesify(point, {name}) fine-tuned ({steps} ELBO steps): gap / data "
                  f"{rows[name][-1]['ratio']:.2f} ({time.perf_counter() - t:.0f} s)", flush=True)
            models[name] = (bnn, rows[name][-1]["noise_std"])
        if seed == seeds[0]:
            os.makedirs(args.out, exist_ok=True)
            path = os.path.join(args.out, "regression_gap.png")
            plot(models, point, x, y, samples, path)

    def cell(name: str, key: str, fmt: str) -> str:
        vals = torch.tensor([r[key] for r in rows[name]], dtype=torch.float64)
        return format(float(vals.mean()), fmt) + ("" if len(vals) == 1 else " ± " + format(float(vals.std()), fmt))

    print(f"1-D regression, data in {CLUSTERS}, gap measured on {GAP}, true noise std {NOISE}; "
          f"{len(seeds)} seed(s), mean ± std")
    print("| bayesify(point, ...) | epistemic std in the gap | on the data | gap / data | learned noise std |")
    print("|---|---|---|---|---|")
    for name in variants:
        print(f"| {name} | {cell(name, 'gap', '.3f')} | {cell(name, 'data', '.3f')} | "
              f"{cell(name, 'ratio', '.2f')} | {cell(name, 'noise_std', '.3f')} |")
    if len(seeds) > 1:
        for name in variants:
            print(f"gap / data per seed, {name}: " + ", ".join(f"{r['ratio']:.2f}" for r in rows[name]))
    print(f"wrote {path} (seed {seeds[0]}; {time.perf_counter() - t:.0f} s)")
    first = {name: rs[0] for name, rs in rows.items()}
    return {"ratio": first['include=["out"]']["ratio"], "ratio_all_layers": first["(all layers)"]["ratio"],
            "noise_std": first['include=["out"]']["noise_std"]}


if __name__ == "__main__":
    main(sys.argv[1:])
