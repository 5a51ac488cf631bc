"""The train step's fused paths (bayesify._normal / bayesify._batched): per-sample linear layers
that compute their weight gradient into the draw's mean / rho gradients, the prior term's gradient
in closed form, training samples in pooled memory and the spread kept for backward. Each against
the previous path (every switch off) on real models, in float64: the same outputs and log-probs bit
for bit, and every gradient equal within float tolerance."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

import bayesify as bf
from bayesify import _batched, _normal
from bayesify._normal import BLOCK, meanfield_draw, standard_normal
from tests.models import torch_threads

#: The switches of the fused paths, and their values for the path before them.
PREVIOUS = {"FUSED_WEIGHT_GRADS": False, "CLOSED_FORM_QUAD": False, "POOL_TRAINING_DRAWS": False,
            "KEEP_SPREAD_FOR_BACKWARD": False}


@contextlib.contextmanager
def _previous_path(on: bool):
    with pytest.MonkeyPatch.context() as mp:
        for k, v in PREVIOUS.items() if on else ():
            mp.setattr(_normal, k, v)
        yield


class _Tied(nn.Module):
    """One linear layer applied twice (its weight sample read by two layer calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(6, 9), nn.Linear(9, 9), nn.Linear(9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(self.mid(torch.tanh(self.mid(h)))))


class _Tokens(nn.Module):
    """Linear layers over a (batch, tokens, features) input, one without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 8, bias=False), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))).mean(1)


def _mlp() -> nn.Module:  # the benchmark's shape, small: a shared input for the first layer
    return nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 4))


def _wide() -> nn.Module:  # several block column chunks per weight (and one chunk: sample groups)
    return nn.Sequential(nn.Linear(BLOCK // 96 + 5, 200), nn.ReLU(), nn.Linear(200, 3))


# (name, model, input shape, input needs grad, bayesify kwargs, call kwargs, ELBO kwargs)
CASES = [
    ("mlp", _mlp, (7, 12), False, {}, {}, {}),
    ("mlp, input gradient", _mlp, (7, 12), True, {}, {}, {}),
    ("mlp, prior N(0, 1)", _mlp, (7, 12), False, {"prior": bf.priors.Normal(0.0, 1.0)}, {}, {}),
    ("mlp, analytic KL", _mlp, (7, 12), False, {}, {}, {"kl": "analytic"}),
    ("mlp, one sample", _mlp, (7, 12), False, {}, {"samples": 1}, {}),
    ("mlp, chunked", _mlp, (7, 12), False, {}, {"samples": 5, "chunk_size": 2}, {}),
    ("mlp, recompute", _mlp, (7, 12), False, {}, {"recompute_samples": True}, {}),
    ("tied layer", _Tied, (4, 6), True, {}, {}, {}),
    ("tokens", _Tokens, (3, 4, 5), False, {}, {}, {}),
    ("wide", _wide, (6, BLOCK // 96 + 5), False, {}, {}, {}),
]


def _step(build: Callable[[], nn.Module], shape: tuple, x_grad: bool, conv: dict, call: dict, elbo: dict,
          previous: bool, threads: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], Any]:
    torch.manual_seed(0)
    bnn = bf.bayesify(build().double(), **conv).train()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=x_grad)
    y = torch.randint(0, 2, (shape[0],))
    with torch_threads(threads):
        with _previous_path(previous):
            out = bnn(x, generator=torch.Generator().manual_seed(3), **{"samples": 4, **call})
            loss = bf.ELBOLoss("categorical", dataset_size=50, **elbo)(out, y)
            loss.backward()
    grads = {n: p.grad for n, p in bnn.named_parameters()}
    return out.detach(), out.log_probs.detach(), grads, x.grad


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_train_step_equals_the_previous_path(case):
    _, build, shape, x_grad, conv, call, elbo = case
    fused: list[int] = []
    run = _batched.weight_grads_by_rows

    def counted(*args: Any) -> Any:
        fused.append(1)
        return run(*args)

    _batched.weight_grads_by_rows = counted
    try:
        out, lp, grads, gx = _step(build, shape, x_grad, conv, call, elbo, previous=False)
    finally:
        _batched.weight_grads_by_rows = run
    assert fused, "no linear layer took the fused weight gradient"
    out0, lp0, grads0, gx0 = _step(build, shape, x_grad, conv, call, elbo, previous=True)
    assert torch.equal(out, out0)
    assert torch.equal(lp, lp0)  # the log densities are computed as before, bit for bit
    assert grads.keys() == grads0.keys()
    for name in grads:
        assert grads[name] is not None and grads0[name] is not None, name
        torch.testing.assert_close(grads[name], grads0[name], rtol=1e-10, atol=1e-12, msg=name)
    if x_grad:
        torch.testing.assert_close(gx, gx0, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("threads", [1, 2])
def test_wide_layers_with_two_threads_equal_one(threads):
    # Two threads: a weight of one block column is reduced by sample groups (their own buffers).
    args = ("", _wide, (6, BLOCK // 96 + 5), False, {}, {}, {})[1:]
    out, lp, grads, _ = _step(*args, previous=False, threads=threads)
    out0, lp0, grads0, _ = _step(*args, previous=True, threads=1)
    assert torch.equal(out, out0) and torch.equal(lp, lp0)
    for name in grads:
        torch.testing.assert_close(grads[name], grads0[name], rtol=1e-10, atol=1e-12, msg=name)


def test_samples_weighted_unequally_take_the_per_sample_prior_term():
    # A loss that weighs the samples' log densities unequally: the closed form (one weight for
    # every sample) does not apply; the gradient is still the derivative through each sample.
    def step(previous: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        bnn = bf.bayesify(_mlp().double()).train()
        with _previous_path(previous):
            out = bnn(torch.randn(5, 12, dtype=torch.float64), samples=3, generator=torch.Generator().manual_seed(1))
            weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
            (out.sum() + (weights * (out.log_probs[:, 1] - out.log_probs[:, 0])).sum()).backward()
        return {n: p.grad for n, p in bnn.named_parameters()}

    new, old = step(False), step(True)
    for name in new:
        torch.testing.assert_close(new[name], old[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("shape", [(7, 5), (BLOCK // 2 + 3, 3), (4, BLOCK // 3 + 1)])
@pytest.mark.parametrize("loc", ["tensor", 0.25])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("path", ["recover", "regenerate"])
def test_closed_form_prior_term_equals_autograd(shape, loc, threads, path):
    # The same gradient weight on every sample's quad (as ELBOLoss's mean over samples): the draw's
    # backward takes the prior term from the sums it kept, with and without a weight gradient.
    torch.manual_seed(0)
    with torch_threads(threads):
        mean = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        rho = torch.randn(shape, dtype=torch.float64).sub_(2)
        if path == "regenerate":
            rho.view(-1)[-1] = -30.0
        rho.requires_grad_()
        lc = torch.randn(shape, dtype=torch.float64) if loc == "tensor" else loc
        n = 4
        for with_w in (True, False):
            g_out = torch.randn(n, *shape, dtype=torch.float64) if with_w else torch.zeros(n, *shape, dtype=torch.float64)
            w, quad, sq, log_std = meanfield_draw(mean, rho, lc, n, torch.Generator().manual_seed(5))
            loss = 0.3 * quad.mean() + 0.7 * log_std + ((w * g_out).sum() if with_w else 0)
            gm, gr = torch.autograd.grad(loss, (mean, rho))
            eps = standard_normal((n, *shape), torch.float64, torch.device("cpu"), torch.Generator().manual_seed(5))
            std = torch.nn.functional.softplus(rho)
            w2 = torch.addcmul(mean, std, eps)
            loss2 = 0.3 * (w2 - lc).square().sum(tuple(range(1, w2.dim()))).mean() + 0.7 * std.log().sum()
            loss2 = loss2 + (w2 * g_out).sum()
            gm2, gr2 = torch.autograd.grad(loss2, (mean, rho))
            torch.testing.assert_close(gm, gm2)
            torch.testing.assert_close(gr, gr2)


def test_training_samples_reuse_memory_nothing_holds():
    torch.manual_seed(0)
    mean = torch.randn(300, 400, requires_grad=True)
    rho = torch.full((300, 400), -5.0, requires_grad=True)

    def draw() -> torch.Tensor:
        return meanfield_draw(mean, rho, None, 3, torch.Generator().manual_seed(2))[0]

    w = draw()
    ptr, values = w.data_ptr(), w.detach().clone()
    w.sum().backward()
    held = draw()  # the first sample is still referenced (w): fresh memory
    assert held.data_ptr() != ptr
    del w
    again = draw()
    assert again.data_ptr() == ptr and torch.equal(again, values)  # the same draw, in the freed memory
    again.sum().backward()
    with _previous_path(True):
        assert draw().data_ptr() not in (ptr, held.data_ptr())  # POOL_TRAINING_DRAWS off: fresh memory


def test_a_detached_or_modified_sample_is_not_fused():
    mean = torch.randn(6, 4, requires_grad=True)
    rho = torch.full((6, 4), -3.0, requires_grad=True)
    w = meanfield_draw(mean, rho, None, 2, torch.Generator().manual_seed(0))[0]
    assert _normal.drawn_sample(w) is not None
    assert _normal.drawn_sample(w.detach()) is None and _normal.drawn_sample(w[0]) is None
    w.mul_(1.0)
    assert _normal.drawn_sample(w) is None  # written in place: its values are no longer the draw's


# --- trimmed convolution kernels of training draws (bayesify._batched._DrawnKeptTaps) ---------------

#: The trimming geometries of tests/test_autotune.py: (H, W, kernel, stride, padding, dilation, kept taps).
TRIMS = [(1, 1, 3, 1, 1, 1, (1, 1)), (2, 2, 3, 2, 1, 1, (2, 2)), (1, 1, 3, 1, 2, 2, (1, 1)), (2, 2, 3, 1, 1, 1, (3, 3)),
         (1, 3, (3, 3), 1, 1, 1, (1, 3)), (1, 1, 5, 1, 2, 1, (1, 1)), (2, 3, 5, 2, (2, 1), 1, (2, 3)),
         (4, 4, 3, 2, 1, 1, (3, 3)), (2, 2, 3, 1, 2, 2, (1, 1))]

#: (name, call kwargs, ELBO kwargs): the defaults, no log densities with the analytic KL, recomputed samples.
DRAWN_TAPS_VARIANTS = [("default", {}, {}), ("log_probs off, analytic KL", {"log_probs": False}, {"kl": "analytic"}),
                       ("recompute", {"recompute_samples": True}, {})]


def _conv_step(build: Callable[[], nn.Module], shape: tuple, call: dict, elbo: dict, drawn_taps: bool,
               samples: int = 3) -> tuple[torch.Tensor, Any, dict[str, torch.Tensor], torch.Tensor, list]:
    """One ELBO step of ``build()`` in float64 with ``_batched.DRAWN_KEPT_TAPS`` set; also which kernels
    went through :class:`_batched._DrawnKeptTaps` (their shapes)."""
    torch.manual_seed(0)
    bnn = bf.bayesify(build().double()).train()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (shape[0],))
    fired: list = []
    was, apply = _batched.DRAWN_KEPT_TAPS, _batched._DrawnKeptTaps.apply
    _batched.DRAWN_KEPT_TAPS = drawn_taps
    _batched._DrawnKeptTaps.apply = lambda *a: fired.append(tuple(a[0].shape)) or apply(*a)
    try:
        out = bnn(x, samples=samples, generator=torch.Generator().manual_seed(3), **call)
        bf.ELBOLoss("categorical", dataset_size=50, **elbo)(out, y).backward()
    finally:
        _batched.DRAWN_KEPT_TAPS, _batched._DrawnKeptTaps.apply = was, apply
    lp = out.log_probs
    return out.detach(), None if lp is None else lp.detach(), {n: p.grad for n, p in bnn.named_parameters()}, \
        x.grad, fired


def _assert_same_step(new: tuple, old: tuple) -> None:
    out, lp, grads, gx, _ = new
    out0, lp0, grads0, gx0, _ = old
    assert torch.equal(out, out0)  # the same kept taps, the same kernels: bit for bit
    assert (lp is None and lp0 is None) or torch.equal(lp, lp0)
    assert grads.keys() == grads0.keys()
    for name in grads:
        assert grads[name] is not None and grads0[name] is not None, name
        torch.testing.assert_close(grads[name], grads0[name], rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(gx, gx0, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("variant", DRAWN_TAPS_VARIANTS, ids=[v[0] for v in DRAWN_TAPS_VARIANTS])
@pytest.mark.parametrize("trim", TRIMS)
def test_drawn_kept_taps_step_equals_the_kept_taps_path(monkeypatch, trim, variant):
    """A convolution whose kernel is trimmed to the taps that meet real input: with the draw's mean / rho
    gradients from the kept taps alone (the dropped taps' gradient only from the draw's log-density
    terms) the same outputs, log densities and every gradient (mean, rho, biases, input) as through the
    full-size gradient into the draw's backward."""
    h, w_, k, stride, padding, dilation, _ = trim
    monkeypatch.setattr(_batched, "TRIM_MAX_KEPT_INVERSE", 1)  # trim whatever can be trimmed
    _, call, elbo = variant

    def build() -> nn.Module:
        conv = nn.Conv2d(4, 5, k, stride, padding, dilation)
        ho, wo = _batched._output_size((h, w_), _batched._pair(k), *(_batched._pair(v) for v in (stride, padding, dilation)))
        return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(5 * ho * wo, 3))

    new = _conv_step(build, (2, 4, h, w_), call, elbo, True)
    kh, kw = _batched._pair(k)
    assert new[4] == [(3, 5, 4, kh, kw)]  # (also where every tap is kept, the limit being 1 here)
    old = _conv_step(build, (2, 4, h, w_), call, elbo, False)
    assert old[4] == []
    _assert_same_step(new, old)


@pytest.mark.parametrize("variant", DRAWN_TAPS_VARIANTS, ids=[v[0] for v in DRAWN_TAPS_VARIANTS])
def test_resnet18_step_with_drawn_kept_taps_equals_the_kept_taps_path(variant):
    """A whole torchvision ResNet-18 ELBO step at 32x32 (layer4's three 3x3 convolutions on 1x1 maps:
    their centre taps): the same outputs and every gradient as through the draw's backward over all taps."""
    torchvision = pytest.importorskip("torchvision")
    _, call, elbo = variant

    def build() -> nn.Module:
        return torchvision.models.resnet18(num_classes=3)

    new = _conv_step(build, (2, 3, 32, 32), call, elbo, True, samples=2)
    assert new[4] == [(2, 512, 512, 3, 3)] * 3
    old = _conv_step(build, (2, 3, 32, 32), call, elbo, False, samples=2)
    assert old[4] == []
    _assert_same_step(new, old)
