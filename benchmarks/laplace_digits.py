"""Post-hoc Laplace on the digits benchmark and the 1-D gap regression (no training beyond the
curvature pass and calibration), next to the point model and laplace-torch's last-layer KFAC.

Protocol: examples/digits.py's data and CNN; the point network is trained on 80 % of the
training split, the other 20 % is the held-out set that calibration (and nothing else) uses.

Run::

    python benchmarks/laplace_digits.py --seeds 3
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import torch

import bayesify as bf

_HERE = os.path.dirname(os.path.abspath(__file__))


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(_HERE, "..", "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


digits = _example("digits")
gapmod = _example("regression_gap")


def loader(x, y, bs=64):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]


def bnn_predictor(bnn, samples, seed):
    def predict(x):
        pred = bf.predict(bnn, x, samples=samples, generator=torch.Generator().manual_seed(seed))
        return pred.probs, pred.entropy, pred.mutual_information
    return predict


def laplace_torch_predictor(point, train, val_unused, samples):
    from laplace import Laplace

    la = Laplace(point, "classification", subset_of_weights="last_layer", hessian_structure="kron")
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=64)
    la.fit(dl)
    la.optimize_prior_precision(method="marglik")

    @torch.no_grad()
    def predict(x):
        probs = la(x, pred_type="glm", link_approx="mc", n_samples=samples)
        return probs, torch.special.entr(probs).sum(-1), None
    return predict


def epoch_times(point_factory, data, x_tr, y_tr):
    """Seconds of one point-training epoch and one ELBO epoch (4 samples) on the same data."""
    import torch.nn.functional as F
    m = point_factory()
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    t = time.perf_counter()
    for x, y in loader(x_tr, y_tr):
        loss = F.cross_entropy(m(x), y); opt.zero_grad(); loss.backward(); opt.step()
    point_epoch = time.perf_counter() - t
    bnn = bf.bayesify(m)
    loss_fn = bf.ELBOLoss("categorical", dataset_size=len(y_tr))
    opt = torch.optim.Adam(bnn.parameters(), 1e-3)
    bnn.train()
    t = time.perf_counter()
    for x, y in loader(x_tr, y_tr):
        loss = loss_fn(bnn(x, samples=4), y); opt.zero_grad(); loss.backward(); opt.step()
    return point_epoch, time.perf_counter() - t


def run_digits(seeds, samples, pre_epochs, log=print):
    data = digits.load_data()
    n_tr = int(0.8 * len(data.y_train))
    x_tr, y_tr = data.x_train[:n_tr], data.y_train[:n_tr]
    x_val, y_val = data.x_train[n_tr:], data.y_train[n_tr:]
    sub = digits.Data(x_tr, y_tr, data.x_test, data.y_test, data.x_shift, data.x_heldout, data.x_noise)
    variants = [
        ("Laplace diag (marglik)", {}, False, True),
        ("Laplace diag (marglik), sampled predictive", {}, False, False),
        ("Laplace diag + calibrate", {}, True, True),
        ("Laplace diag, MC Fisher + calibrate", {"curvature": "mc"}, True, True),
        ("Laplace diag (val precision)", {"prior_precision": "val"}, False, True),
        ("Laplace last layer full (marglik)", {"include": "last_layer", "structure": {"*": "full"}}, False, True),
        ("Laplace last layer full + calibrate", {"include": "last_layer", "structure": {"*": "full"}}, True, True),
    ]
    res, times = {}, {}
    for seed in seeds:
        torch.manual_seed(seed)
        point = digits.train_point(digits.cnn(dropout=0.25), sub, pre_epochs, seed)
        res.setdefault("point", []).append(digits.summarise(digits.point_predictor(point), data))
        for label, kw, cal, lin in variants:
            bnn = bf.bayesify(point)
            t = time.perf_counter()
            extra = {"val_data": (x_val, y_val)} if kw.get("prior_precision") == "val" else {}
            bf.laplace(bnn, loader(x_tr, y_tr), progress=False, generator=torch.Generator().manual_seed(seed),
                       **kw, **extra)
            tl = time.perf_counter() - t
            tc = 0.0
            if cal:
                t = time.perf_counter()
                c = bf.calibrate(bnn, (x_val, y_val), generator=torch.Generator().manual_seed(seed))
                tc = time.perf_counter() - t
                log(f"seed {seed} {label}: scale {c.posterior_scale} val NLL {c.nll_before:.4f} -> {c.nll:.4f}")
            if not lin:
                bnn.predictive["linearized"] = False
            times.setdefault(label, []).append((tl, tc))
            res.setdefault(label, []).append(digits.summarise(bnn_predictor(bnn, samples, seed), data))
            log(f"seed {seed} {label}: pass {tl:.2f}s calibrate {tc:.2f}s")
        t = time.perf_counter()
        pred = laplace_torch_predictor(point, (x_tr, y_tr), None, samples)
        times.setdefault("laplace-torch last-layer KFAC", []).append((time.perf_counter() - t, 0.0))
        res.setdefault("laplace-torch last-layer KFAC", []).append(digits.summarise(pred, data))
    pe, ee = epoch_times(lambda: digits.cnn(dropout=0.25), data, x_tr, y_tr)
    return res, times, (pe, ee)


def run_gap(seeds, samples, log=print):
    """Epistemic std in the gap / on the data (examples/regression_gap.py's data and MLP), linearised."""
    out: dict[str, list[float]] = {}
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        x, y = gapmod.make_data(100, gen)
        point = gapmod.train_point(gapmod.mlp(), x, y, 2000)
        for label, kw in [("all sites diag", {}),
                          ("last layer full", {"include": "last_layer", "structure": {"*": "full"}})]:
            bnn = bf.bayesify(point)
            r = bf.laplace(bnn, [(x, y)], likelihood="normal", progress=False, **kw)
            s = gapmod.spreads(bnn, x, samples, seed)  # bf.predict: the linearised predictive after laplace
            log(f"gap seed {seed} {label}: noise {r.noise_std:.3f} gap {s['gap']:.4f} data {s['data']:.4f} "
                f"ratio {s['ratio']:.2f}")
            out.setdefault(label, []).append(s["ratio"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    for label, ratios in run_gap(list(range(5)), 200).items():
        print(f"gap ratio, linearised Laplace {label} (5 seeds): mean {sum(ratios) / len(ratios):.2f}, "
              f"min {min(ratios):.2f}")
    if args.skip_digits:
        return
    res, times, (pe, ee) = run_digits(seeds, args.samples, 60)
    print(digits.table(res))
    print(f"one point-training epoch {pe:.2f}s, one ELBO epoch (4 samples) {ee:.2f}s")
    for k, v in times.items():
        tl, tc = sum(a for a, _ in v) / len(v), sum(b for _, b in v) / len(v)
        print(f"time {k}: pass {tl:.2f}s + calibrate {tc:.2f}s = {(tl + tc) / pe:.1f} point epochs, "
              f"{(tl + tc) / ee:.1f} ELBO epochs")


if __name__ == "__main__":
    main(sys.argv[1:])
