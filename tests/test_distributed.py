"""Distributed training with real processes: DDP and FSDP2 on CPU (gloo, 127.0.0.1).

Two processes run this very file as a script (``python tests/test_distributed.py all
OUT_DIR`` with torchrun's environment variables: RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT); each runs every scenario below and writes its observations to
``OUT_DIR/all.rank{r}.pt``, and the assertions run here, in the pytest process. One
launch serves all the tests (importing torch, and torch._dynamo which DDP imports,
costs seconds in a fresh process), the example script included.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import bayesify as bf

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
WORLD = 2

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this build",
)


# ----------------------------------------------------------------------------------------
# launching
# ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    """Wait for every process; on the first failure (or the deadline) stop the others."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        failed = [p for p in procs if p.poll() not in (None, 0)]
        if failed or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            break
        time.sleep(0.05)
    problems = [
        f"--- process {i} exited with {p.returncode}:\n{log.read_text()[-6000:]}"
        for i, (p, log) in enumerate(zip(procs, logs)) if p.returncode != 0
    ]
    if problems:
        pytest.fail(f"distributed run failed (timeout {timeout:.0f}s)\n" + "\n".join(problems))


def run_ranks(scenario: str, out: Path, timeout: float) -> list[dict[str, Any]]:
    """Run ``scenario`` on WORLD ranks (one process each); return every rank's observations."""
    for attempt in range(2):  # a second try only if the free port was taken in between
        port = _free_port()
        procs, logs = [], []
        for rank in range(WORLD):
            log = out / f"{scenario}.rank{rank}.log"
            env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LAUNCHED_AT=str(time.time()))
            with open(log, "w") as fh:
                procs.append(subprocess.Popen([sys.executable, str(HERE), scenario, str(out)],
                                              env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT))
            logs.append(log)
        try:
            _wait_all(procs, logs, timeout)
            break
        except pytest.fail.Exception as exc:
            if attempt == 0 and "address already in use" in str(exc).lower():
                continue
            raise
    return [torch.load(out / f"{scenario}.rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="session")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every scenario's observations on both ranks, from ONE launch of two processes.

    Starting a process costs seconds (importing torch), so all scenarios run in one
    launch; under pytest-xdist the first worker to get here launches it and the other
    waits for its results (a lock file next to the workers' temp folders).
    """
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if uid is None:
        return run_ranks("all", tmp_path_factory.mktemp("distributed"), timeout=300)
    from filelock import FileLock

    out = tmp_path_factory.getbasetemp().parent / f"bayesify-distributed-{uid}"
    with FileLock(f"{out}.lock"):
        failed = out / "FAILED"
        if failed.exists():
            pytest.fail(failed.read_text(), pytrace=False)
        if not (out / "all.rank0.pt").exists():
            out.mkdir(exist_ok=True)
            try:
                return run_ranks("all", out, timeout=300)
            except pytest.fail.Exception as exc:
                failed.write_text(str(exc))
                raise
    return [torch.load(out / f"all.rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _results(ranks: list[dict[str, Any]], scenario: str) -> list[dict[str, Any]]:
    for rank, res in enumerate(ranks):
        if "error" in res[scenario]:
            pytest.fail(f"scenario {scenario!r} failed on rank {rank}:\n{res[scenario]['error']}", pytrace=False)
    return [res[scenario] for res in ranks]


# ----------------------------------------------------------------------------------------
# what runs inside each rank
# ----------------------------------------------------------------------------------------
class MLP(bf.VIModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = bf.nn.VILinear(4, 32, variational=bf.variational.MeanFieldNormal(init_std=0.05))
        self.fc2 = bf.nn.VILinear(32, 3, variational=bf.variational.MeanFieldNormal(init_std=0.05))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class MLPWithUnused(MLP):
    """A deterministic head that the forward never uses: needs find_unused_parameters=True."""

    def __init__(self) -> None:
        super().__init__()
        self.unused_head = nn.Linear(32, 3)


class MLPWithUnusedBayesian(MLP):
    """A Bayesian layer the forward never uses: its KL term still gives every parameter
    a gradient, so the default DDP (find_unused_parameters=False) needs nothing more."""

    def __init__(self) -> None:
        super().__init__()
        self.unused_bayesian = bf.nn.VILinear(32, 3)


def _data(rank: int, n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = (x @ torch.randn(4, 3, generator=g)).argmax(1)
    return x[rank::WORLD], y[rank::WORLD]


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an FSDP2 DTensor is gathered)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


def _max_param_diff(model: nn.Module) -> float:
    """max |p - p on rank 0| over all parameters, the same on every rank."""
    import torch.distributed as dist

    worst = 0.0
    for p in model.parameters():
        mine = _full(p).clone()
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        worst = max(worst, (mine - ref).abs().max().item())
    t = torch.tensor(worst, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _train(wrapped: nn.Module, rank: int, steps: int, samples: int = 4, lr: float = 3e-2) -> list[float]:
    x, y = _data(rank)
    loss_fn = bf.ELBOLoss("categorical", dataset_size=512)
    opt = torch.optim.Adam(wrapped.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = wrapped(x, samples=samples)
        loss = loss_fn(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _ddp_mlp(rank: int, out: Path) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    res: dict[str, Any] = {}

    def ddp_run(cls: type, steps: int, **ddp_kwargs: Any) -> tuple[nn.Module, list[float]]:
        torch.manual_seed(0)            # the same initial model everywhere
        bnn = cls()
        ddp = DDP(bnn, **ddp_kwargs)
        torch.manual_seed(1 + rank)     # the recommended pattern: a different stream per rank
        return bnn, _train(ddp, rank, steps)

    bnn, res["losses"] = ddp_run(MLP, 25)
    res["max_diff"] = _max_param_diff(bnn)

    probe = _data(0)[0][:8]
    with torch.no_grad():
        res["probe_rank_seeded"] = bnn(probe, samples=4).clone()  # draws from seed 1 + rank + history
        torch.manual_seed(1234)                                  # one seed on every rank ...
        res["probe_same_seed"] = bnn(probe, samples=4).clone()    # ... identical draws
        res["probe_generator"] = bnn(probe, samples=4, generator=torch.Generator().manual_seed(7)).clone()

    # Output wrappers of DDP (find_unused_parameters / static_graph) drop the log_probs
    # attribute; ELBOLoss still finds the KL: the losses equal the default run's exactly.
    for key, kwargs in {"find_unused": dict(find_unused_parameters=True),
                        "static_graph": dict(static_graph=True)}.items():
        b, res[f"losses_{key}"] = ddp_run(MLP, 5, **kwargs)
        res[f"max_diff_{key}"] = _max_param_diff(b)
    b, res["losses_unused"] = ddp_run(MLPWithUnused, 5, find_unused_parameters=True)
    res["max_diff_unused"] = _max_param_diff(b)
    res["unused_head_grad"] = b.unused_head.weight.grad
    b, res["losses_unused_bayesian"] = ddp_run(MLPWithUnusedBayesian, 5)
    res["max_diff_unused_bayesian"] = _max_param_diff(b)

    # Checkpoint: rank 0 writes the plain state dict, every rank reads it back.
    path = out / "ddp_mlp_state.pt"
    if rank == 0:
        torch.save(bnn.state_dict(), path)
    dist.barrier()
    fresh = MLP()
    fresh.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    res["loaded_equal"] = all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                                bnn.state_dict().values()))
    fresh.eval()
    with torch.no_grad():
        res["loaded_pred"] = fresh(probe, samples=4, generator=torch.Generator().manual_seed(7))

    # SyncBatchNorm is CUDA-only in PyTorch: pin the exact CPU errors documented in the README.
    sbn = bf.bayesify(nn.SyncBatchNorm.convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))))
    for key, fn in {"syncbn_ddp": lambda: DDP(sbn),
                    "syncbn_forward": lambda: sbn(torch.randn(2, 3, 4, 4), samples=2)}.items():
        try:
            fn()
            res[key] = None
        except Exception as exc:  # noqa: BLE001 - recorded and asserted in the parent
            res[key] = f"{type(exc).__name__}: {exc}"
    return res


def _ddp_resnet(rank: int, out: Path) -> dict[str, Any]:
    import torchvision
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    bnn = bf.bayesify(torchvision.models.resnet18(num_classes=10))
    bnn.train()                                    # BatchNorm uses batch statistics
    ddp = DDP(bnn)
    torch.manual_seed(1 + rank)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss_fn = bf.ELBOLoss("categorical", dataset_size=100_000)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            o = ddp(x, samples=2)
            loss = loss_fn(o, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    bn = bnn.model.bn1
    return {
        "losses": losses,
        "out_shape": tuple(o.shape),
        "max_diff": _max_param_diff(bnn),
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        "bn_running_mean": bn.running_mean.clone(),
        "bn_batches": int(bn.num_batches_tracked),
    }


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _fsdp(rank: int, out: Path) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    res: dict[str, Any] = {}

    def run(build: Callable[[], nn.Module], wrap: str, steps: int, data: Callable[[], tuple],
            recompute: bool = False) -> tuple:
        torch.manual_seed(0)
        model = build()
        if wrap == "ddp":
            wrapped = DDP(model)
        else:
            for child in model.modules():
                if isinstance(child, (bf.nn.VILinear, bf.nn.VIConv2d)):
                    fully_shard(child)
            fully_shard(model)
            wrapped = model
        torch.manual_seed(1 + rank)
        x, y = data()
        loss_fn = bf.ELBOLoss("categorical", dataset_size=512)
        opt = torch.optim.Adam(wrapped.parameters(), lr=3e-2)
        losses = []
        for _ in range(steps):
            o = wrapped(x, samples=4, recompute_samples=recompute)
            loss = loss_fn(o, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return model, losses

    mlp_data = lambda: _data(rank)  # noqa: E731
    cnn_data = lambda: (torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,)))  # noqa: E731
    convert = lambda: bf.bayesify(SmallCNN(), prior=bf.priors.Normal("pretrained", 0.1),  # noqa: E731
                                  variational=bf.variational.MeanFieldNormal(init_std=1e-3))
    for name, build, data in (("mlp", MLP, mlp_data), ("cnn", convert, cnn_data)):
        ref, res[f"{name}_losses_ddp"] = run(build, "ddp", 5, data)
        sharded, res[f"{name}_losses_fsdp"] = run(build, "fsdp", 5, data)
        res[f"{name}_param_types"] = sorted({type(p).__name__ for p in sharded.parameters()})
        res[f"{name}_vs_ddp"] = max((_full(a) - _full(b)).abs().max().item()
                                    for a, b in zip(ref.parameters(), sharded.parameters()))
        res[f"{name}_max_diff"] = _max_param_diff(sharded)
        # recompute_samples under FSDP: samples drawn at use from the gathered means
        sharded_rc, res[f"{name}_losses_fsdp_recompute"] = run(build, "fsdp", 5, data, recompute=True)
        res[f"{name}_recompute_vs_ddp"] = max((_full(a) - _full(b)).abs().max().item()
                                              for a, b in zip(ref.parameters(), sharded_rc.parameters()))

    # Samples survive FSDP's hooks: per-layer sharding with chunked vmap (a reshard between
    # chunks would let FSDP's all-gather put the means back), in train and eval mode, and
    # a call without gradients leaves every parameter sharded again.
    torch.manual_seed(0)
    plain_mlp, sharded_mlp = MLP(), MLP()
    sharded_mlp.load_state_dict(plain_mlp.state_dict())
    fully_shard(sharded_mlp.fc1)
    fully_shard(sharded_mlp.fc2)
    fully_shard(sharded_mlp)
    probe, diffs = _data(0)[0][:5], []
    with torch.no_grad():
        for training in (True, False):
            plain_mlp.train(training)
            sharded_mlp.train(training)
            a, b = (m(probe, samples=4, chunk_size=1, generator=torch.Generator().manual_seed(3))
                    for m in (plain_mlp, sharded_mlp))
            diffs.append((a - b).abs().max().item())
    res["chunked_vs_plain"] = max(diffs)
    res["types_after_no_grad_call"] = sorted({type(p).__name__ for p in sharded_mlp.parameters()})

    # IVON under FSDP2: state sharded like the parameters (DTensors), the prior's centre (the
    # pretrained weights, an unsharded buffer) sliced to match, global reductions (the start's
    # mean variance, the gradient norm): the same steps as under DDP.
    def ivon_build() -> nn.Module:
        torch.manual_seed(0)
        return bf.bayesify(nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3)),
                           prior=bf.priors.Normal("pretrained", 0.1))

    def ivon_run(wrap: str) -> tuple:
        model = ivon_build()
        if wrap == "ddp":
            wrapped = DDP(model)
        else:
            fully_shard(model.model[0])
            fully_shard(model.model[2])
            fully_shard(model)
            wrapped = model
        opt = bf.optim.IVON(model, lr=0.05, ess=512, max_grad_norm=0.5)
        loss_fn = bf.NLLLoss("categorical")
        x, y = _data(rank)
        for step in range(4):
            o = wrapped(x, samples=2, generator=torch.Generator().manual_seed(10 + step))
            loss = loss_fn(o, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model, opt

    ivon_ref, opt_ref = ivon_run("ddp")
    ivon_sharded, opt_sharded = ivon_run("fsdp")
    res["ivon_vs_ddp"] = max((_full(a) - _full(b)).abs().max().item()
                             for a, b in zip(ivon_ref.parameters(), ivon_sharded.parameters()))
    res["ivon_moved"] = max((_full(a) - _full(b)).abs().max().item()
                            for a, b in zip(ivon_build().parameters(), ivon_ref.parameters()))
    states = [opt_sharded.state[p] for p in opt_sharded.param_groups[0]["params"]]
    res["ivon_state_types"] = sorted({type(st[k]).__name__ for st in states for k in ("hess", "momentum")})
    res["ivon_hess_vs_ddp"] = max(
        (_full(opt_ref.state[a]["hess"]) - _full(opt_sharded.state[b]["hess"])).abs().max().item()
        / (_full(opt_ref.state[a]["hess"]).abs().max().item() + 1e-12)
        for a, b in zip(opt_ref.param_groups[0]["params"], opt_sharded.param_groups[0]["params"]))
    res["ivon_local_state_numel"] = sum(st["hess"].to_local().numel() for st in states)
    res["ivon_full_state_numel"] = sum(st["hess"].numel() for st in states)

    # Checkpoint: the full (unsharded) state dict, written by rank 0, loads into a plain model.
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    path = out / "fsdp_state.pt"
    if rank == 0:
        torch.save(full, path)
    dist.barrier()
    plain = convert()
    plain.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    res["loaded_vs_ddp"] = max((a - _full(b)).abs().max().item()
                               for a, b in zip(plain.parameters(), ref.parameters()))
    return res


def _example(rank: int, out: Path) -> dict[str, Any]:
    """examples/distributed.py in this process group (the same environment torchrun sets)."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location("bayesify_example_distributed",
                                                  ROOT / "examples" / "distributed.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = example.main(["--steps", "12", "--save", str(out / "example_state.pt")])
    return {"code": code, "stdout": stdout.getvalue()}


SCENARIOS: dict[str, Callable[[int, Path], dict[str, Any]]] = {
    "ddp_mlp": _ddp_mlp, "ddp_resnet": _ddp_resnet, "fsdp": _fsdp, "example": _example,
}


def _rank_main(scenario: str, out: Path) -> None:
    import datetime
    import traceback

    import torch.distributed as dist

    # env:// (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); a short timeout turns a rank
    # left waiting by its failed peer into an error instead of a hang.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    rank = dist.get_rank()
    names = list(SCENARIOS) if scenario == "all" else [scenario]
    # from the launch to here: starting Python, importing torch and bayesify, joining the group
    res: dict[str, Any] = {"startup_seconds": time.time() - float(os.environ.get("LAUNCHED_AT", "nan"))}
    for name in names:
        start = time.perf_counter()
        try:
            res[name] = SCENARIOS[name](rank, out)
        except Exception:  # noqa: BLE001 - reported by the test that reads this scenario
            res[name] = {"error": traceback.format_exc()}
        dist.barrier()
        res[name]["seconds"] = time.perf_counter() - start
    torch.save(res, out / f"{scenario}.rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------
def _falling(losses: list[float]) -> bool:
    k = max(1, len(losses) // 5)
    return sum(losses[-k:]) / k < sum(losses[:k]) / k


def test_ddp_trains_hand_built_bnn(ranks: list[dict[str, Any]]) -> None:
    r0, r1 = _results(ranks, "ddp_mlp")
    # gradients are all-reduced: the parameters stay bit-identical, and the loss falls
    assert r0["max_diff"] == 0.0 and r1["max_diff"] == 0.0
    assert _falling(r0["losses"]) and _falling(r1["losses"])
    assert r0["losses"] != r1["losses"]  # each rank sees its own shard and its own samples
    # seeded seed + rank: the ranks draw different weight samples ...
    assert not torch.allclose(r0["probe_rank_seeded"], r1["probe_rank_seeded"])
    # ... while one global seed on every rank gives identical draws (the documented pitfall),
    assert torch.equal(r0["probe_same_seed"], r1["probe_same_seed"])
    # and an explicit generator is reproducible anywhere.
    assert torch.equal(r0["probe_generator"], r1["probe_generator"])
    # find_unused_parameters / static_graph: the KL term is still found (same losses as default)
    for key in ("find_unused", "static_graph"):
        assert r0[f"losses_{key}"] == pytest.approx(r0["losses"][:5], rel=1e-6, abs=1e-6), key
        assert r0[f"max_diff_{key}"] == 0.0
    assert r0["max_diff_unused"] == 0.0 and r0["unused_head_grad"] is None
    assert _falling(r0["losses_unused"])
    assert r0["max_diff_unused_bayesian"] == 0.0 and _falling(r0["losses_unused_bayesian"])
    # rank 0's torch.save(state_dict) loads on every rank and predicts identically
    assert r0["loaded_equal"] and r1["loaded_equal"]
    assert torch.equal(r0["loaded_pred"], r1["loaded_pred"])
    # SyncBatchNorm needs CUDA (PyTorch's limitation, documented in the README)
    assert r0["syncbn_ddp"] == "ValueError: SyncBatchNorm layers only work with GPU modules"
    assert r0["syncbn_forward"] is not None
    assert r0["syncbn_forward"].startswith("ValueError: SyncBatchNorm expected input tensor to be on GPU")


def test_ddp_trains_converted_resnet18_with_batchnorm(ranks: list[dict[str, Any]]) -> None:
    r0, r1 = _results(ranks, "ddp_resnet")
    assert r0["out_shape"] == (2, 4, 10)
    assert r0["max_diff"] == 0.0 and r1["max_diff"] == 0.0
    assert r0["losses"][-1] < r0["losses"][0] and r1["losses"][-1] < r1["losses"][0]
    assert not r0["warnings"], r0["warnings"]  # vectorised (vmap) inside DDP, no loop fallback
    # BatchNorm in train mode: running statistics move (each rank's own batch; DDP
    # re-broadcasts rank 0's buffers at the start of every forward)
    for r in (r0, r1):
        assert r["bn_batches"] == 2 and r["bn_running_mean"].abs().sum() > 0


def test_fsdp2_fully_shard_matches_ddp(ranks: list[dict[str, Any]]) -> None:
    r0, r1 = _results(ranks, "fsdp")
    for name in ("mlp", "cnn"):  # hand-built, and converted with BatchNorm in train mode
        assert r0[f"{name}_param_types"] == ["DTensor"]
        assert r0[f"{name}_max_diff"] == 0.0
        assert r0[f"{name}_vs_ddp"] < 1e-5 and r1[f"{name}_vs_ddp"] < 1e-5
        assert r0[f"{name}_losses_fsdp"] == pytest.approx(r0[f"{name}_losses_ddp"], rel=1e-5, abs=1e-5)
        assert _falling(r0[f"{name}_losses_fsdp"])
        assert r0[f"{name}_losses_fsdp_recompute"] == pytest.approx(r0[f"{name}_losses_ddp"], rel=1e-5, abs=1e-5)
        assert r0[f"{name}_recompute_vs_ddp"] < 1e-5 and r1[f"{name}_recompute_vs_ddp"] < 1e-5
    assert r0["loaded_vs_ddp"] < 1e-5 and r1["loaded_vs_ddp"] < 1e-5
    assert r0["chunked_vs_plain"] < 1e-5 and r1["chunked_vs_plain"] < 1e-5
    assert r0["types_after_no_grad_call"] == ["DTensor"]


def test_ivon_under_fsdp2_matches_ddp(ranks: list[dict[str, Any]]) -> None:
    """IVON on fully_shard parameters: the same means, spreads and Hessian as under DDP, with its
    state sharded like the parameters (each rank holds its part)."""
    r0, r1 = _results(ranks, "fsdp")
    assert r0["ivon_moved"] > 1e-3  # the steps did something
    assert r0["ivon_vs_ddp"] < 1e-5 and r1["ivon_vs_ddp"] < 1e-5
    assert r0["ivon_hess_vs_ddp"] < 1e-5
    assert r0["ivon_state_types"] == ["DTensor"]
    assert r0["ivon_local_state_numel"] + r1["ivon_local_state_numel"] == r0["ivon_full_state_numel"]
    assert r0["ivon_local_state_numel"] < r0["ivon_full_state_numel"]


def test_example_trains_and_checks_itself(ranks: list[dict[str, Any]]) -> None:
    """examples/distributed.py, as ``torchrun --nproc_per_node=2 examples/distributed.py`` runs it."""
    r0, r1 = _results(ranks, "example")
    assert r0["code"] == 0 and r1["code"] == 0, r0["stdout"]
    losses = [float(v) for v in re.findall(r"^step +\d+ +loss ([0-9.]+)$", r0["stdout"], re.M)]
    assert len(losses) == 12 and _falling(losses)
    assert r1["stdout"] == ""  # only rank 0 prints
    assert "parameters identical across 2 ranks: True" in r0["stdout"]
    assert "state dict saved by rank 0 and loaded on all 2 ranks: True" in r0["stdout"]


if __name__ == "__main__":
    _rank_main(sys.argv[1], Path(sys.argv[2]))
