"""Data-parallel training of a Bayesian neural network with DistributedDataParallel.

Run on CPU with two processes (gloo)::

    torchrun --nproc_per_node=2 examples/distributed.py

(or ``python examples/distributed.py`` for a single process). Each process trains on its
shard of the data, draws its *own* weight samples (seeded ``seed + rank``), and DDP
averages the gradients, so every rank ends with identical parameters; the script
checks that at the end and exits non-zero if they differ.

Nothing here is special to bayesify: a model from ``bf.bayesify`` (or a hand-written
``bf.VIModule``) goes into ``DistributedDataParallel`` unchanged, and ``samples=`` passes
straight through ``ddp(x, samples=4)``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import bayesify as bf


def make_data(n: int, seed: int = 0) -> TensorDataset:
    """Three noisy spirals in 2-D (identical on every rank: same seed)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 3, (n,), generator=g)
    t = torch.rand(n, generator=g) * 3.0 + 0.5
    angle = t + k * (2 * torch.pi / 3)
    x = torch.stack([t * angle.cos(), t * angle.sin()], dim=1) + 0.15 * torch.randn(n, 2, generator=g)
    return TensorDataset(x, k)


def make_model(kind: str) -> bf.VIModule:
    if kind == "converted":
        point = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
        return bf.bayesify(point, prior=bf.priors.Normal(0.0, 1.0),
                           variational=bf.variational.MeanFieldNormal(init_std=1e-2))
    return HandBuilt()


class HandBuilt(bf.VIModule):
    """The same network written with bayesify's layers."""

    def __init__(self) -> None:
        super().__init__()
        kw = dict(prior=bf.priors.Normal(0.0, 1.0), variational=bf.variational.MeanFieldNormal(init_std=1e-2))
        self.fc1 = bf.nn.VILinear(2, 64, **kw)
        self.fc2 = bf.nn.VILinear(64, 64, **kw)
        self.fc3 = bf.nn.VILinear(64, 3, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def init_distributed() -> tuple[int, int, bool]:
    """Join the process group torchrun describes (a lone ``python`` run becomes a group of
    one); the last value says whether this call created the group (and so should end it)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), True


def max_param_difference(model: nn.Module) -> float:
    """Largest |parameter - rank 0's parameter| over all parameters (0.0 when identical)."""
    worst = 0.0
    for p in model.parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, src=0)
        worst = max(worst, (p.detach() - ref).abs().max().item())
    t = torch.tensor(worst, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=64, help="per process")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", choices=["converted", "handbuilt"], default="converted")
    ap.add_argument("--save", help="rank 0 writes the state dict here; every rank loads it back")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args(argv)

    rank, world, owns_group = init_distributed()
    torch.set_num_threads(args.threads)

    # 1. Build the model with one seed everywhere (DDP also broadcasts rank 0's parameters).
    torch.manual_seed(args.seed)
    bnn = make_model(args.model)
    ddp = DDP(bnn)

    # 2. Then seed each rank differently: weight samples come from the global RNG, so with
    #    one seed on every rank all ranks would draw the *same* weights (wasted samples).
    torch.manual_seed(args.seed + 1 + rank)

    train_set = make_data(4096, seed=args.seed)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    # dataset_size is the size of the whole training set, not of this rank's shard.
    loss_fn = bf.ELBOLoss("categorical", dataset_size=len(train_set))
    opt = torch.optim.Adam(ddp.parameters(), lr=args.lr)

    step, epoch = 0, 0
    bnn.train()
    while step < args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            out = ddp(x, samples=args.samples)       # (samples, batch, 3), out.log_probs (samples, 2)
            loss = loss_fn(out, y)
            opt.zero_grad()
            loss.backward()                          # DDP averages the gradients over ranks
            opt.step()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            if rank == 0:
                print(f"step {step:4d}  loss {mean_loss.item() / world:.4f}", flush=True)
            step += 1
            if step >= args.steps:
                break
        epoch += 1

    diff = max_param_difference(bnn)
    identical = diff == 0.0
    if rank == 0:
        print(f"parameters identical across {world} ranks: {identical} (max difference {diff:g})", flush=True)

    # Accuracy of the posterior predictive (mean over 32 weight samples), evaluated on rank 0.
    if rank == 0:
        test_set = make_data(1024, seed=args.seed + 12345)
        bnn.eval()
        with torch.no_grad():
            probs = bnn(test_set.tensors[0], samples=32).softmax(-1).mean(0)
        acc = (probs.argmax(-1) == test_set.tensors[1]).float().mean().item()
        print(f"test accuracy (32 samples): {acc:.3f}", flush=True)

    if args.save:
        # Until bf.save / bf.load exist: a plain state dict written by rank 0, read by all.
        if rank == 0:
            torch.save(bnn.state_dict(), args.save)
        dist.barrier()
        torch.manual_seed(args.seed)
        fresh = make_model(args.model)
        fresh.load_state_dict(torch.load(args.save, map_location="cpu", weights_only=True))
        same = all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), bnn.state_dict().values()))
        flag = torch.tensor(int(same))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if rank == 0:
            print(f"state dict saved by rank 0 and loaded on all {world} ranks: {bool(flag.item())}", flush=True)
        identical = identical and bool(flag.item())

    if owns_group:
        dist.destroy_process_group()
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
