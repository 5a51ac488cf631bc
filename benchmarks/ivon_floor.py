"""The least an IVON step can cost over the point model's Adam step, from PyTorch's own per-element
primitives, beside what bayesify's IVON step costs: is issue 14's "<= 1.3x at the same batch, one
sample" reachable on this machine?

Variational learning pays per *weight* what the point step pays per *example*. Whatever the
implementation, one IVON step must at least: draw the noise (``normal_``) and the weights
(``mean + std * eps``, one ``addcmul``), form the Hessian estimate ``g * eps / std`` (a multiply
and a divide), average it into ``h`` (one ``lerp_``), turn ``h`` into the spread (``ess (h +
delta)``, ``rsqrt``: an ``add_`` and a ``rsqrt``) and write the spread's parameter
(``rho = log(expm1(std))``). The mean update itself is Adam's (momentum, preconditioned step), so
it is not counted. Each primitive is timed on its own as one pass over a weight-sized float32
tensor (a fused kernel could do better than the sum of passes; PyTorch offers none for these).

    python benchmarks/ivon_floor.py --workloads resnet18,mlp --batch 32 --batch 128 --threads 1

prints, per workload and batch: the point model's Adam step (ms), the minimum IVON excess (ms),
the implied lowest possible ratio, and the ratio bayesify's IVON step reaches in the same run
(``bench.py --optimizer-step``'s measurement, interleaved).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

import bayesify as bf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the workloads and the interleaved IVON-vs-Adam step timing)

#: One pass each over a weight-sized tensor: what an IVON step needs beyond Adam's (module docstring).
MINIMUM = ("normal_", "addcmul", "mul", "div", "lerp_", "add_", "rsqrt", "expm1 + log")


def primitives(n: int, repeats: int) -> dict[str, float]:
    """Seconds per element of each pass, median of ``repeats`` after a warm-up."""
    g = torch.Generator().manual_seed(0)
    a, c = torch.randn(n, generator=g), torch.randn(n, generator=g)
    b = torch.rand(n, generator=g).add_(0.1)
    out = torch.empty(n)
    ops: dict[str, Callable[[], object]] = {
        "normal_": lambda: out.normal_(generator=g),
        "addcmul": lambda: torch.addcmul(a, b, c, out=out),
        "mul": lambda: torch.mul(a, b, out=out),
        "div": lambda: torch.div(a, b, out=out),
        "lerp_": lambda: out.lerp_(a, 0.1),
        "add_": lambda: out.add_(a, alpha=0.1),
        "rsqrt": lambda: torch.rsqrt(b, out=out),
        "expm1 + log": lambda: torch.expm1(b, out=out).log_(),
        "softplus": lambda: torch.nn.functional.softplus(a),
        "sigmoid": lambda: torch.sigmoid(a, out=out),
    }
    res = {}
    for name, fn in ops.items():
        fn()
        times = []
        for _ in range(repeats):
            t = time.process_time()
            fn()
            times.append(time.process_time() - t)
        res[name] = statistics.median(times) / n
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="resnet18,mlp")
    ap.add_argument("--batch", type=int, action="append", default=[])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    bench._clock = bench.CLOCKS["cpu"]
    print(f"# {bench.machine_line(bench.machine_info())}")
    prim = primitives(11_200_000, opts.repeats)
    print("\nper-element cost of one pass (CPU ns, float32, "
          f"{opts.threads} thread(s)):\n")
    print("| pass | ns per weight | in the minimum |\n|---|---:|---|")
    for k, v in prim.items():
        print(f"| {k} | {v * 1e9:.2f} | {'yes' if k in MINIMUM else ''} |")
    per_weight = sum(prim[k] for k in MINIMUM)
    print(f"\nminimum IVON excess over Adam: {per_weight * 1e9:.2f} ns per weight\n")
    print("| workload, batch | Bayesian weights | point + Adam ms | minimum excess ms | lowest possible ratio "
          "| bayesify IVON ratio (same run) |\n|---|---:|---:|---:|---:|---:|")
    for name in opts.workloads.split(","):
        w = bench.WORKLOADS[name]
        for batch in opts.batch or [w.batch]:
            with warnings.catch_warnings():  # IVON's note on the BatchNorm parameters it does not step
                warnings.simplefilter("ignore", UserWarning)
                res = bench.bench_optimizer_step(w, opts.repeats, False, batch)
            point = res["point + Adam"]
            n_bayes = sum(s.mean.numel() for s in bf.bayesify(w.build()).bayesian_sites())
            excess = n_bayes * per_weight
            print(f"| {name}, {batch} | {n_bayes / 1e6:.1f} M | {point * 1e3:.0f} | {excess * 1e3:.0f} | "
                  f"{(point + excess) / point:.2f}x | {res['bayesify + IVON'] / point:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
