"""Every layer of bayesify.nn against its torch.nn namesake, over a table of arguments."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayesify as bf
from bayesify.priors import Laplace, Normal
from bayesify.variational import MeanFieldNormal, PointMass


S = 3


def _long(*shape: int, high: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, high, shape, generator=g)


# (id, VI class, args, kwargs, input shape or callable making the input)
CASES = [
    # --- Linear
    ("linear", bf.nn.VILinear, (4, 3), {}, (5, 4)),
    ("linear-nobias", bf.nn.VILinear, (4, 3), {"bias": False}, (5, 4)),
    ("linear-3d-input", bf.nn.VILinear, (4, 2), {}, (2, 5, 4)),
    ("linear-unbatched", bf.nn.VILinear, (4, 2), {}, (4,)),
    # --- Conv1d
    ("conv1d", bf.nn.VIConv1d, (4, 6, 3), {}, (2, 4, 10)),
    ("conv1d-stride-pad", bf.nn.VIConv1d, (4, 6, 3), {"stride": 2, "padding": 1}, (2, 4, 11)),
    ("conv1d-same-dil", bf.nn.VIConv1d, (4, 6, 3), {"padding": "same", "dilation": 2}, (2, 4, 10)),
    ("conv1d-valid", bf.nn.VIConv1d, (4, 6, 3), {"padding": "valid"}, (2, 4, 10)),
    ("conv1d-groups", bf.nn.VIConv1d, (4, 6, 3), {"groups": 2, "padding": 1}, (2, 4, 10)),
    ("conv1d-depthwise", bf.nn.VIConv1d, (4, 4, 3), {"groups": 4}, (2, 4, 10)),
    ("conv1d-reflect", bf.nn.VIConv1d, (4, 6, 3), {"padding": 2, "padding_mode": "reflect"}, (2, 4, 10)),
    ("conv1d-circular", bf.nn.VIConv1d, (4, 6, 3), {"padding": 2, "padding_mode": "circular"}, (2, 4, 10)),
    ("conv1d-replicate", bf.nn.VIConv1d, (4, 6, 3), {"padding": 1, "padding_mode": "replicate"}, (2, 4, 10)),
    ("conv1d-nobias", bf.nn.VIConv1d, (4, 6, 3), {"bias": False}, (2, 4, 10)),
    ("conv1d-unbatched", bf.nn.VIConv1d, (4, 6, 3), {}, (4, 10)),
    # --- Conv2d
    ("conv2d", bf.nn.VIConv2d, (3, 4, 3), {}, (2, 3, 8, 8)),
    ("conv2d-stride-pad", bf.nn.VIConv2d, (3, 4, (3, 2)), {"stride": (2, 1), "padding": (1, 2)}, (2, 3, 9, 8)),
    ("conv2d-same-dil-reflect", bf.nn.VIConv2d, (3, 4, 3),
     {"padding": "same", "dilation": (1, 2), "padding_mode": "reflect"}, (2, 3, 8, 8)),
    ("conv2d-groups-dil", bf.nn.VIConv2d, (4, 6, 3), {"groups": 2, "dilation": 2, "padding": 2}, (2, 4, 9, 9)),
    ("conv2d-circular", bf.nn.VIConv2d, (3, 4, 3), {"padding": 1, "padding_mode": "circular"}, (2, 3, 7, 7)),
    ("conv2d-replicate-stride", bf.nn.VIConv2d, (3, 4, 3),
     {"padding": (1, 2), "padding_mode": "replicate", "stride": 2}, (2, 3, 7, 7)),
    ("conv2d-nobias", bf.nn.VIConv2d, (3, 4, 1), {"bias": False}, (2, 3, 5, 5)),
    # --- Conv3d
    ("conv3d", bf.nn.VIConv3d, (2, 4, 3), {}, (1, 2, 5, 6, 5)),
    ("conv3d-stride-pad", bf.nn.VIConv3d, (2, 4, 3), {"stride": 2, "padding": 1}, (1, 2, 5, 6, 5)),
    ("conv3d-same-circular", bf.nn.VIConv3d, (2, 4, 3), {"padding": "same", "padding_mode": "circular"},
     (1, 2, 4, 5, 4)),
    ("conv3d-groups-dil", bf.nn.VIConv3d, (4, 4, 2), {"groups": 2, "dilation": 2}, (1, 4, 5, 5, 5)),
    ("conv3d-reflect-nobias", bf.nn.VIConv3d, (2, 3, 3), {"padding": 1, "padding_mode": "reflect",
                                                         "bias": False}, (1, 2, 4, 4, 4)),
    ("conv3d-replicate", bf.nn.VIConv3d, (2, 3, 3), {"padding": 1, "padding_mode": "replicate"}, (1, 2, 4, 4, 4)),
    # --- ConvTranspose1d
    ("convT1d", bf.nn.VIConvTranspose1d, (4, 6, 3), {}, (2, 4, 7)),
    ("convT1d-stride-outpad", bf.nn.VIConvTranspose1d, (4, 6, 3),
     {"stride": 2, "padding": 1, "output_padding": 1}, (2, 4, 7)),
    ("convT1d-groups-dil", bf.nn.VIConvTranspose1d, (4, 6, 3), {"groups": 2, "dilation": 2}, (2, 4, 7)),
    ("convT1d-nobias", bf.nn.VIConvTranspose1d, (4, 2, 2), {"bias": False, "stride": 2}, (2, 4, 5)),
    # --- ConvTranspose2d
    ("convT2d", bf.nn.VIConvTranspose2d, (3, 4, 3), {}, (2, 3, 5, 5)),
    ("convT2d-stride-outpad", bf.nn.VIConvTranspose2d, (3, 4, 3),
     {"stride": (2, 3), "padding": 1, "output_padding": (1, 2)}, (2, 3, 5, 4)),
    ("convT2d-groups-dil", bf.nn.VIConvTranspose2d, (4, 6, 3), {"groups": 2, "dilation": (2, 1)}, (2, 4, 5, 5)),
    ("convT2d-outpad-dil", bf.nn.VIConvTranspose2d, (3, 2, 3),
     {"stride": 2, "dilation": 2, "output_padding": 1}, (2, 3, 4, 4)),
    ("convT2d-nobias", bf.nn.VIConvTranspose2d, (3, 4, 2), {"bias": False}, (2, 3, 5, 5)),
    # --- ConvTranspose3d
    ("convT3d", bf.nn.VIConvTranspose3d, (2, 3, 3), {}, (1, 2, 3, 4, 3)),
    ("convT3d-stride-outpad", bf.nn.VIConvTranspose3d, (2, 3, 3),
     {"stride": 2, "padding": 1, "output_padding": 1}, (1, 2, 3, 3, 3)),
    ("convT3d-groups-dil-nobias", bf.nn.VIConvTranspose3d, (4, 2, 2),
     {"groups": 2, "dilation": 2, "bias": False}, (1, 4, 3, 3, 3)),
    # --- LayerNorm
    ("layernorm", bf.nn.VILayerNorm, (8,), {}, (2, 5, 8)),
    ("layernorm-2d-shape", bf.nn.VILayerNorm, ((4, 8),), {"eps": 1e-3}, (2, 4, 8)),
    ("layernorm-no-affine", bf.nn.VILayerNorm, (8,), {"elementwise_affine": False}, (2, 5, 8)),
    ("layernorm-nobias", bf.nn.VILayerNorm, (8,), {"bias": False}, (2, 5, 8)),
    # --- Embedding
    ("embedding", bf.nn.VIEmbedding, (10, 4), {}, lambda: _long(3, 5, high=10)),
    ("embedding-padding-idx", bf.nn.VIEmbedding, (10, 4), {"padding_idx": 0},
     lambda: torch.cat([torch.zeros(3, 1, dtype=torch.long), _long(3, 4, high=10)], 1)),
    ("embedding-neg-padding-idx", bf.nn.VIEmbedding, (10, 4), {"padding_idx": -1}, lambda: _long(6, high=10)),
    ("embedding-scale-grad", bf.nn.VIEmbedding, (10, 4), {"scale_grad_by_freq": True}, lambda: _long(2, 3, high=10)),
]

IDS = [c[0] for c in CASES]


def _input(spec) -> torch.Tensor:
    if callable(spec):
        return spec()
    return torch.randn(spec, generator=torch.Generator().manual_seed(5))


def _perturb(layer: nn.Module) -> None:
    """Move every mean away from its default init (LayerNorm starts at ones/zeros)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in getattr(layer, "_vi_sites", {}):
            p = getattr(layer, name)
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _namesake(layer: bf.nn.VILayer, args, kwargs) -> nn.Module:
    """A fresh torch.nn namesake with the VI layer's posterior means as its weights."""
    point = layer.point_type(*args, **kwargs)
    point.load_state_dict({k: v for k, v in layer.state_dict().items() if k in point.state_dict()})
    return point


