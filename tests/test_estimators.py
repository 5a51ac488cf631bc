"""The in-layer estimators ("local", "flipout") against the reparameterisation estimator.

Same predictive mean and variance per output over many samples (fixed inputs, fixed
generators), ELBO training with every gradient finite, no ``(samples, vocab, dim)``
tensor for embeddings, and the sampled forward under ``torch.compile``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bayesify as bf
from bayesify.variational import MeanFieldNormal, PointMass

from .watch import LargestTensor


N = 4000  # samples for the moment comparisons
Q = MeanFieldNormal(init_std=0.3)  # a wide posterior, so the variances are far from zero


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(5))


def _tokens(*shape: int, high: int) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(6))


# (id, VI class, args, kwargs, input)
LAYERS = [
    ("linear", bf.nn.VILinear, (5, 4), {}, lambda: _x(3, 5)),
    ("linear-nobias-3d", bf.nn.VILinear, (5, 4), {"bias": False}, lambda: _x(2, 3, 5)),
    ("conv1d", bf.nn.VIConv1d, (2, 3, 3), {"padding": 1}, lambda: _x(2, 2, 6)),
    ("conv2d-groups-stride", bf.nn.VIConv2d, (4, 4, 3), {"groups": 2, "stride": 2}, lambda: _x(2, 4, 5, 5)),
    ("conv2d-reflect", bf.nn.VIConv2d, (2, 3, 3), {"padding": 1, "padding_mode": "reflect"},
     lambda: _x(1, 2, 4, 4)),
    ("conv3d", bf.nn.VIConv3d, (2, 2, 2), {}, lambda: _x(1, 2, 3, 3, 3)),
    ("convtranspose1d", bf.nn.VIConvTranspose1d, (2, 3, 3), {"stride": 2}, lambda: _x(2, 2, 4)),
    ("convtranspose2d", bf.nn.VIConvTranspose2d, (2, 2, 2), {"output_padding": 1, "stride": 2},
     lambda: _x(1, 2, 3, 3)),
    ("convtranspose3d", bf.nn.VIConvTranspose3d, (2, 1, 2), {}, lambda: _x(1, 2, 2, 2, 2)),
    ("layernorm", bf.nn.VILayerNorm, (6,), {}, lambda: _x(3, 6)),
    ("embedding-padding", bf.nn.VIEmbedding, (12, 4), {"padding_idx": 0},
     lambda: torch.tensor([[1, 2, 1], [0, 11, 3]])),
]


def _layer(cls, args, kwargs, estimator, variational=Q):
    torch.manual_seed(0)  # same means for every estimator
    layer = cls(*args, variational=variational, estimator=estimator, **kwargs)
    with torch.no_grad():  # move the means away from their init, and spread the stds
        for name, p in layer.named_parameters():
            p.add_(0.3 * torch.randn_like(p)) if not name.endswith("_rho") else p.add_(torch.rand_like(p) - 0.5)
    return layer.eval()


def _moments(module, x, seed):
    with torch.no_grad():
        out = module(x, samples=N, generator=torch.Generator().manual_seed(seed))
    return out.mean(0), out.var(0)


def _assert_same_moments(m1, v1, m2, v2):
    # Mean: within 6 standard errors. Variance: the sample variance has relative sd ~sqrt(2/N)
    # (2.2% at N=4000) for Gaussian outputs; allow 6 of those per estimate.
    se = ((v1 + v2) / N).sqrt()
    assert ((m1 - m2).abs() <= 6 * se + 1e-5).all(), ((m1 - m2).abs() / se).max()
    rel = 6 * math.sqrt(2 / N) * 2
    assert ((v1 - v2).abs() <= rel * (v1 + v2) / 2 + 1e-6).all(), ((v1 - v2).abs() / ((v1 + v2) / 2)).max()


@pytest.mark.parametrize("estimator", ["local", "flipout"])
@pytest.mark.parametrize("case", LAYERS, ids=[c[0] for c in LAYERS])
def test_layer_moments_match_reparam(case, estimator):
    _, cls, args, kwargs, make_x = case
    x = make_x()
    ref = _moments(_layer(cls, args, kwargs, "reparam"), x, seed=1)
    got = _moments(_layer(cls, args, kwargs, estimator), x, seed=2)
    assert got[0].shape == ref[0].shape
    assert (ref[1] > 1e-3).any()  # the comparison is not vacuous
    _assert_same_moments(*got, *ref)


def _mlp(estimator, variational=Q):
    torch.manual_seed(0)
    point = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    return bf.bayesify(point, variational=variational, estimator=estimator).eval()


def _cnn(estimator, variational=Q):
    torch.manual_seed(0)
    point = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                          nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    return bf.bayesify(point, variational=variational, estimator=estimator).eval()


@pytest.mark.parametrize("estimator", ["local", "flipout"])
@pytest.mark.parametrize("build,x", [(_mlp, lambda: _x(5, 6)), (_cnn, lambda: _x(2, 2, 5, 5))], ids=["mlp", "cnn"])
def test_model_predictive_matches_reparam(build, x, estimator):
    # Through nonlinearities the predictive distribution is not Gaussian, but its per-output
    # mean and variance are the same whichever unbiased estimator draws it.
    inputs = x()
    m_ref, v_ref = _moments(build("reparam"), inputs, seed=3)
    m, v = _moments(build(estimator), inputs, seed=4)
    se = ((v + v_ref) / N).sqrt()
    assert ((m - m_ref).abs() <= 6 * se + 1e-5).all()
    # Heavier tails than Gaussian through the network: a looser variance band.
    assert ((v - v_ref).abs() <= 0.25 * (v + v_ref) / 2 + 1e-6).all()


@pytest.mark.parametrize("estimator", ["local", "flipout"])
def test_flipout_and_local_decorrelate_examples(estimator):
    # Two copies of one input: reparam gives them the same weights (identical outputs per
    # sample); local/flipout draw independently per example.
    layer = _layer(bf.nn.VILinear, (4, 3), {}, estimator)
    x = _x(1, 4).expand(2, 4)
    out = layer(x, samples=200, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(out[:, 0], out[:, 1])
    same = _layer(bf.nn.VILinear, (4, 3), {}, "reparam")(x, samples=5)
    assert torch.equal(same[:, 0], same[:, 1])


@pytest.mark.parametrize("estimator", ["local", "flipout"])
def test_outside_sampling_uses_the_means(estimator):
    # A layer's own forward, run outside a sampled call, adds no noise.
    for cls, args, kwargs, x in [(bf.nn.VILinear, (6, 3), {}, _x(4, 6)),
                                 (bf.nn.VIConv2d, (2, 3, 3), {}, _x(1, 2, 5, 5)),
                                 (bf.nn.VILayerNorm, (6,), {}, _x(4, 6)),
                                 (bf.nn.VIEmbedding, (7, 3), {}, _tokens(4, high=7))]:
        layer = _layer(cls, args, kwargs, estimator)
        torch.testing.assert_close(layer.forward(x), layer.to_point()(x), rtol=0, atol=0)


@pytest.mark.parametrize("estimator", ["local", "flipout"])
@pytest.mark.parametrize("build,x", [(_mlp, lambda: _x(5, 6)), (_cnn, lambda: _x(2, 2, 5, 5))], ids=["mlp", "cnn"])
def test_pointmass_reproduces_the_point_model(build, x, estimator):
    bnn = build(estimator, variational=PointMass())
    inputs = x()
    out = bnn(inputs, samples=3)
    ref = bnn.to_point()(inputs)
    for s in range(3):
        torch.testing.assert_close(out[s], ref, rtol=0, atol=0)


@pytest.mark.parametrize("estimator", ["local", "flipout"])
def test_generator_makes_in_layer_noise_reproducible(estimator):
    bnn = _cnn(estimator)
    x = _x(2, 2, 5, 5)
    a = bnn(x, samples=4, generator=torch.Generator().manual_seed(9))
    b = bnn(x, samples=4, generator=torch.Generator().manual_seed(9))
    c = bnn(x, samples=4, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("estimator", ["local", "flipout"])
def test_convtranspose_output_size(estimator):
    layer = _layer(bf.nn.VIConvTranspose2d, (2, 3, 3), {"stride": 2}, estimator)
    x = _x(1, 2, 4, 4)
    out = layer(x, samples=2, output_size=[10, 10])
    assert out.shape == (2, 1, 3, 10, 10)
    assert out.shape[1:] == layer.to_point()(x, output_size=[10, 10]).shape


# --- the ELBO trains ------------------------------------------------------------------------


@pytest.mark.parametrize("kl", ["mc", "analytic"])
@pytest.mark.parametrize("estimator", ["local", "flipout"])
def test_elbo_trains_with_finite_grads(estimator, kl):
    torch.manual_seed(0)
    point = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 8),
                          nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    bnn = bf.bayesify(point, variational=MeanFieldNormal(init_std=0.05), estimator=estimator).train()
    x, y = _x(16, 2, 6), _tokens(16, high=3)
    loss_fn = bf.ELBOLoss("categorical", dataset_size=100, kl=kl)
    opt = torch.optim.Adam(bnn.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(25):
        out = bnn(x, samples=4, generator=gen)
        # No weight is sampled: the KL is the analytic one carried by the output.
        assert torch.equal(out.log_probs, torch.zeros(4, 2))
        assert out.kl_analytic > 0
        loss = loss_fn(out, y)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, p in bnn.named_parameters():
                assert p.grad is not None, name
                assert torch.isfinite(p.grad).all(), name
                if name.endswith("_rho"):
                    assert p.grad.abs().sum() > 0, name  # the std learns (noise + KL)
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5])


def test_elbo_mc_kl_equals_analytic_for_in_layer_estimators():
    bnn = _mlp("local").train()
    out = bnn(_x(5, 6), samples=3)
    mc = bf.ELBOLoss("categorical", dataset_size=1, kl="mc").kl_term(out)
    analytic = bf.ELBOLoss("categorical", dataset_size=1, kl="analytic").kl_term(out)
    torch.testing.assert_close(mc, analytic)


def test_zero_input_gives_finite_local_grads():
    # The output variance is exactly 0 where input and bias are 0: the sqrt must not give NaNs.
    layer = bf.nn.VILinear(3, 2, bias=False, variational=Q, estimator="local").train()
    out = layer(torch.zeros(4, 3), samples=2)
    (out.sum() + bf.ELBOLoss("normal", dataset_size=1).kl_term(out)).backward()
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(layer.weight_rho.grad).all()


# --- embeddings: only the looked-up rows ------------------------------------------------------


@pytest.mark.parametrize("estimator", ["reparam", "local", "flipout"])
def test_embedding_never_materialises_per_sample_tables(estimator):
    vocab, dim, samples = 5000, 16, 8
    emb = bf.nn.VIEmbedding(vocab, dim, estimator=estimator).train()
    idx = _tokens(2, 7, high=vocab)
    with LargestTensor() as watch:
        out = emb(idx, samples=samples)
        (out.sum() + bf.ELBOLoss("normal", dataset_size=1).kl_term(out)).backward()
    assert out.shape == (samples, 2, 7, dim)
    assert watch.largest < samples * vocab * dim  # the reparam path allocates exactly that
    assert watch.largest <= vocab * dim  # the mean / rho tables and their grads, nothing bigger
    assert emb.weight_rho.grad is not None and torch.isfinite(emb.weight_rho.grad).all()


def test_embedding_whole_table_draw_is_visible_to_the_watch():
    # The watch above can see a (samples, vocab, dim) tensor when there is one: a prior
    # without the closed-form shortcut makes the sampler draw the whole table.
    vocab, dim, samples = 500, 4, 3
    emb = bf.nn.VIEmbedding(vocab, dim, prior=bf.priors.Laplace(0.0, 1.0)).train()
    with LargestTensor() as watch:
        emb(_tokens(2, 3, high=vocab), samples=samples)
    assert watch.largest >= samples * vocab * dim


def test_embedding_rows_are_per_sample_weights(monkeypatch):
    # Drawing only the looked-up rows is the same model as drawing the table: a repeated
    # token gets the same row within a sample, and every output has the moments of the
    # whole-table draw (forced here by switching the row path off).
    layer = _layer(bf.nn.VIEmbedding, (12, 4), {"padding_idx": 0}, "reparam")
    x = torch.tensor([[1, 2, 1], [0, 11, 3]])
    out = layer(x, samples=50)
    assert torch.equal(out[:, 0, 0], out[:, 0, 2]) and not torch.equal(out[0, 0, 0], out[1, 0, 0])
    rows = _moments(layer, x, seed=1)
    monkeypatch.setattr(bf.nn.VIEmbedding, "_rows_sampled", lambda self: False)
    whole = _moments(layer, x, seed=2)
    _assert_same_moments(*rows, *whole)


def test_embedding_rows_use_the_analytic_kl_and_tied_tables_are_drawn_whole():
    emb = bf.nn.VIEmbedding(30, 4).train()
    out = emb(torch.tensor([[1, 2]]), samples=3)
    assert torch.equal(out.log_probs, torch.zeros(3, 2))  # nothing drawn by the sampler
    torch.testing.assert_close(out.kl_analytic, emb.kl_divergence())
    # Tied to a linear head (GPT-2 style): the head needs the whole table, so it is drawn.
    model = bf.bayesify(_TiedLM())
    out = model(torch.tensor([[1, 2, 3]]), samples=4)
    assert out.log_probs.abs().sum() > 0
    assert out.shape == (4, 1, 3, 30)


class _TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 4)
        self.head = nn.Linear(4, 30, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


# --- torch.compile ----------------------------------------------------------------------------


class _Mixed(bf.VIModule):
    """One layer per estimator: a single compiled graph covers the sampler and both in-layer paths."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = bf.nn.VILinear.from_point(nn.Linear(6, 8), variational=Q, estimator="reparam")
        self.b = bf.nn.VILinear.from_point(nn.Linear(8, 8), variational=Q, estimator="local")
        self.c = bf.nn.VILinear.from_point(nn.Linear(8, 3), variational=Q, estimator="flipout")

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.tanh(self.a(x)))))


