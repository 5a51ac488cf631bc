"""``recompute_samples=True``: no weight sample is kept for backward, backward draws it again.

Invariants: the same outputs, log densities and gradients as the default (bit for bit
where each weight is used in one module call); the samples are freed when the forward is done; a
retained graph backpropagates twice; in-place changes between forward and backward are
errors, as autograd's own check makes them without the hooks.
"""

from __future__ import annotations

import gc
import weakref
from collections import Counter
from contextlib import nullcontext

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bayesify as bf
import bayesify._normal as normal

from .models import CASES, first


def _loss(out, scale: float = 1e-3) -> torch.Tensor:
    y = first(out)
    return (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum() + scale * y.log_probs.sum()


def _run(bnn, args, kw, **opts):
    bnn.zero_grad(set_to_none=True)
    out = bnn(*args, samples=3, generator=torch.Generator().manual_seed(5), **kw, **opts)
    _loss(out).backward()
    grads = {n: p.grad.clone() for n, p in bnn.named_parameters() if p.grad is not None}
    return first(out).detach(), first(out).log_probs.detach(), grads


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_recompute_matches_default(case):
    torch.manual_seed(0)
    bnn = bf.bayesify(case.build())
    bnn.train()
    torch.manual_seed(1)
    args, kw = case.inputs()
    with pytest.warns(RuntimeWarning, match="one by one") if not case.vmap else nullcontext():
        ref = _run(bnn, args, kw)
        got = _run(bnn, args, kw, recompute_samples=True)
    assert torch.equal(ref[0], got[0])
    assert torch.equal(ref[1], got[1])
    assert ref[2].keys() == got[2].keys() and ref[2]
    reused = {f"model.{n}{rho}" for n in _reused_parameters(case, args, kw) for rho in ("", "_rho")}
    for name in ref[2].keys() - reused:
        # Bit for bit, also for a weight whose metadata the forward reads before using it (T5's
        # layer norms and ``wo`` check ``self.weight.dtype``): that read's draw goes unused, the
        # weight's whole gradient goes through the draw the forward computes with.
        assert torch.equal(got[2][name], ref[2][name]), name
    for name in ref[2].keys() & reused:
        # A weight used in several module calls (T5's and GPT-2's tied embedding / LM head, a
        # module called twice) is drawn again for each use after the previous sample was dropped
        # (the same values); its gradient arrives in parts, one per draw, that float32 sums in
        # another order. That rounding is a few ulp of the summands dL/dw_s, scaled here by
        # S = max |dL/dmean|; for rho, backward's eps = (w - mean) / std and the softplus chain
        # multiply it by (|mean| / std + |eps|) * sigmoid(rho), |eps| < 4. Measured: at most
        # 1.02 of eps32 * S (* that factor) over GPT-2, T5 and shared_and_raw; 8 of them is
        # still far below what another draw (a real bug) would change.
        mean_name = name.removesuffix("_rho")
        r, g = ref[2][name], got[2][name]
        ulp = torch.finfo(r.dtype).eps * ref[2][mean_name].abs().max()
        if name != mean_name:
            params = dict(bnn.named_parameters())
            mean, rho = params[mean_name].detach(), params[name].detach()
            ulp = ulp * (mean.abs() / F.softplus(rho) + 4) * torch.sigmoid(rho)
        assert ((g - r).abs() <= 8 * ulp).all(), (name, float(((g - r).abs() / ulp).max()))


def _reused_parameters(case, args, kw) -> set[str]:
    """Names of the point model's parameters that its forward uses in more than one module call."""
    model = case.build()
    calls: Counter = Counter()
    hooks = [m.register_forward_pre_hook(lambda m, _: calls.update([id(m)])) for m in model.modules()]
    with torch.no_grad():
        model(*args, **kw)
    for h in hooks:
        h.remove()
    uses: Counter = Counter()
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                uses[id(p)] += calls[id(m)]
    return {n for n, p in model.named_parameters() if uses[id(p)] > 1}


def _track_samples(monkeypatch) -> list[weakref.ref]:
    """Weak references to every weight sample drawn with gradients (the draw's own output)."""
    refs: list[weakref.ref] = []
    forward = normal._MeanFieldDraw.forward

    def recording(ctx, *args):
        out = forward(ctx, *args)
        refs.append(weakref.ref(out[0]))
        return out

    monkeypatch.setattr(normal._MeanFieldDraw, "forward", staticmethod(recording))
    return refs


@pytest.mark.parametrize("recompute", [False, True])
def test_no_sample_outlives_the_forward(monkeypatch, recompute):
    torch.manual_seed(0)
    bnn = bf.bayesify(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)))
    refs = _track_samples(monkeypatch)
    out = bnn(torch.randn(5, 6), samples=4, recompute_samples=recompute)
    gc.collect()
    assert len(refs) == 4  # two weights, two biases
    alive = [r() is not None for r in refs]
    # Without recompute autograd keeps the second weight's samples (F.linear needs it for the
    # input gradient); with it, no sample is kept: backward draws them again.
    assert alive[2] is not recompute and not any(alive[:2]) and not alive[3]
    out.sum().backward()
    assert all(p.grad is not None for p in bnn.parameters() if p.requires_grad)


def test_minilm_forward_keeps_no_sample(monkeypatch):
    from .models import _minilm

    bnn = bf.bayesify(_minilm())
    refs = _track_samples(monkeypatch)
    ids = torch.randint(1000, 2000, (2, 8))
    out = bnn(input_ids=ids, samples=2, recompute_samples=True)
    gc.collect()
    assert len(refs) > 90 and not any(r() is not None and r().dim() > 2 for r in refs)
    out.last_hidden_state.sum().backward()


