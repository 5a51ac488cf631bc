"""Data-parallel throughput of a Bayesian MLP: 1 process vs 2 processes (DDP, gloo, CPU).

    python benchmarks/distributed.py                 # prints a markdown table
    python benchmarks/distributed.py --json out.json

Every configuration trains ``bf.bayesify(MLP)`` with ``samples=10`` on synthetic data for
``--steps`` timed steps (after ``--warmup`` untimed ones) and reports the throughput of
each process (training examples per second; every example is evaluated under all 10
weight samples) and of the whole group. Each process runs with ``--threads`` torch
threads (default 1), so "2 processes" uses two cores where "1 process" uses one; the
extra row "1 process, 2 threads" shows what intra-op threading makes of the same two
cores. The processes are started by this script with torchrun's environment variables
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    import bayesify as bf

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dims = [args.in_features, *([args.hidden] * args.layers), 10]
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    bnn = bf.bayesify(nn.Sequential(*layers[:-1]))
    model = DDP(bnn) if world > 1 else bnn
    torch.manual_seed(1 + rank)
    x = torch.randn(args.batch_size, args.in_features)
    y = torch.randint(0, 10, (args.batch_size,))
    loss_fn = bf.ELBOLoss("categorical", dataset_size=50_000)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        out = model(x, samples=args.samples)
        loss = loss_fn(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        n_params = sum(p.numel() for p in bnn.parameters())
        Path(args.result).write_text(json.dumps({"times": times, "params": n_params}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, threads: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        port = _free_port()
        argv = [sys.executable, str(HERE), "--worker", "--result", str(result), "--threads", str(threads)]
        for key in ("steps", "warmup", "repeats", "batch_size", "samples", "in_features", "hidden", "layers"):
            argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        procs = []
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads)}
            procs.append(subprocess.Popen(argv, env=env))
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"benchmark workers failed with exit codes {codes}")
        return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per repeat")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
    ap.add_argument("--batch-size", type=int, default=128, help="per process")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--in-features", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2, help="hidden layers")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return

    import torch

    configs = [(1, args.threads), (2, args.threads), (1, 2 * args.threads)]
    rows = []
    for world, threads in configs:
        load = os.getloadavg()[0]
        res = _launch(world, threads, args)
        t = statistics.median(res["times"])
        per_proc = args.batch_size * args.steps / t
        rows.append({"processes": world, "threads_per_process": threads, "step_ms": 1000 * t / args.steps,
                     "examples_per_s_per_process": per_proc, "examples_per_s_total": per_proc * world,
                     "load_avg_1min_before": load, "params": res["params"]})
    base = rows[0]["examples_per_s_total"]
    print(f"bayesify DDP benchmark: bf.bayesify(MLP {args.in_features}-"
          f"{'-'.join([str(args.hidden)] * args.layers)}-10, {rows[0]['params']:,} parameters incl. rho), "
          f"samples={args.samples}, batch {args.batch_size} per process, gloo on CPU, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, median of {args.repeats} x {args.steps} steps")
    print()
    print("| processes | threads / process | step (ms) | examples/s per process | examples/s total | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['processes']} | {r['threads_per_process']} | {r['step_ms']:.1f} | "
              f"{r['examples_per_s_per_process']:,.0f} | {r['examples_per_s_total']:,.0f} | "
              f"{r['examples_per_s_total'] / base:.2f}x |")
    print()
    print("1-minute load average before each row: " + ", ".join(f"{r['load_avg_1min_before']:.1f}" for r in rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
