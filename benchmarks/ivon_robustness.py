"""How ``bf.optim.IVON``'s results depend on ``ess``, ``lr`` and the prior scale (issue 14).

For each task of ``benchmarks/quality.py`` (``gap``, ``diabetes``, ``digits``) and seed, the
same pretrained network is converted with ``prior=bf.priors.Normal("pretrained", scale)`` and
fine-tuned by ``bf.optim.IVON(lr=lr, ess=k * N)`` with ``bf.NLLLoss`` through quality.py's loop
(2 samples per step, the task's step budget), for every (scale, k, lr) of the grid; each cell is
the mean over seeds of the test metrics of quality.py's sampled predictive (gap / diabetes: test
RMSE and NLL, gap also the epistemic ratio gap / data; digits: ID NLL and shifted NLL). A first
row gives the point model. ``worst`` under each table: the largest RMSE (regression) or ID NLL
(digits) of the grid against the point model's.

Run::

    python benchmarks/ivon_robustness.py --tasks gap --seeds 3 --threads 1
    python benchmarks/ivon_robustness.py --tasks digits --priors 0.03 --ess 1,10,100 --lrs 0.1
    python benchmarks/ivon_robustness.py --clip-radius 3 --hess-floor 0   # IVON keywords for every cell

Results and the commands that produced them: docs/uncertainty.md (the IVON section).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality as Q  # noqa: E402

import bayesify as bf  # noqa: E402

TASKS = {"gap": Q.Gap, "diabetes": Q.Diabetes, "digits": Q.Digits}
#: the metrics shown per task: (key, header)
SHOWN = {"gap": [("rmse", "RMSE"), ("nll", "NLL"), ("ratio", "ratio")],
         "diabetes": [("rmse", "RMSE"), ("nll", "NLL")],
         "digits": [("nll", "ID NLL"), ("shift_nll", "shift NLL"), ("acc", "acc")]}


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def fit_cell(task: Q.Task, net: torch.nn.Module, seed: int, scale: float, k: float, lr: float,
             ivon_kwargs: dict[str, Any]) -> dict[str, float]:
    bnn = task.convert(copy.deepcopy(net), prior=bf.priors.Normal("pretrained", scale))
    loss_fn = bf.NLLLoss(task.likelihood, **Q._nll_kwargs(task))
    opt = bf.optim.IVON(task.trainable(bnn), model=bnn, ess=k * task.dataset_size, lr=lr,
                        **{**task.ivon_kwargs, **ivon_kwargs})
    Q._finetune_loop(task, bnn, loss_fn, opt, 2, seed)
    return task.evaluate(Q._bnn_predictive(task, bnn, seed))


def run(task_name: str, seeds: list[int], scales: list[float], ks: list[float], lrs: list[float],
        ivon_kwargs: dict[str, Any], log=print) -> str:
    task = TASKS[task_name]()
    cells: dict[Any, list[dict[str, float]]] = {}
    for seed in seeds:
        net = task.pretrain(seed)
        cells.setdefault("point", []).append(task.evaluate(Q.point(task, net, seed)))
        for scale, k, lr in itertools.product(scales, ks, lrs):
            t0 = time.perf_counter()
            row = fit_cell(task, net, seed, scale, k, lr, ivon_kwargs)
            cells.setdefault((scale, k, lr), []).append(row)
            log(f"[{task_name}] seed {seed} prior {scale} ess {k}N lr {lr}: "
                + ", ".join(f"{c} {row[c]:.3f}" for c, _ in SHOWN[task_name])
                + f" ({time.perf_counter() - t0:.1f} s)")
    shown = SHOWN[task_name]

    def fmt(rows: list[dict[str, float]], c: str) -> str:
        v = torch.tensor([r[c] for r in rows], dtype=torch.float64)
        if not torch.isfinite(v).all():
            return "nan"
        return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}"

    lines = [f"### {task_name} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}; IVON keywords "
             f"{ivon_kwargs or 'default'})", "",
             "| prior scale | ess | lr | " + " | ".join(h for _, h in shown) + " |",
             "|---|---|---|" + "---|" * len(shown)]
    lines.append("| point model | | | " + " | ".join(fmt(cells["point"], c) for c, _ in shown) + " |")
    for key, rows in cells.items():
        if key == "point":
            continue
        scale, k, lr = key
        lines.append(f"| {scale:g} | {k:g} N | {lr:g} | " + " | ".join(fmt(rows, c) for c, _ in shown) + " |")
    c = shown[0][0]
    means = {key: sum(r[c] for r in rows) / len(rows) for key, rows in cells.items()}
    worst = max((key for key in means if key != "point"), key=lambda key: (math.isnan(means[key]), means[key]))
    lines += ["", f"worst {shown[0][1]}: {means[worst]:.3f} at prior {worst[0]:g}, ess {worst[1]:g} N, lr "
              f"{worst[2]:g} (point model {means['point']:.3f})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="gap,diabetes,digits")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--priors", type=_floats, default=[0.03, 0.3, 1.0], help="prior scales (comma-separated)")
    ap.add_argument("--ess", type=_floats, default=[0.1, 1, 10, 100], help="ess as multiples of the dataset size")
    ap.add_argument("--lrs", type=_floats, default=[0.01, 0.1, 0.5])
    ap.add_argument("--clip-radius", type=float, default=None, help="IVON's clip_radius (default: IVON's own)")
    ap.add_argument("--hess-floor", type=float, default=None, help="IVON's hess_floor (default: IVON's own)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        ap.error(f"unknown task(s) {bad}; choose from {sorted(TASKS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    kw = {k: v for k, v in (("clip_radius", args.clip_radius), ("hess_floor", args.hess_floor)) if v is not None}
    for t in tasks:
        print(run(t, list(range(args.seeds)), args.priors, args.ess, args.lrs, kw), flush=True)
        print(flush=True)


if __name__ == "__main__":
    main()
