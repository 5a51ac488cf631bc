"""Priors and variational families: densities, moments, KL, shortcuts, argument checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import distributions as D

import bayesify as bf
from bayesify.priors import Flat, Laplace, Normal, ScaleMixtureNormal, StudentT, get_prior
from bayesify.sites import analytic_kl, iter_sites
from bayesify.variational import MeanFieldNormal, PointMass, get_variational, inverse_softplus
from tests.models import torch_threads

N_MC = 200_000  # draws for moment checks (elementwise over a small tensor)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_mean_within(samples: torch.Tensor, expected: torch.Tensor | float, n_se: float = 5.0) -> None:
    """Sample mean (over dim 0) within ``n_se`` standard errors of ``expected``, elementwise."""
    se = samples.std(0) / math.sqrt(samples.shape[0])
    err = (samples.mean(0) - expected).abs()
    assert bool((err <= n_se * se + 1e-12).all()), f"mean error {err.max():.4g} > {n_se} SE ({se.max():.4g})"


# --------------------------------------------------------------------------------------
# Priors: torch.distributions equivalence, moments
# --------------------------------------------------------------------------------------

POINT = torch.tensor([[0.3, -1.2, 2.0], [0.0, 0.7, -0.4]])

# (prior, analytic mean, analytic variance) for the point tensor above (None where undefined)
PRIOR_CASES = [
    pytest.param(Normal(0.0, 1.0), 0.0, 1.0, id="normal-std"),
    pytest.param(Normal(0.5, 0.2), 0.5, 0.04, id="normal-shifted"),
    pytest.param(Normal("pretrained", 0.3), POINT, 0.09, id="normal-pretrained"),
    pytest.param(Laplace(0.0, 0.5), 0.0, 2 * 0.25, id="laplace"),
    pytest.param(Laplace("pretrained", 1.5), POINT, 2 * 2.25, id="laplace-pretrained"),
    pytest.param(StudentT(5.0, 0.0, 2.0), 0.0, 4.0 * 5.0 / 3.0, id="studentt-df5"),
    pytest.param(StudentT(7.0, "pretrained", 1.0), POINT, 7.0 / 5.0, id="studentt-pretrained"),
    pytest.param(StudentT(1.5, 0.0, 1.0), 0.0, None, id="studentt-infinite-var"),
    pytest.param(ScaleMixtureNormal(0.3, 1.0, 0.1), 0.0, 0.3 * 1.0 + 0.7 * 0.01, id="scalemixture"),
]


@pytest.mark.parametrize("prior, mean, var", PRIOR_CASES)
def test_prior_distribution_moments(prior, mean, var):
    torch.manual_seed(0)
    bufs = prior.init(POINT)
    d = prior.distribution(bufs, POINT)
    assert d.batch_shape == POINT.shape
    x = d.sample((N_MC,))
    assert x.shape == (N_MC, *POINT.shape)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).expand_as(POINT)
    if var is not None:
        # the mean: within 5 standard errors
        _assert_mean_within(x, mean_t)
        # the variance: 5% relative (all cases here have a finite 4th moment, df > 4)
        sv = x.var(0)
        assert torch.allclose(sv, torch.full_like(sv, var), rtol=0.05), (sv, var)
    else:
        # infinite variance: only the median is a stable location statistic
        assert torch.allclose(x.median(0).values, mean_t, atol=0.02)


@pytest.mark.parametrize("prior, mean, var", PRIOR_CASES)
def test_prior_log_prob_matches_torch(prior, mean, var):
    bufs = prior.init(POINT)
    d = prior.distribution(bufs, POINT)
    torch.manual_seed(1)
    # values on a grid, plus samples with a leading sample dimension (broadcasting)
    values = torch.cat([torch.randn(7, *POINT.shape) * 3, d.sample((5,))])
    lp = prior.log_prob(values, bufs)
    assert lp.shape == values.shape
    assert torch.allclose(lp, d.log_prob(values), atol=1e-5, rtol=1e-5)


def test_prior_log_prob_hand_values():
    # independent of torch.distributions: closed forms at one point
    x = torch.tensor([0.7])
    assert torch.allclose(Normal(0.2, 0.5).log_prob(x, {}),
                          torch.tensor([-0.5 - math.log(0.5) - 0.5 * math.log(2 * math.pi)]))
    assert torch.allclose(Laplace(0.2, 0.5).log_prob(x, {}), torch.tensor([-1.0 - math.log(1.0)]))
    # Cauchy = StudentT(df=1)
    assert torch.allclose(StudentT(1.0, 0.0, 1.0).log_prob(x, {}),
                          torch.tensor([-math.log(math.pi * (1 + 0.49))]))
    mix = 0.25 * math.exp(-0.5 * 0.49) / math.sqrt(2 * math.pi) \
        + 0.75 * math.exp(-0.5 * 49.0) / (0.1 * math.sqrt(2 * math.pi))
    assert torch.allclose(ScaleMixtureNormal(0.25, 1.0, 0.1).log_prob(x, {}), torch.tensor([math.log(mix)]))


def test_pretrained_loc_buffers():
    p = Normal("pretrained", 0.1)
    bufs = p.init(POINT)
    assert set(bufs) == {"loc"}
    assert torch.equal(bufs["loc"], POINT)
    assert bufs["loc"].data_ptr() != POINT.data_ptr()  # a copy: training the mean must not move the prior
    # centred on the point weights: maximal at the point, symmetric around it
    lp_at = p.log_prob(POINT, bufs)
    assert torch.allclose(lp_at, torch.full_like(POINT, -math.log(0.1) - 0.5 * math.log(2 * math.pi)))
    assert torch.allclose(p.log_prob(POINT + 0.05, bufs), p.log_prob(POINT - 0.05, bufs))
    # a fixed-loc prior needs no buffers
    assert Normal(0.0, 0.1).init(POINT) == {}
    assert Laplace(1.0, 0.1).init(POINT) == {}
    assert ScaleMixtureNormal().init(POINT) == {}


def test_flat_prior():
    p = Flat()
    v = torch.randn(4, 2, 3)
    assert torch.equal(p.log_prob(v, {}), torch.zeros_like(v))
    with pytest.raises(ValueError, match="closed-form"):
        p.distribution({}, v)


# --------------------------------------------------------------------------------------
# MeanFieldNormal
# --------------------------------------------------------------------------------------


def test_meanfield_init_absolute_std():
    q = MeanFieldNormal(init_std=0.3)
    params = q.init(POINT)
    assert set(params) == {"rho"}
    assert torch.allclose(q.std(POINT, params), torch.full_like(POINT, 0.3))
    assert torch.allclose(F.softplus(params["rho"]), torch.full_like(POINT, 0.3))


def test_meanfield_init_relative_std():
    q = MeanFieldNormal(init_std=0.1, relative=True, min_std=1e-3)
    m = torch.tensor([0.0, 1.0, -2.0, 1e-5, 50.0])
    std = q.std(m, q.init(m))
    assert torch.allclose(std, torch.tensor([1e-3, 0.1, 0.2, 1e-3, 5.0]), rtol=1e-5)


@pytest.mark.parametrize("std", [1e-8, 1e-3, 0.5, 30.0])
def test_inverse_softplus(std):
    x = torch.tensor([std], dtype=torch.float64)
    assert torch.allclose(F.softplus(inverse_softplus(x)), x, rtol=1e-6)


def test_meanfield_sample_moments():
    q = MeanFieldNormal(init_std=0.25)
    mean = torch.tensor([[0.3, -1.2, 2.0], [0.0, 0.7, -0.4]])
    params = q.init(mean)
    params = {"rho": params["rho"] + torch.linspace(-1, 1, 6).reshape(2, 3)}  # different stds
    std = q.std(mean, params)
    w, log_q = q.sample(mean, params, N_MC, _gen(0))
    assert w.shape == (N_MC, 2, 3) and log_q.shape == (N_MC,)
    _assert_mean_within(w, mean)
    assert torch.allclose(w.std(0), std, rtol=0.01)
    # independence across elements (mean field)
    flat = w.reshape(N_MC, -1)
    corr = torch.corrcoef(flat.T) - torch.eye(6)
    assert corr.abs().max() < 0.02


def test_meanfield_log_q_matches_torch():
    q = MeanFieldNormal(init_std=0.2)
    mean = torch.randn(3, 4, dtype=torch.float64)
    params = {"rho": inverse_softplus(torch.rand(3, 4, dtype=torch.float64) + 0.05)}
    w, log_q = q.sample(mean, params, 16, _gen(3))
    ref = D.Normal(mean, q.std(mean, params)).log_prob(w).sum((1, 2))
    assert torch.allclose(log_q, ref, rtol=1e-10, atol=1e-10)
    # elementwise log_prob agrees too
    assert torch.allclose(q.log_prob(w, mean, params), D.Normal(mean, q.std(mean, params)).log_prob(w))
    # and the distribution object
    d = q.distribution(mean, params)
    assert torch.allclose(d.mean, mean) and torch.allclose(d.stddev, q.std(mean, params))


def test_meanfield_sample_is_reparameterised():
    q = MeanFieldNormal(init_std=0.5)
    mean = torch.zeros(5, requires_grad=True)
    params = {"rho": q.init(mean.detach())["rho"].requires_grad_()}
    w, log_q = q.sample(mean, params, 4, _gen(0))
    w.sum().backward()
    assert torch.allclose(mean.grad, torch.full((5,), 4.0))
    assert params["rho"].grad is not None and params["rho"].grad.abs().sum() > 0


def test_meanfield_generator_reproducible():
    q = MeanFieldNormal(init_std=0.5)
    mean = torch.zeros(5)
    params = q.init(mean)
    a, _ = q.sample(mean, params, 3, _gen(7))
    b, _ = q.sample(mean, params, 3, _gen(7))
    c, _ = q.sample(mean, params, 3, _gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------------------
# PointMass
# --------------------------------------------------------------------------------------


def test_pointmass():
    q = PointMass()
    assert q.deterministic
    mean = torch.randn(2, 3, requires_grad=True)
    assert q.init(mean) == {}
    w, log_q = q.sample(mean, {}, 4, _gen(0))
    assert w.shape == (4, 2, 3) and log_q.shape == (4,)
    assert torch.equal(w, mean.detach().expand(4, 2, 3))
    assert torch.equal(log_q, torch.zeros(4))
    assert torch.equal(q.std(mean, {}), torch.zeros(2, 3))
    w.sum().backward()
    assert torch.equal(mean.grad, torch.full((2, 3), 4.0))
    with pytest.raises(ValueError, match="closed-form"):
        q.distribution(mean, {})


# --------------------------------------------------------------------------------------
# KL: analytic vs Monte Carlo
# --------------------------------------------------------------------------------------

KL_PRIORS = [
    pytest.param(Normal(0.0, 1.0), id="normal"),
    pytest.param(Normal(0.3, 0.2), id="normal-narrow"),
    pytest.param(Normal("pretrained", 0.5), id="normal-pretrained"),
    pytest.param(Laplace(0.0, 0.7), id="laplace"),
    pytest.param(Laplace("pretrained", 0.3), id="laplace-pretrained"),
]


@pytest.mark.parametrize("prior", KL_PRIORS)
def test_analytic_kl_matches_monte_carlo(prior):
    torch.manual_seed(0)
    point = torch.randn(4, 3, dtype=torch.float64)
    q = MeanFieldNormal(init_std=0.3)
    mean = point + 0.2 * torch.randn_like(point)  # the posterior mean has moved off the point
    params = {"rho": q.init(point)["rho"] + 0.3 * torch.randn_like(point)}
    bufs = prior.init(point)
    exact = D.kl_divergence(q.distribution(mean, params), prior.distribution(bufs, mean)).sum()
    w, log_q = q.sample(mean, params, 50_000, _gen(1))
    per = log_q - prior.log_prob(w, bufs).flatten(1).sum(1)
    se = per.std() / math.sqrt(per.numel())
    assert abs(per.mean() - exact) < 5 * se, (per.mean().item(), exact.item(), se.item())
    # the test can fail: a wrong KL (e.g. 10% off) lies outside the band
    assert abs(per.mean() - 1.1 * exact) > 5 * se


@pytest.mark.parametrize("prior", KL_PRIORS)
def test_analytic_kl_on_a_layer_site(prior):
    torch.manual_seed(0)
    layer = bf.nn.VILinear(3, 2, prior=prior, variational=MeanFieldNormal(init_std=0.1)).double()
    with torch.no_grad():
        layer.weight.add_(0.3)
        layer.weight_rho.add_(torch.randn_like(layer.weight_rho))
    sites = list(iter_sites(layer))
    assert [s.name for s in sites] == ["weight", "bias"]
    total = sum(analytic_kl(s) for s in sites)
    assert torch.allclose(layer.kl_divergence(), total)
    # Monte Carlo through the layer's own sampler
    weights, log_p, log_q, _ = layer._draw(40_000, _gen(2), True)
    per = log_q - log_p
    se = per.std() / math.sqrt(per.numel())
    assert abs(per.mean() - total) < 5 * se
    # and by hand from torch.distributions
    hand = sum(
        D.kl_divergence(D.Normal(s.mean, F.softplus(s.vparams()["rho"])),
                        s.spec.prior.distribution(s.pbuffers(), s.mean)).sum()
        for s in sites
    )
    assert torch.allclose(total, hand)


@pytest.mark.parametrize("prior", [StudentT(), ScaleMixtureNormal(), Flat()])
def test_no_closed_form_kl_is_a_clear_error(prior):
    layer = bf.nn.VILinear(3, 2, prior=prior)
    with pytest.raises(ValueError, match="kl='mc'"):
        layer.kl_divergence()


def test_kl_zero_when_q_equals_prior():
    layer = bf.nn.VILinear(3, 2, prior=Normal("pretrained", 0.05), variational=MeanFieldNormal(init_std=0.05))
    assert abs(layer.kl_divergence().item()) < 1e-5


# --------------------------------------------------------------------------------------
# Shortcuts, lookups, argument checks
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("normal", Normal(0.0, 1.0)),
    ("normal:scale=0.1", Normal(0.0, 0.1)),
    ("Normal:loc=0.5, scale=2", Normal(0.5, 2.0)),
    ("gaussian:scale=0.1", Normal(0.0, 0.1)),
    ("normal:loc=pretrained,scale=0.01", Normal("pretrained", 0.01)),
    ("laplace:scale=0.3", Laplace(0.0, 0.3)),
    ("studentt:df=4", StudentT(4.0)),
    ("student_t:df=4,scale=0.5", StudentT(4.0, 0.0, 0.5)),
    ("scalemixture:pi=0.25,sigma1=1,sigma2=0.01", ScaleMixtureNormal(0.25, 1.0, 0.01)),
    ("flat", Flat()),
])
def test_prior_shortcuts(text, expected):
    p = get_prior(text)
    assert type(p) is type(expected) and p == expected


@pytest.mark.parametrize("text, expected", [
    ("meanfield", MeanFieldNormal()),
    ("meanfield:init_std=1e-3", MeanFieldNormal(init_std=1e-3)),
    ("meanfield:init_std=0.1,relative=true", MeanFieldNormal(init_std=0.1, relative=True)),
    ("mean_field:init_std=0.05", MeanFieldNormal(init_std=0.05)),
    ("pointmass", PointMass()),
    ("map", PointMass()),
])
def test_variational_shortcuts(text, expected):
    q = get_variational(text)
    assert type(q) is type(expected) and q == expected


def test_resolve_defaults_instances_and_specs():
    assert get_prior(None) == Normal(0.0, 1.0)
    assert get_prior(None, default=Laplace()) == Laplace()
    p = StudentT(4.0, "pretrained", 0.5)
    assert get_prior(p) is p
    assert get_prior(p.spec()) == p
    assert get_variational(None) == MeanFieldNormal()
    q = MeanFieldNormal(init_std=0.2, relative=True)
    assert get_variational(q) is q
    assert get_variational(q.spec()) == q
    assert MeanFieldNormal(1e-3).init_std == 1e-3


def test_unknown_prior_name_lists_choices():
    with pytest.raises(ValueError) as exc:
        get_prior("gausian:scale=0.1")
    msg = str(exc.value)
    assert "gausian" in msg
    for name in ("normal", "laplace", "studentt", "scalemixture", "flat"):
        assert name in msg


def test_unknown_variational_name_lists_choices():
    with pytest.raises(ValueError) as exc:
        get_variational("fullrank")
    msg = str(exc.value)
    assert "fullrank" in msg and "meanfield" in msg and "pointmass" in msg


@pytest.mark.parametrize("text", ["normal:scale", "normal:scale=-1", "normal:scale=abc", "normal:foo=1",
                                  "laplace:loc=here", "scalemixture:pi=1.5", ""])
def test_bad_prior_shortcut_raises_value_error(text):
    with pytest.raises(ValueError):
        get_prior(text)


@pytest.mark.parametrize("text", ["meanfield:init_std=0", "meanfield:init_std", "meanfield:sigma=1",
                                  "pointmass:init_std=1"])
def test_bad_variational_shortcut_raises_value_error(text):
    with pytest.raises(ValueError):
        get_variational(text)


@pytest.mark.parametrize("bad", [3, 1.5, Normal, ["normal"], MeanFieldNormal()])
def test_get_prior_wrong_type(bad):
    with pytest.raises(TypeError, match="normal"):
        get_prior(bad)


@pytest.mark.parametrize("bad", [3, Normal(), MeanFieldNormal, ("meanfield",)])
def test_get_variational_wrong_type(bad):
    with pytest.raises(TypeError, match="meanfield"):
        get_variational(bad)


@pytest.mark.parametrize("make", [
    lambda: Normal(0.0, "1"),
    lambda: Normal(0.0, None),
    lambda: Normal(0.0, True),
    lambda: Normal(None, 1.0),
    lambda: Normal([0.0], 1.0),
    lambda: Laplace(0.0, torch.tensor(1.0)),
    lambda: StudentT(df="3"),
    lambda: ScaleMixtureNormal(pi="0.5"),
    lambda: ScaleMixtureNormal(sigma1=None),
    lambda: MeanFieldNormal(init_std="1e-3"),
    lambda: MeanFieldNormal(init_std=True),
    lambda: MeanFieldNormal(relative=1),
    lambda: MeanFieldNormal(min_std=None),
])
def test_wrong_argument_types_raise_type_error(make):
    with pytest.raises(TypeError):
        make()


@pytest.mark.parametrize("make", [
    lambda: Normal(0.0, 0.0),
    lambda: Normal(0.0, -1.0),
    lambda: Normal(0.0, math.inf),
    lambda: Normal(math.nan, 1.0),
    lambda: Normal("pretrainde", 1.0),
    lambda: Laplace(0.0, -0.1),
    lambda: StudentT(df=0.0),
    lambda: ScaleMixtureNormal(pi=0.0),
    lambda: ScaleMixtureNormal(pi=1.0),
    lambda: ScaleMixtureNormal(sigma2=-1.0),
    lambda: MeanFieldNormal(init_std=0.0),
    lambda: MeanFieldNormal(init_std=-1e-3),
    lambda: MeanFieldNormal(min_std=math.nan),
])
def test_impossible_values_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


def test_config_objects_equality_and_repr():
    assert Normal(0.0, 0.1) == Normal(0, 0.1)
    assert Normal(0.0, 0.1) != Normal(0.0, 0.2)
    assert Normal(0.0, 1.0) != Laplace(0.0, 1.0)
    assert len({Normal(0.0, 0.1), Normal(0.0, 0.1), Laplace()}) == 2
    assert "scale=0.1" in repr(Normal(0.0, 0.1))
    assert MeanFieldNormal(1e-3) == MeanFieldNormal(init_std=1e-3)
    assert "init_std=0.001" in repr(MeanFieldNormal(1e-3))


def test_meanfield_normal_kl_to_matches_torch_distributions_and_gradients():
    # MeanFieldNormal.kl_to: a Function that keeps only its inputs for backward.
    from bayesify.variational import _NormalKL

    torch.manual_seed(0)
    m = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    loc = torch.randn(5, 4, dtype=torch.float64)
    for centre in (loc, 0.1):
        assert torch.autograd.gradcheck(lambda m, r: _NormalKL.apply(m, r, centre, 0.3), (m, r))
        ref = D.kl_divergence(D.Normal(m, torch.nn.functional.softplus(r)), D.Normal(centre, 0.3)).sum()
        q = bf.variational.MeanFieldNormal()
        got = q.kl_to(bf.priors.Normal(loc="pretrained", scale=0.3) if centre is loc else bf.priors.Normal(0.1, 0.3),
                      m, {"rho": r}, {"loc": loc})
        torch.testing.assert_close(got, ref)


def test_meanfield_normal_kl_to_over_many_blocks_matches_autograd():
    # Large tensors are summed and differentiated block by block on the thread pool.
    from bayesify._normal import BLOCK
    from bayesify.variational import _NormalKL

    torch.manual_seed(1)
    with torch_threads(2):
        shape = (BLOCK // 100 * 3 + 7, 100)
        m = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        r = torch.randn(shape, dtype=torch.float64).sub_(3).requires_grad_()
        loc = torch.randn(shape, dtype=torch.float64)
        for centre in (loc, -0.2):
            got = _NormalKL.apply(m, r, centre, 0.5)
            ref = D.kl_divergence(D.Normal(m, torch.nn.functional.softplus(r)), D.Normal(centre, 0.5)).sum()
            torch.testing.assert_close(got, ref)
            torch.testing.assert_close(torch.autograd.grad(2.5 * got, (m, r)), torch.autograd.grad(2.5 * ref, (m, r)))


@pytest.mark.parametrize("peak", [3.0, 500.0])  # with and without stds past softplus's linear threshold
def test_relative_init_in_chunks_equals_inverse_softplus(peak):
    from bayesify._normal import BLOCK

    torch.manual_seed(3)
    p = torch.randn(BLOCK // 64 * 3 + 5, 64)
    p.view(-1)[::7919] = peak
    p.view(-1)[::104729] = 0.0
    q = MeanFieldNormal(init_std=0.1, relative=True, min_std=1e-4)
    ref = inverse_softplus((p.abs() * 0.1).clamp_min(1e-4))
    assert torch.equal(q.init(p)["rho"], ref)
