"""Why a rank-1 posterior's noise-image AUROC falls short of the 5-ensemble's (issue 14): per seed,
the digits task of ``benchmarks/quality.py``, entropy vs mutual information, per-sample confidence.

For the point network, MC dropout, the 5-ensemble and rank-1 fits (``quality._train_rank1``: the
defaults, the factor means at lr 1e-3, 4 components, 4 components started 0.5 apart) it prints:
the noise-vs-test AUROC by predictive entropy (quality.py's score) and by mutual information;
on the noise images the mean predictive entropy, mutual information and the mean *per-sample*
max probability; on the test images entropy and MI; on the shifted set mean confidence minus
accuracy; for the rank-1 fits the trained factor means and stds per layer (``0s``: the first
convolution's input factor; ``10r``: the output units' factor); for the mixtures the
between-component disagreement (JS divergence of the components' predictives) and how far apart
their factor means ended. Results: docs/uncertainty.md ("Out of sample").

Run::

    python benchmarks/quality_rank1_diag.py --seeds 4,7 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F

import bayesify as bf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality as Q  # noqa: E402

FITS = (("rank-1 defaults", {}), ("rank-1 (means lr 1e-3)", {"means_lr": 1e-3}),
        ("rank-1 x4", {"components": 4}), ("rank-1 x4 (apart 0.5)", {"components": 4, "component_std": 0.5}))


def stats(task: Q.Digits, tag: str, test: torch.Tensor, noise: torch.Tensor, shift: torch.Tensor) -> None:
    """``(S, N, C)`` logits on the test, noise and shifted images -> one printed line."""
    res = {}
    for name, out in (("test", test), ("noise", noise)):
        p = out.float().softmax(-1)
        ent = torch.special.entr(p.mean(0)).sum(-1)
        res[name] = {"ent": ent, "mi": (ent - torch.special.entr(p).sum(-1).mean(0)).clamp_min(0),
                     "conf": p.max(-1).values.mean(0)}
    sh = shift.float().softmax(-1).mean(0)
    gap = float(sh.max(-1).values.mean() - (sh.argmax(-1) == task.y_test).float().mean())
    t, n = res["test"], res["noise"]
    print(f"{tag:34s} shift conf-acc {gap:+.4f} | AUROC ent {bf.metrics.auroc(t['ent'], n['ent']):.3f} "
          f"MI {bf.metrics.auroc(t['mi'], n['mi']):.3f} | noise: ent {n['ent'].mean():.3f} MI {n['mi'].mean():.3f} "
          f"per-sample conf {n['conf'].mean():.3f} | test: ent {t['ent'].mean():.4f} MI {t['mi'].mean():.4f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="4,7", help="comma-separated seeds")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = Q.Digits()
    xs = (task.x_test, task.x_noise, task.x_shift)
    for seed in (int(s) for s in args.seeds.split(",")):
        net = task.pretrain(seed)
        with torch.no_grad():
            stats(task, f"s{seed} point", *(net.eval()(x)[None] for x in xs))
            torch.manual_seed(seed)
            net.train()
            stats(task, f"s{seed} MC dropout", *(torch.stack([net(x) for _ in range(100)]) for x in xs))
            net.eval()
        members = [net] + [task.pretrain(seed + 100 * k) for k in range(1, 5)]
        with torch.no_grad():
            stats(task, f"s{seed} ensemble", *(torch.stack([m(x) for m in members]) for x in xs))
        for label, kw in FITS:
            bnn = Q._train_rank1(task, copy.deepcopy(net), seed, **kw)
            ps = {n: p.detach() for n, p in bnn.named_parameters()}
            means = " ".join(f"{n.split('.')[1]}{n[-6]}={float(p.mean()):.2f}" for n, p in ps.items()
                             if n.endswith("_mean"))
            stds = " ".join(f"{n.split('.')[1]}{n[-5]}={float(F.softplus(p).median()):.2f}" for n, p in ps.items()
                            if n.endswith("_rho"))
            print(f"   {label}: factor means (mean) {means} | stds (median) {stds}")
            with torch.no_grad():
                outs = [bnn(x, samples=100, generator=torch.Generator().manual_seed(seed)) for x in xs]
            stats(task, f"s{seed} {label}", *outs)
            k = kw.get("components", 1)
            if k > 1:
                for name, out in zip(("test", "noise"), outs[:2]):
                    pc = torch.stack([out[c::k].softmax(-1).mean(0) for c in range(k)])
                    js = torch.special.entr(pc.mean(0)).sum(-1) - torch.special.entr(pc).sum(-1).mean(0)
                    print(f"      between-component JS on {name}: {float(js.mean()):.4f}")
                apart = " ".join(f"{n.split('.')[1]}{n[-6]}={float((p - p.mean(0)).abs().mean()):.3f}"
                                 for n, p in ps.items() if n.endswith("_mean"))
                print(f"      components' mean abs deviation after training: {apart}")


if __name__ == "__main__":
    main(sys.argv[1:])
