"""bayesify() over a table of real models: the invariants that matter."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import bayesify as bf
from bayesify.sites import iter_sites

from .models import CASES, Case, first

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _types(model: nn.Module) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in model.named_modules()]


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


def _run(bnn: bf.BayesianModel, case_inputs: tuple, samples: int, **kw):
    args, kwargs = case_inputs
    return bnn(*args, samples=samples, **kwargs, **kw)


def test_pointmass_reproduces_every_sample_and_leaves_input_untouched(case: Case) -> None:
    torch.manual_seed(0)
    model = case.build().eval()
    inputs = case.inputs()
    before, types = _snapshot(model), _types(model)
    with torch.no_grad():
        ref = first(model(*inputs[0], **inputs[1]))
    bnn = bf.bayesify(model, variational=bf.variational.PointMass()).eval()
    with torch.no_grad():
        out = first(_run(bnn, inputs, 3))
    assert out.shape == (3, *ref.shape)
    scale = ref.abs().max().clamp_min(1e-12)
    for s in range(3):
        assert ((out[s] - ref).abs().max() / scale).item() < 1e-6
    # the input model is untouched: same tensors, same module types, same outputs
    assert _types(model) == types
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(first(model(*inputs[0], **inputs[1])), ref)


def test_small_spread_keeps_mean_and_samples_differ(case: Case) -> None:
    torch.manual_seed(0)
    model = case.build().eval()
    inputs = case.inputs()
    with torch.no_grad():
        ref = first(model(*inputs[0], **inputs[1]))
    bnn = bf.bayesify(model, variational=bf.variational.MeanFieldNormal(init_std=1e-4)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = first(_run(bnn, inputs, 8))
    fallback = [w for w in caught if "one by one" in str(w.message)]
    assert bool(fallback) == (not case.vmap), [str(w.message) for w in fallback]
    # the sample mean stays within a few standard errors of the point output
    stderr = out.std(0) / out.shape[0] ** 0.5
    assert ((out.mean(0) - ref).abs() <= 6 * stderr + 1e-3 * ref.abs().max()).all()
    assert (out[0] - out[1]).abs().max() > 0


def test_one_elbo_step_gives_finite_gradients_everywhere(case: Case) -> None:
    torch.manual_seed(0)
    model = case.build().train()
    inputs = case.inputs()
    bnn = bf.bayesify(model).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = _run(bnn, inputs, 2)
    pred = first(out)
    target = torch.randn_like(pred[0])
    loss = bf.ELBOLoss("normal", dataset_size=100)(out, target)
    loss.backward()
    assert torch.isfinite(loss)
    sites = list(iter_sites(bnn))
    assert sites
    for site in sites:
        for name, t in [("mean", site.mean), *site.vparams().items()]:
            assert t.grad is not None, f"{site.qualname} {name} has no gradient"
            assert torch.isfinite(t.grad).all(), f"{site.qualname} {name}"


def test_fx_and_module_tree_paths_give_the_same_model() -> None:
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    a = bf.bayesify(model, trace=True)
    b = bf.bayesify(model, trace=False)
    assert a.conversion_plan.traced and not b.conversion_plan.traced
    assert _types(a) == _types(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_gpt2_tied_embeddings_share_one_posterior() -> None:
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50,
                                                                 n_positions=16, bos_token_id=1, eos_token_id=2))
    bnn = bf.bayesify(model)
    inner = bnn.model
    assert inner.lm_head.weight is inner.transformer.wte.weight
    assert inner.lm_head.weight_rho is inner.transformer.wte.weight_rho
    names = [s.qualname for s in iter_sites(bnn)]
    assert len(names) == len(set(names))
    assert sum("wte.weight" in n or "lm_head.weight" in n for n in names) == 1
    # GPT-2's Conv1D (not nn.Conv1d) is handled by the general rule, not mistaken for a conv
    c_attn = inner.transformer.h[0].attn.c_attn
    assert type(c_attn).__name__ == "Conv1D" and set(c_attn._vi_sites) == {"weight", "bias"}


def test_shared_module_is_swapped_under_every_name() -> None:
    from .models import SharedAndRaw

    bnn = bf.bayesify(SharedAndRaw())
    assert bnn.model.block is bnn.model.alias
    assert isinstance(bnn.model.block, bf.nn.VILinear)
    assert {"scale", "offset"} <= set(bnn.model._vi_sites)


def test_include_exclude_select_by_glob_and_class() -> None:
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    bnn = bf.bayesify(model, include=["layer4.*", nn.Linear], exclude=["layer4.1"])
    converted = {e.name for e in bnn.conversion_plan.converted}
    assert "fc" in converted and "layer4.0.conv1" in converted
    assert not any(n.startswith("layer4.1") for n in converted)
    assert not any(n.startswith("layer1") for n in converted)
    assert type(bnn.model.layer1[0].conv1) is nn.Conv2d


def test_batchnorm_deterministic_and_running_stats_follow_the_documented_rule() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    bnn = bf.bayesify(model, variational="pointmass").train()
    x = torch.randn(5, 3, 8, 8)
    out = bnn(x, samples=3)
    model.train()
    ref = model(x)  # updates the original's running stats once
    assert torch.allclose(out[0], ref, atol=1e-6)
    bn_b, bn_ref = bnn.model[1], model[1]
    assert torch.allclose(bn_b.running_mean, bn_ref.running_mean, atol=1e-6)
    assert torch.allclose(bn_b.running_var, bn_ref.running_var, atol=1e-6)
    assert int(bn_b.num_batches_tracked) == 1
    assert not getattr(bn_b, "_vi_sites", None)
    assert any(s.name == "1" and "BatchNorm" in s.reason for s in bnn.conversion_plan.skipped)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_preserved(dtype: torch.dtype) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)).to(dtype)
    bnn = bf.bayesify(model)
    assert all(p.dtype == dtype for p in bnn.parameters())
    out = bnn(torch.randn(3, 4, dtype=dtype), samples=2)
    assert out.dtype == dtype and out.shape == (2, 3, 2)


def test_inplace_converts_the_model_itself() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    w = model[0].weight
    bnn = bf.bayesify(model, inplace=True)
    assert bnn.model is model and isinstance(model[0], bf.nn.VILinear) and model[0].weight is w


def test_to_point_returns_the_means() -> None:
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    bnn = bf.bayesify(model)
    point = bnn.to_point().eval()
    assert _types(point) == _types(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(point(x), model(x))


def test_wrapped_model_outside_sampling_computes_with_the_means(case: Case) -> None:
    """``bnn.model(x)`` is the mean prediction: the converted means start at the pretrained
    weights, so it equals the original model's output (each inner layer does not sample)."""
    torch.manual_seed(0)
    model = case.build().eval()
    args, kwargs = case.inputs()
    with torch.no_grad():
        ref = first(model(*args, **kwargs))
    bnn = bf.bayesify(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            out = first(bnn.model(*args, **kwargs))
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_inner_layer_still_samples_when_asked_and_hand_written_layers_sample() -> None:
    bnn = bf.bayesify(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    x = torch.randn(5, 3)
    assert bnn.model[0](x).shape == (5, 4)  # means
    assert bnn.model[0](x, samples=3).shape == (3, 5, 4)  # asked for samples
    assert bf.nn.VILinear(3, 4)(x).shape == (10, 5, 4)  # a hand-written layer owns samples=
    loaded = copy.deepcopy(bnn)
    assert loaded.model(x).shape == (5, 2)


def test_plan_changes_nothing_and_renders() -> None:
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    before = _snapshot(model)
    p = bf.plan(model)
    assert p.traced and len(p.converted) == 21  # 20 convs + fc
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    text = str(p)
    assert "VIConv2d" in text and "BatchNorm stays deterministic" in text


# -- bad input: clear errors, and the input model untouched -------------------------------------

def _small() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"prior": "gauss"}, ValueError, "valid choices"),
        ({"variational": "fullrank"}, ValueError, "meanfield"),
        ({"prior": 3}, TypeError, "prior must be"),
        ({"include": ["encoder.*"]}, ValueError, "matches no module"),
        ({"include": [3]}, TypeError, "glob"),
        ({"estimator": "magic"}, ValueError, "reparam"),
        ({"other_params": "maybe"}, ValueError, "deterministic"),
        ({"mapping": {nn.Linear: nn.Linear}}, TypeError, "VILayer"),
        ({"variational": "meanfield:init_std=-1"}, ValueError, "positive"),
    ],
)
def test_bad_arguments_raise_and_leave_model_untouched(kwargs: dict, exc: type, words: str) -> None:
    model = _small()
    before, types = _snapshot(model), _types(model)
    with pytest.raises(exc, match=words):
        bf.bayesify(model, **kwargs)
    assert _types(model) == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_non_module_is_rejected() -> None:
    with pytest.raises(TypeError, match="torch.nn.Module"):
        bf.bayesify(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="torch.nn.Module"):
        bf.plan("resnet18")  # type: ignore[arg-type]


def test_exclude_matching_nothing_warns() -> None:
    with pytest.warns(UserWarning, match="matched no module"):
        bf.bayesify(_small(), exclude=["decoder"])


def test_converted_model_pickles() -> None:
    import io

    bnn = bf.bayesify(_small())
    buf = io.BytesIO()
    torch.save(bnn, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert type(again.model[0]) is bf.nn.VILinear
    x = torch.randn(2, 4)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(bnn(x, samples=4, generator=g1), again(x, samples=4, generator=g2))
    copy.deepcopy(again)
