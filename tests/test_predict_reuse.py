"""bf.predict draws the weights once per call and keeps them for every batch (bayesify/_reuse.py):
bit for bit the results of drawing them again per batch, one noise pass instead of one per batch,
and today's behaviour where the samples do not fit the budget or chunk_size asks for less memory."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

import bayesify as bf
from bayesify import _reuse

N, D, C = 13, 4, 3


class Net(bf.VIModule):
    def __init__(self, estimator: str = "reparam") -> None:
        super().__init__()
        wide = bf.variational.MeanFieldNormal(init_std=0.5)
        self.fc1 = bf.nn.VILinear(D, 8, variational=wide)
        self.fc2 = bf.nn.VILinear(8, C, variational=wide, estimator=estimator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class NormalDraws(TorchDispatchMode):
    """Counts the ``normal_`` kernels run on this thread (the weight-noise passes)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.ops.aten.normal_.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def gen(seed: int = 5) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run(model: nn.Module, x: Any, budget: int, monkeypatch: pytest.MonkeyPatch, **kw: Any
        ) -> tuple[bf.Prediction, int, torch.Tensor]:
    """``bf.predict`` with ``budget`` bytes for kept draws: the prediction, the noise passes, the
    generator's state after the call."""
    monkeypatch.setattr(_reuse, "REUSE_MAX_BYTES", budget)
    g = gen()
    assert torch.get_num_threads() == 1  # conftest: the draws run on this thread, where the mode counts
    with NormalDraws() as mode:
        pred = bf.predict(model, x, generator=g, **kw)
    return pred, mode.count, g.get_state()


def assert_same(a: bf.Prediction, b: bf.Prediction) -> None:
    for name in ("probs", "entropy", "mutual_information", "sample_probs", "mean", "variance", "sample_means"):
        va, vb = getattr(a, name), getattr(b, name)
        assert (va is None) == (vb is None), name
        if va is not None:
            assert torch.equal(va, vb), name


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    return bf.bayesify(torchvision.models.resnet18(num_classes=5),
                       variational=bf.variational.MeanFieldNormal(init_std=0.05))


CASES = {
    "mlp, 4 tensor batches": (lambda: Net(), lambda: torch.randn(N, D, generator=gen(1)),
                              {"samples": 20, "batch_size": 4}),
    "mlp, dataloader, kept samples": (lambda: Net(), lambda: DataLoader(TensorDataset(
        torch.randn(N, D, generator=gen(1)), torch.zeros(N)), batch_size=5), {"samples": 7, "keep_samples": True}),
    "mlp, normal likelihood, chunk_size = samples": (lambda: Net(), lambda: torch.randn(N, D, generator=gen(1)),
                                                     {"samples": 6, "batch_size": 6, "likelihood": "normal",
                                                      "chunk_size": 6}),
    # a local-reparameterisation layer draws in-forward noise from the generator's in-forward seed
    "mlp with a local layer": (lambda: Net("local"), lambda: torch.randn(N, D, generator=gen(1)),
                               {"samples": 5, "batch_size": 3}),
    "resnet18 (converted)": (small_resnet, lambda: torch.randn(6, 3, 16, 16, generator=gen(1)),
                             {"samples": 3, "batch_size": 2}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kept_draws_give_the_same_prediction_with_one_noise_pass(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    build, data, kw = CASES[case]
    model = build()
    batches = len(data()) if not isinstance(data(), torch.Tensor) else -(-data().shape[0] // kw["batch_size"])
    assert batches >= 3
    kept, kept_draws, kept_state = run(model, data(), 1 << 40, monkeypatch, **kw)
    fresh, fresh_draws, fresh_state = run(model, data(), 0, monkeypatch, **kw)
    assert_same(kept, fresh)
    assert torch.equal(kept_state, fresh_state)  # the generator moves as by one call either way
    assert kept_draws > 0 and fresh_draws == batches * kept_draws
    assert _reuse.active(model) is None  # nothing kept after the call


def test_samples_over_the_budget_are_drawn_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = Net(), torch.randn(N, D, generator=gen(1))
    fc1 = 20 * 8 * D * 4  # bytes of fc1.weight's 20 samples, the largest tensor
    _, one, _ = run(model, x[:4], 1 << 40, monkeypatch, samples=20, batch_size=4)
    kept, kept_draws, _ = run(model, x, 1 << 40, monkeypatch, samples=20, batch_size=4)
    over, over_draws, _ = run(model, x, fc1, monkeypatch, samples=20, batch_size=4)
    assert_same(kept, over)
    assert kept_draws == one and over_draws == 4 * one


def test_chunk_size_below_samples_keeps_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = Net(), torch.randn(N, D, generator=gen(1))
    whole, whole_draws, _ = run(model, x, 1 << 40, monkeypatch, samples=8, batch_size=4)
    chunked, chunked_draws, _ = run(model, x, 1 << 40, monkeypatch, samples=8, batch_size=4, chunk_size=3)
    assert_same(whole, chunked)  # block-seeded noise: chunks draw the same samples
    assert chunked_draws == 4 * whole_draws  # every batch draws again (memory: chunk_size asked for it)


def test_a_kept_sample_modified_in_place_is_drawn_again() -> None:
    model = Net()
    model.eval()
    g = gen()
    start = g.get_state()
    with torch.no_grad(), _reuse.reusing_draws(model, 1 << 40) as cache:
        first, *_ = model._draws(4, g, False, {})
        after = g.get_state()
        g.set_state(start)
        again, *_ = model._draws(4, g, False, {})
        assert cache.hits == 1 and torch.equal(g.get_state(), after)
        assert again["fc1.weight"] is first["fc1.weight"]
        expected = first["fc1.weight"].clone()
        first["fc1.weight"].add_(1.0)
        g.set_state(start)
        redrawn, *_ = model._draws(4, g, False, {})
        assert cache.misses == 2 and torch.equal(redrawn["fc1.weight"], expected)
        # a training-mode request (log densities) is never served from the cache
        g.set_state(start)
        model._draws(4, g, True, {})
        assert cache.hits == 1 and cache.misses == 2