def test_sampled_forward_under_torch_compile():
    # backend="aot_eager": dynamo traces the whole sampled call (sampler, custom autograd
    # Function, vmap, in-layer noise) and AOTAutograd builds forward and backward graphs;
    # inductor's C++ codegen only adds minutes of gcc time on a 2-core box (the slow test below).
    torch._dynamo.reset()
    bnn = _Mixed().train()
    x = _x(4, 6)
    eager = bnn(x, samples=3, generator=torch.Generator().manual_seed(1))
    eager_grads = torch.autograd.grad(eager.sum() + eager.log_probs.sum() + eager.kl_analytic,
                                      list(bnn.parameters()))
    compiled = torch.compile(bnn, backend="aot_eager")
    out = compiled(x, samples=3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    torch.testing.assert_close(out.log_probs, eager.log_probs)
    torch.testing.assert_close(out.kl_analytic, eager.kl_analytic)
    grads = torch.autograd.grad(out.sum() + out.log_probs.sum() + out.kl_analytic, list(bnn.parameters()))
    for g, ref in zip(grads, eager_grads):
        torch.testing.assert_close(g, ref)


@pytest.mark.slow
def test_sampled_forward_under_inductor():
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    bnn = _mlp("local").eval()
    x = _x(4, 6)
    eager = bnn(x, samples=3, generator=torch.Generator().manual_seed(1))
    # Inductor draws random numbers with its own generator unless told to call aten's.
    with inductor_config.patch(fallback_random=True):
        out = torch.compile(bnn)(x, samples=3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, eager)


# --- the sampler's path for the default pair (the kernel itself: tests/test_normal.py) ---------


def test_sampler_log_probs_equal_the_families_own():
    # The fast path's log prior / log q against MeanFieldNormal.sample + Normal.log_prob,
    # with the same generator (so the same eps), pretrained-centred prior.
    torch.manual_seed(0)
    bnn = bf.bayesify(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)), variational=Q).train()
    weights, log_p, log_q, _ = bnn._draw(4, torch.Generator().manual_seed(3), True)
    g = torch.Generator().manual_seed(3)
    ref_p = ref_q = 0
    for site in bnn.bayesian_sites():
        w, lq = site.spec.variational.sample(site.mean, site.vparams(), 4, g)
        assert torch.equal(w, weights[site.qualname])
        ref_q = ref_q + lq
        ref_p = ref_p + site.spec.prior.log_prob(w, site.pbuffers()).reshape(4, -1).sum(1)
    torch.testing.assert_close(log_p, ref_p)
    torch.testing.assert_close(log_q, ref_q)