@pytest.mark.parametrize("name, cls, args, kwargs, inp", CASES, ids=IDS)
def test_output_shape(name, cls, args, kwargs, inp):
    torch.manual_seed(0)
    layer = cls(*args, **kwargs, variational=MeanFieldNormal(init_std=0.1))
    _perturb(layer)
    x = _input(inp)
    ref = _namesake(layer, args, kwargs)(x)
    for train in (True, False):
        layer.train(train)
        out = layer(x, samples=S)
        assert out.shape == (S, *ref.shape)
        assert out.dtype == ref.dtype
    assert layer(x, samples=1).shape == (1, *ref.shape)
    if getattr(layer, "_vi_sites", None):
        # the samples differ from each other (weights are actually sampled) ...
        assert not torch.allclose(out[0], out[1])
        # ... but the sample mean is near the point output
        many = layer(x, samples=200).mean(0)
        assert (many - ref).abs().mean() < 0.1 * ref.abs().mean() + 1e-2


@pytest.mark.parametrize("name, cls, args, kwargs, inp", CASES, ids=IDS)
def test_samples_match_namesake_with_sampled_weights(name, cls, args, kwargs, inp):
    """Sample s of the layer's output == the namesake run with the s-th drawn weights."""
    torch.manual_seed(0)
    # An embedding with the default pair draws only its looked-up rows inside its forward
    # (tests/test_estimators.py); a Laplace prior makes the sampler draw the whole table.
    extra = {"prior": Laplace(0.0, 1.0)} if cls is bf.nn.VIEmbedding else {}
    layer = cls(*args, **kwargs, variational=MeanFieldNormal(init_std=0.2), **extra).double()
    _perturb(layer)
    x = _input(inp)
    x = x.double() if x.is_floating_point() else x
    out = layer(x, samples=S, generator=torch.Generator().manual_seed(42))
    weights, *_ = layer._draw(S, torch.Generator().manual_seed(42), False)
    assert set(weights) == set(getattr(layer, "_vi_sites", {}))
    point = _namesake(layer, args, kwargs).double()
    for s in range(S):
        ref = torch.func.functional_call(point, {k: v[s] for k, v in weights.items()}, (x,))
        torch.testing.assert_close(out[s], ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name, cls, args, kwargs, inp", CASES, ids=IDS)
@pytest.mark.parametrize("prior", [Normal(0.0, 1.0), Laplace("pretrained", 0.1)], ids=["normal", "pretrained"])
def test_pointmass_equals_namesake_exactly(name, cls, args, kwargs, inp, prior):
    torch.manual_seed(0)
    layer = cls(*args, **kwargs, prior=prior, variational=PointMass())
    _perturb(layer)
    x = _input(inp)
    point = _namesake(layer, args, kwargs)
    ref = point(x)
    for train in (True, False):
        layer.train(train)
        out = layer(x, samples=S)
        assert out.shape == (S, *ref.shape)
        for s in range(S):
            assert torch.equal(out[s], ref)
    # outside sampling (the outermost VIModule being an enclosing plain module does not
    # apply here), the layer's own forward is the namesake's forward with the means
    assert torch.equal(nn.Module.__call__(layer, x), ref)


@pytest.mark.parametrize("name, cls, args, kwargs, inp", CASES, ids=IDS)
def test_from_point_to_point_round_trip(name, cls, args, kwargs, inp):
    torch.manual_seed(0)
    point = cls.point_type(*args, **kwargs)
    before = {k: v.detach().clone() for k, v in point.state_dict().items()}
    x = _input(inp)
    ref = point(x)
    plain = {k: v for k, v in point.__dict__.items() if not k.startswith("_")}
    point_keys = list(point.state_dict())

    prior = Normal("pretrained", 0.1)
    vi = cls.from_point(point, prior=prior, variational="meanfield:init_std=0.05")
    assert type(vi) is cls and isinstance(vi, cls.point_type) and isinstance(vi, bf.VIModule)
    # every public attribute of the namesake carried over unchanged
    for k, v in plain.items():
        assert getattr(vi, k) == v, k
    # the means *are* the point parameters (no copy), and buffers carried over
    for k, p in point.named_parameters():
        assert getattr(vi, k) is p
    for k, b in point.named_buffers():
        assert getattr(vi, k) is b
    sites = list(getattr(vi, "_vi_sites", {}))
    assert sites == [n for n in ("weight", "bias") if getattr(point, n, None) is not None]
    expected_keys = point_keys + [f"{n}_rho" for n in sites] + [f"{n}_prior_loc" for n in sites]
    assert sorted(vi.state_dict()) == sorted(expected_keys)
    for n in sites:
        assert getattr(vi, f"{n}_rho").shape == getattr(point, n).shape
        assert torch.equal(getattr(vi, f"{n}_prior_loc"), getattr(point, n))
        assert getattr(vi, f"{n}_prior_loc").data_ptr() != getattr(point, n).data_ptr()
    assert vi(x, samples=2).shape == (2, *ref.shape)
    # the point model is unchanged by the conversion
    assert type(point) is cls.point_type
    assert not hasattr(point, "_vi_sites")
    assert list(point.state_dict()) == point_keys
    for k, v in point.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(point(x), ref)

    back = vi.to_point()
    assert type(back) is cls.point_type
    assert not hasattr(back, "_vi_sites") and not hasattr(back, "estimator")
    assert {k: v for k, v in back.__dict__.items() if not k.startswith("_")} == plain
    assert list(back.state_dict()) == point_keys
    for k, p in point.named_parameters():
        assert getattr(back, k) is p
    assert torch.equal(back(x), ref)
    # to_point leaves the VI layer intact
    assert list(getattr(vi, "_vi_sites", {})) == sites
    assert sorted(vi.state_dict()) == sorted(expected_keys)
    # and the round trip survives a deepcopy of the VI layer
    vi2 = copy.deepcopy(vi)
    assert sorted(vi2.state_dict()) == sorted(expected_keys)
    assert torch.equal(vi2.to_point()(x), ref)


@pytest.mark.parametrize("name, cls, args, kwargs, inp", CASES, ids=IDS)
def test_constructor_matches_namesake(name, cls, args, kwargs, inp):
    """Same args -> same attributes and same parameter shapes as the namesake."""
    layer = cls(*args, **kwargs)
    point = cls.point_type(*args, **kwargs)
    plain = {k: v for k, v in point.__dict__.items() if not k.startswith("_")}
    for k, v in plain.items():
        assert getattr(layer, k) == v, k
    for k, p in point.named_parameters():
        assert getattr(layer, k).shape == p.shape
        assert getattr(layer, k).requires_grad
    # default variational family: mean field with std 1e-3, rho registered as a parameter
    for n in getattr(layer, "_vi_sites", {}):
        rho = getattr(layer, f"{n}_rho")
        assert isinstance(rho, nn.Parameter)
        assert torch.allclose(nn.functional.softplus(rho), torch.full_like(rho, 1e-3), rtol=1e-4)


def test_state_dict_keys():
    assert list(bf.nn.VILinear(3, 2).state_dict()) == ["weight", "bias", "weight_rho", "bias_rho"]
    assert list(bf.nn.VILinear(3, 2, bias=False).state_dict()) == ["weight", "weight_rho"]
    assert list(bf.nn.VILinear(3, 2, variational=PointMass()).state_dict()) == ["weight", "bias"]
    assert sorted(bf.nn.VIConv2d(3, 2, 3, prior=Normal("pretrained", 0.1)).state_dict()) == sorted(
        ["weight", "bias", "weight_rho", "bias_rho", "weight_prior_loc", "bias_prior_loc"])
    assert list(bf.nn.VILayerNorm(4, elementwise_affine=False).state_dict()) == []
    assert list(bf.nn.VIEmbedding(5, 2).state_dict()) == ["weight", "weight_rho"]
    # parameters vs buffers: rho is trained, the prior's loc is not
    layer = bf.nn.VILinear(3, 2, prior="normal:loc=pretrained,scale=0.1")
    assert sorted(n for n, _ in layer.named_parameters()) == ["bias", "bias_rho", "weight", "weight_rho"]
    assert sorted(n for n, _ in layer.named_buffers()) == ["bias_prior_loc", "weight_prior_loc"]


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = bf.nn.VIConv1d(2, 3, 3, prior=Normal("pretrained", 0.1))
    _perturb(a)
    with torch.no_grad():
        a.weight_rho.add_(0.5)
    b = bf.nn.VIConv1d(2, 3, 3, prior=Normal("pretrained", 0.1))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 2, 6)
    g = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    assert torch.equal(a(x, samples=4, generator=g()), b(x, samples=4, generator=g()))


