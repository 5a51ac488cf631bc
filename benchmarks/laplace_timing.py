"""Time of the post-hoc route (curvature pass + calibration) in training epochs, on the digits CNN.

Interleaved in one process, so that the epochs and the passes see the same machine load; the
median of ``--repeats`` rounds, in process CPU time (``--clock cpu``, the default: with one thread
it is the work done, whatever else loads the machine) or wall time (``--clock wall``).
One point epoch: Adam over the 80 % training split in batches of
64; one ELBO epoch: the same with ``bf.bayesify`` defaults and 4 samples per step.

Run::

    python benchmarks/laplace_timing.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import bayesify as bf
from laplace_digits import digits, loader

VARIANTS = {
    "last layer diag": {"include": "last_layer"},
    "last layer full": {"include": "last_layer", "structure": {"*": "full"}},
    "all sites diag, MC Fisher": {"curvature": "mc"},
    "all sites diag, exact GGN": {},
}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--method", default="auto", help="bf.laplace(method=) for every variant")
    args = ap.parse_args(argv)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    data = digits.load_data()
    n_tr = int(0.8 * len(data.y_train))
    x_tr, y_tr = data.x_train[:n_tr], data.y_train[:n_tr]
    x_val, y_val = data.x_train[n_tr:], data.y_train[n_tr:]
    torch.manual_seed(0)
    net = digits.cnn(dropout=0.25)
    bnn_train = bf.bayesify(net)
    times: dict[str, list[float]] = {}
    for _ in range(args.repeats + 1):  # the first round warms up
        net.train()
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        t = clock()
        for x, y in loader(x_tr, y_tr):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.setdefault("point epoch", []).append(clock() - t)
        loss_fn = bf.ELBOLoss("categorical", dataset_size=len(y_tr))
        opt = torch.optim.Adam(bnn_train.parameters(), 1e-3)
        bnn_train.train()
        t = clock()
        for x, y in loader(x_tr, y_tr):
            loss = loss_fn(bnn_train(x, samples=4), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.setdefault("ELBO epoch (4 samples)", []).append(clock() - t)
        net.eval()
        for name, kw in VARIANTS.items():
            bnn = bf.bayesify(net)
            t = clock()
            bf.laplace(bnn, loader(x_tr, y_tr), progress=False, method=args.method, **kw)
            t1 = clock()
            bf.calibrate(bnn, (x_val, y_val), generator=torch.Generator().manual_seed(0))
            t2 = clock()
            times.setdefault(f"{name}: pass", []).append(t1 - t)
            times.setdefault(f"{name}: calibrate", []).append(t2 - t1)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    pe, ee = med["point epoch"], med["ELBO epoch (4 samples)"]
    print(f"point epoch {pe:.3f}s, ELBO epoch {ee:.3f}s (median of {args.repeats}, {args.threads} thread(s), "
          f"{args.clock} time)")
    print("| variant | pass s | calibrate s | point epochs | ELBO epochs |")
    for name in VARIANTS:
        p, c = med[f"{name}: pass"], med[f"{name}: calibrate"]
        print(f"| {name} | {p:.3f} | {c:.3f} | {(p + c) / pe:.1f} | {(p + c) / ee:.1f} |")


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    main(sys.argv[1:])