def test_retained_graph_backpropagates_twice():
    torch.manual_seed(0)
    bnn = bf.bayesify(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)))
    out = bnn(torch.randn(5, 6), samples=4, generator=torch.Generator().manual_seed(2), recompute_samples=True)
    loss = _loss(out)
    loss.backward(retain_graph=True)
    once = {n: p.grad.clone() for n, p in bnn.named_parameters()}
    loss.backward()
    for n, p in bnn.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[n])


def test_chunked_recompute_matches_chunked_default():
    torch.manual_seed(0)
    bnn = bf.bayesify(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)))
    x = torch.randn(5, 6)
    ref = _run(bnn, (x,), {}, chunk_size=2)
    got = _run(bnn, (x,), {}, recompute_samples=True, chunk_size=2)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    assert all(torch.equal(got[2][name], ref[2][name]) for name in ref[2])
    unchunked = _run(bnn, (x,), {}, recompute_samples=True)
    assert torch.equal(unchunked[0], got[0])  # the same samples, drawn chunk by chunk


def test_parameters_changed_before_backward_is_an_error():
    torch.manual_seed(0)
    bnn = bf.bayesify(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)))
    out = bnn(torch.randn(5, 6), samples=4, recompute_samples=True)
    with torch.no_grad():
        bnn.model[2].weight_rho.add_(0.1)
    with pytest.raises(RuntimeError, match="modified in\\s+place"):
        out.sum().backward()


class _InplaceAfterSave(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sigmoid(self.fc(x))  # sigmoid keeps its output for backward
        y.mul_(2)  # ... which this changes: autograd refuses the backward
        return y


@pytest.mark.parametrize("recompute", [False, True])
def test_inplace_change_of_a_saved_tensor_is_still_caught(recompute):
    bnn = bf.bayesify(_InplaceAfterSave())
    out = bnn(torch.randn(3, 4), samples=2, recompute_samples=recompute)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_eval_and_no_grad_ignore_recompute():
    torch.manual_seed(0)
    bnn = bf.bayesify(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)))
    x = torch.randn(5, 6)
    with torch.no_grad():
        a = bnn(x, samples=4, generator=torch.Generator().manual_seed(2))
        b = bnn(x, samples=4, generator=torch.Generator().manual_seed(2), recompute_samples=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_recompute_samples_is_a_type_error(bad):
    bnn = bf.bayesify(nn.Linear(3, 2))
    with pytest.raises(TypeError, match="recompute_samples must be True or False"):
        bnn(torch.randn(2, 3), recompute_samples=bad)


def test_inner_module_rejects_recompute_samples():
    class Outer(bf.VIModule):
        def __init__(self) -> None:
            super().__init__()
            self.inner = bf.nn.VILinear(3, 2)

        def forward(self, x):
            return self.inner(x, recompute_samples=True)

    with pytest.raises(ValueError, match="outermost VIModule"):
        Outer()(torch.randn(2, 3), samples=2)


def test_recompute_under_torch_compile_runs_the_sampled_call_eagerly():
    # Dynamo reads a module's parameters from its ``_parameters`` dict directly: a compiled
    # draw-at-use forward computed with the means (outputs and gradients wrong). The
    # recompute path is excluded from compilation, so it gives the eager result.
    torch._dynamo.reset()
    torch.manual_seed(0)
    bnn = bf.bayesify(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)),
                      variational=bf.variational.MeanFieldNormal(init_std=0.05)).train()
    x = torch.randn(4, 6)
    eager = bnn(x, samples=3, generator=torch.Generator().manual_seed(1))
    ref = torch.autograd.grad(eager.sum() + eager.log_probs.sum(), list(bnn.parameters()))
    out = torch.compile(bnn, backend="aot_eager")(x, samples=3, generator=torch.Generator().manual_seed(1),
                                                  recompute_samples=True)
    assert torch.equal(out, eager) and torch.equal(out.log_probs, eager.log_probs)
    grads = torch.autograd.grad(out.sum() + out.log_probs.sum(), list(bnn.parameters()))
    assert all(torch.equal(g, r) for g, r in zip(grads, ref))


@pytest.mark.parametrize("kw", [dict(estimator="local"), dict(estimator="flipout"), dict(prior="laplace"),
                                dict(variational="pointmass")], ids=lambda kw: "-".join(map(str, kw.values())))
def test_recompute_with_other_estimators_priors_and_families(kw):
    # In-layer sampling (local, Flipout, embedding rows), the generic prior path and a
    # deterministic family: nothing to recompute there, the same result either way.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 6), nn.Flatten(), nn.Linear(18, 8), nn.Tanh(), nn.LayerNorm(8),
                          nn.Linear(8, 3))
    bnn = bf.bayesify(model, **kw).train()
    x = torch.randint(0, 20, (5, 3))
    res = []
    for recompute in (False, True):
        bnn.zero_grad(set_to_none=True)
        out = bnn(x, samples=4, generator=torch.Generator().manual_seed(3), recompute_samples=recompute)
        (out.square().mean() + 1e-3 * out.log_probs.sum() + 1e-3 * out.kl_analytic).backward()
        res.append((out.detach(), {n: p.grad.clone() for n, p in bnn.named_parameters() if p.grad is not None}))
    (out_a, grads_a), (out_b, grads_b) = res
    assert torch.equal(out_a, out_b) and grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