def test_layer_prior_and_variational_arguments():
    layer = bf.nn.VILinear(3, 2, prior="laplace:scale=0.5", variational="meanfield:init_std=0.2")
    spec = layer._vi_sites["weight"]
    assert spec.prior == Laplace(0.0, 0.5)
    assert spec.variational == MeanFieldNormal(init_std=0.2)
    assert torch.allclose(nn.functional.softplus(layer.weight_rho), torch.full((2, 3), 0.2))
    assert "Laplace" in repr(layer) and "init_std=0.2" in repr(layer)
    with pytest.raises(ValueError, match="normal"):
        bf.nn.VILinear(3, 2, prior="nromal")
    with pytest.raises(TypeError):
        bf.nn.VILinear(3, 2, variational=3)
    with pytest.raises(ValueError, match="reparam"):
        bf.nn.VILinear(3, 2, estimator="magic")
    # namesake argument errors surface unchanged
    with pytest.raises(ValueError):
        bf.nn.VIConv2d(3, 4, 3, padding="same", stride=2)
    with pytest.raises(TypeError):
        bf.nn.VILinear(3, 2, not_an_argument=True)


def test_from_point_requires_exact_type():
    class MyLinear(nn.Linear):
        pass

    with pytest.raises(TypeError, match="Linear"):
        bf.nn.VILinear.from_point(MyLinear(2, 2))
    with pytest.raises(TypeError, match="Conv2d"):
        bf.nn.VIConv2d.from_point(nn.Conv1d(2, 2, 1))


