"""Oracle sweep: can any single scale of a Gaussian posterior reach MC dropout's shift numbers?

For quality.py's digits task (the same pretrained network per seed, the same sets and metrics),
fit a posterior once per seed, then multiply every posterior standard deviation by ``c`` for each
``c`` of a grid and evaluate the predictive at each:

- **IVON**: quality.py's "IVON" fit (``bf.optim.IVON``, the library defaults), sampled predictive;
- **Laplace diag**: quality.py's post-hoc ``bf.laplace`` pass (all sites, diagonal), the linearised
  predictive it records.

``c`` is chosen here by looking at the *test* metrics (an oracle), so the table bounds what any
single posterior temperature could do; ``bf.calibrate`` chooses ``c`` from the validation split.
``c = 0`` is the posterior means (the point model for Laplace, the fine-tuned means for IVON).

Run::

    python benchmarks/quality_scale_sweep.py --seeds 3 --threads 1
    python benchmarks/quality_scale_sweep.py --posteriors ivon --scales 0,1,4 --seeds 1 --quick
    python benchmarks/quality_scale_sweep.py --posteriors laplace --scales 0.063,0.1,0.16,0.25 --softmax --seeds 3 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

import bayesify as bf
from bayesify.calibrate import DEFAULT_SCALES, _restore, _scale_spreads

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402

IVON_SCALES = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0)
#: Every other value of bf.calibrate's grid (0, then 10 ** (-2 .. 2) in steps of 0.2) up to 1, and 2.5:
#: quality.py's uncalibrated Laplace diag row (c = 1) is already far worse than the point model
#: (NLL .94 vs .01), and larger scales only widen the linearised predictive further.
LAPLACE_SCALES = (0.0, *[c for c in DEFAULT_SCALES[1::2] if c <= 1.0 + 1e-9], 2.5)


def _fit_ivon(task: q.Task, net: torch.nn.Module, seed: int) -> tuple[bf.BayesianModel, bool]:
    return q._train_ivon(task, net, seed), False


def _fit_laplace(task: q.Task, net: torch.nn.Module, seed: int) -> tuple[bf.BayesianModel, bool]:
    bnn = task.convert(net)
    bf.laplace(bnn, q._laplace_data(task), task.likelihood, progress=False,
               generator=torch.Generator().manual_seed(seed))
    return bnn, True


POSTERIORS = {"ivon": ("IVON", _fit_ivon, IVON_SCALES), "laplace": ("Laplace diag", _fit_laplace, LAPLACE_SCALES)}


def sweep(task: q.Task, seeds: list[int], posteriors: list[str], scales: dict[str, tuple[float, ...]],
          softmax: bool = False, log=print) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {}
    for seed in seeds:
        net = task.pretrain(seed)
        for key in posteriors:
            label, fit, _ = POSTERIORS[key]
            t = time.perf_counter()
            bnn, linearized = fit(task, copy.deepcopy(net), seed)
            log(f"[{task.name}] seed {seed} {label}: fitted in {time.perf_counter() - t:.1f} s")
            sites = bnn.bayesian_sites()
            rho0 = {s.qualname: getattr(s.module, f"{s.name}_rho").detach().clone() for s in sites}
            for c in scales[key]:
                _scale_spreads(sites, c)
                tag = ""
                if softmax:  # at this fixed scale, a softmax temperature from the validation split
                    cal = bf.calibrate(bnn, q._heldout(task), task.likelihood, linearized=linearized, posterior=False,
                                       softmax=True, generator=torch.Generator().manual_seed(seed))
                    tag = ", T from val"
                    log(f"[{task.name}] seed {seed} {label}, c = {c:g}: softmax temperature {cal.softmax_temperature:.3g}")
                t = time.perf_counter()
                row = task.evaluate(q._predict_bnn(task, bnn, seed, linearized=linearized))
                row["predict_s"] = time.perf_counter() - t
                _restore(sites, rho0)
                bnn.predictive = {"linearized": linearized} if linearized else {}
                name = f"{label}, c = {c:g}{tag}"
                results.setdefault(name, []).append(row)
                log(f"[{task.name}] seed {seed} {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
    return results


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--posteriors", default="ivon,laplace", help="comma-separated subset of ivon, laplace")
    ap.add_argument("--scales", default=None, help="comma-separated c grid for every posterior "
                    "(default: IVON 0,.5,1,2,3,5,8,12; Laplace 0, every other value of bf.calibrate's grid up to 1, 2.5)")
    ap.add_argument("--softmax", action="store_true", help="at each scale, also choose a softmax temperature "
                    "on the validation split (bf.calibrate(posterior=False, softmax=True))")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    ap.add_argument("--quick", action="store_true", help="quality.py's smoke-run budget")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    posteriors = [p.strip() for p in args.posteriors.split(",") if p.strip()]
    for p in posteriors:
        if p not in POSTERIORS:
            ap.error(f"unknown posterior {p!r}; choose from {', '.join(POSTERIORS)}")
    scales = {k: (_floats(args.scales) if args.scales else grid) for k, (_, _, grid) in POSTERIORS.items()}
    task = q.Digits(quick=args.quick)
    t = time.perf_counter()
    res = sweep(task, list(range(args.seeds)), posteriors, scales, softmax=args.softmax)
    for rows in res.values():
        for r in rows:
            r["fit_s"] = float("nan")  # quality.table's column; the fit is shared by a posterior's rows
    print(f"\n### digits, posterior std x c ({args.seeds} seed(s), mean ± std; {time.perf_counter() - t:.0f} s)\n")
    print(q.table(task, res), flush=True)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