def test_default_mapping_covers_every_layer():
    expected = {nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                nn.ConvTranspose3d, nn.LayerNorm, nn.Embedding}
    assert set(bf.nn.DEFAULT_MAPPING) == expected
    for point_cls, vi_cls in bf.nn.DEFAULT_MAPPING.items():
        assert vi_cls.point_type is point_cls and issubclass(vi_cls, point_cls)
    assert {c[1] for c in CASES} == set(bf.nn.DEFAULT_MAPPING.values())


def test_embedding_padding_idx_row_gets_no_gradient():
    layer = bf.nn.VIEmbedding(6, 3, padding_idx=0, variational=MeanFieldNormal(init_std=0.1))
    x = torch.tensor([[0, 1, 2], [0, 3, 0]])
    layer(x, samples=4).sum().backward()
    assert torch.equal(layer.weight.grad[0], torch.zeros(3))
    assert layer.weight.grad[1:4].abs().sum() > 0
    assert torch.equal(layer.weight.grad[4:], torch.zeros(2, 3))


def test_gradients_reach_every_variational_parameter():
    for name, cls, args, kwargs, inp in CASES:
        layer = cls(*args, **kwargs, variational=MeanFieldNormal(init_std=0.1))
        if not getattr(layer, "_vi_sites", None):
            continue
        _perturb(layer)
        x = _input(inp)
        out = layer(x, samples=2)
        (out.square().sum() + out.log_probs.sum()).backward()
        for n, p in layer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (name, n)


def test_layernorm_affine_recompute_matches_layer_norm():
    # Under sampling VILayerNorm runs a Function that recomputes the normalisation in backward
    # (saves an activation per LayerNorm under vmap); same values and gradients as F.layer_norm.
    from bayesify.nn import _LayerNormAffine

    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: _LayerNormAffine.apply(x, w, b, (6,), 1e-5)[0], (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: _LayerNormAffine.apply(x, w, None, (6,), 1e-5)[0], (x, w))
    ws, bs = w.detach().expand(5, 6) + torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    ws.requires_grad_(), bs.requires_grad_()
    got = torch.vmap(lambda w_, b_: _LayerNormAffine.apply(x, w_, b_, (6,), 1e-5)[0])(ws, bs)
    ref = torch.vmap(lambda w_, b_: F.layer_norm(x, (6,), w_, b_, 1e-5))(ws, bs)
    torch.testing.assert_close(got, ref)
    g = torch.randn_like(got)
    for a, r in zip(torch.autograd.grad(got, (x, ws, bs), g), torch.autograd.grad(ref, (x, ws, bs), g)):
        torch.testing.assert_close(a, r)
    # per-sample inputs too (a LayerNorm after a Bayesian layer)
    xs = (x.detach() + torch.randn(5, 3, 4, 6, dtype=torch.float64)).requires_grad_()
    got = torch.vmap(lambda x_, w_, b_: _LayerNormAffine.apply(x_, w_, b_, (6,), 1e-5)[0])(xs, ws, bs)
    ref = torch.vmap(lambda x_, w_, b_: F.layer_norm(x_, (6,), w_, b_, 1e-5))(xs, ws, bs)
    torch.testing.assert_close(got, ref)
    g = torch.randn_like(got)
    for a, r in zip(torch.autograd.grad(got, (xs, ws, bs), g), torch.autograd.grad(ref, (xs, ws, bs), g)):
        torch.testing.assert_close(a, r)
