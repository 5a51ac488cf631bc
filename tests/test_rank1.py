"""The rank-1 multiplicative posterior (``variational="rank1"``, Dusenberry et al. 2020).

Pinned: a zero-spread conversion is the point model (real models); each sample is the weight
times an outer product of per-unit factors; log_probs and the analytic KL equal hand
computations over the factors, and ELBOLoss kl="mc" / "analytic" agree in expectation;
the product's gradients; chunked / recomputed draws; save / load and the CLI round trip; the
one-line errors of the routes that need a mean-field posterior.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import distributions as D, nn

import bayesify as bf
from bayesify._rank1 import rank1_product
from bayesify.variational import Rank1Normal, get_variational

from .models import CASES, Case, first

ROOT = Path(__file__).resolve().parents[1]


def digits_cnn() -> nn.Module:
    """benchmarks/quality.py's digits network."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.25),
        nn.Linear(64, 5),
    )


def tiny_bert() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


def _tokens() -> tuple[tuple, dict]:
    ids = torch.randint(1, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    return (), {"input_ids": ids, "attention_mask": mask}


_BY_NAME = {c.name: c for c in CASES}
IDENTITY_CASES = [
    _BY_NAME["resnet18"],
    _BY_NAME["gpt2"],  # Conv1D by the general rule, tied embedding / lm_head
    _BY_NAME["inplace_residual"],  # ConvTranspose2d (dims (in, out))
    _BY_NAME["shared_and_raw"],  # module under two names, raw 1-D parameters, Embedding
    Case("digits_cnn", digits_cnn, lambda: ((torch.rand(4, 1, 8, 8),), {})),
    Case("tiny_bert", tiny_bert, _tokens),
]


@pytest.mark.parametrize("case", IDENTITY_CASES, ids=lambda c: c.name)
def test_zero_spread_is_the_point_model(case: Case) -> None:
    torch.manual_seed(0)
    model = case.build().eval()
    args, kwargs = case.inputs()
    with torch.no_grad():
        ref = first(model(*args, **kwargs))
    # softplus(rho) = 1e-30: every factor is exactly 1.0 in float32, so every sample is W
    bnn = bf.bayesify(model, variational=Rank1Normal(init_std=1e-30)).eval()
    with torch.no_grad():
        out = first(bnn(*args, samples=3, **kwargs))
    scale = ref.abs().max().clamp_min(1e-12)
    for s in range(3):
        assert ((out[s] - ref).abs().max() / scale).item() < 1e-6
    sites = bnn.bayesian_sites()
    assert sites and all(s.mean.dim() >= 2 for s in sites)  # biases / norm scales stay point parameters
    for s in sites:  # factors start at mean 1, one per unit of dims 0 and 1; no prior buffers
        vp = s.vparams()
        assert torch.equal(vp["r_mean"], torch.ones(s.mean.shape[0]))
        assert torch.equal(vp["s_mean"], torch.ones(s.mean.shape[1]))
        assert s.pbuffers() == {}


def test_plan_counts_the_factors() -> None:
    model = digits_cnn()
    plan = bf.plan(model, variational="rank1")
    bnn = bf.bayesify(model, variational="rank1")
    assert sum(e.params_after for e in plan.converted) == sum(p.numel() for p in bnn.parameters())
    # per weight (out, in, ...): 2 * (out + in) factor parameters, biases none
    assert plan.converted[0].params_after == 16 * 9 + 16 + 2 * (16 + 1)


def test_samples_are_the_weight_times_an_outer_product_of_factors() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    bnn = bf.bayesify(nn.Sequential(conv), variational="rank1:init_std=0.3")
    w = bnn._draw(5, torch.Generator().manual_seed(1), False)[0]["model.0.weight"]
    ratio = w / conv.weight  # (5, out, in, kh, kw): the same for every kernel tap
    assert torch.allclose(ratio, ratio[..., :1, :1].expand_as(ratio), rtol=1e-5)
    m = ratio[..., 0, 0]
    sv = torch.linalg.svdvals(m.detach().double())
    assert (sv[:, 1] < 1e-5 * sv[:, 0]).all()  # rank 1 per sample
    assert (m.std(0) > 0.05).all()  # and random


def test_log_probs_and_kl_equal_a_hand_computation() -> None:
    torch.manual_seed(0)
    q = Rank1Normal(init_std=0.2, prior_std=0.3)
    weight = torch.randn(4, 3, 2)
    params = q.init(weight)
    with torch.no_grad():
        for v in params.values():
            v.add_(0.1 * torch.randn_like(v))
    w, log_p, log_q = q.sample_with_prior(weight, params, None, {}, 6, torch.Generator().manual_seed(5), True)
    f, _, _ = q.sample_factors(params, 6, torch.Generator().manual_seed(5))
    r, s = f[:, :4], f[:, 4:]
    torch.testing.assert_close(w, weight * r[:, :, None, None] * s[:, None, :, None])
    qd = D.Normal(torch.cat([params["r_mean"], params["s_mean"]]),
                  nn.functional.softplus(torch.cat([params["r_rho"], params["s_rho"]])))
    pd = D.Normal(torch.ones(7), torch.full((7,), 0.3))
    torch.testing.assert_close(log_q, qd.log_prob(f).sum(1))
    torch.testing.assert_close(log_p, pd.log_prob(f).sum(1))
    torch.testing.assert_close(q.kl_to(None, weight, params, {}), D.kl_divergence(qd, pd).sum())
    with pytest.raises(ValueError, match="no density over the weights"):
        q.log_prob(w, weight, params)


def test_mc_and_analytic_kl_agree_in_expectation() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    bnn = bf.bayesify(net, variational="rank1:init_std=0.2,prior_std=0.1").train()
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    mc = bf.ELBOLoss("categorical", dataset_size=1, kl="mc")
    an = bf.ELBOLoss("categorical", dataset_size=1, kl="analytic")
    gen = torch.Generator().manual_seed(0)
    kls = []
    for _ in range(50):
        mc(bnn(x, samples=20, generator=gen), y)
        kls.append(mc.last.kl)
    an(bnn(x, samples=2), y)
    sites = bnn.bayesian_sites()
    hand = 0.0
    for s in sites:  # KL(N(1 + 0, 0.2^2) || N(1, 0.1^2)) per factor
        k = s.mean.shape[0] + s.mean.shape[1]
        hand += k * (math.log(0.1 / 0.2) + 0.2 ** 2 / (2 * 0.1 ** 2) - 0.5)
    assert an.last.kl == pytest.approx(hand, rel=1e-5)
    kls_t = torch.tensor(kls)
    assert abs(kls_t.mean().item() - hand) < 4 * kls_t.std().item() / math.sqrt(len(kls)) + 1e-3 * hand
    # the analytic KL's gradient reaches the factors' means and spreads, not the weights
    loss = an(bnn(x, samples=2), y)
    loss.backward()
    for s in sites:
        assert s.vparams()["r_rho"].grad is not None and s.vparams()["s_mean"].grad is not None


def test_product_gradients_match_autograd() -> None:
    torch.manual_seed(0)
    for shape in ((5, 3), (4, 2, 3, 3)):
        weight = torch.randn(shape, dtype=torch.double, requires_grad=True)
        r = torch.randn(6, shape[0], dtype=torch.double, requires_grad=True)
        s = torch.randn(6, shape[1], dtype=torch.double, requires_grad=True)
        assert torch.autograd.gradcheck(rank1_product, (weight, r, s))


def test_chunked_and_recomputed_draws_are_the_same_samples() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    bnn = bf.bayesify(net, variational="rank1:init_std=0.2").train()
    x = torch.randn(2, 1, 6, 6)
    grads = []
    outs = []
    for kw in ({}, {"chunk_size": 2}, {"recompute_samples": True}):
        bnn.zero_grad()
        out = bnn(x, samples=5, generator=torch.Generator().manual_seed(3), **kw)
        loss = bf.ELBOLoss("categorical", dataset_size=10)(out, torch.tensor([0, 2]))
        loss.backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in bnn.named_parameters() if p.grad is not None})
    for o, g in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(o, outs[0])
        assert g.keys() == grads[0].keys()
        for n in g:
            torch.testing.assert_close(g[n], grads[0][n], rtol=1e-4, atol=1e-6)


def test_save_load_round_trip_and_predict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bnn = bf.bayesify(digits_cnn().eval(), variational="rank1:init_std=0.3", arch=None)
    with torch.no_grad():
        for s in bnn.bayesian_sites():
            s.vparams()["r_mean"].add_(0.05 * torch.randn_like(s.vparams()["r_mean"]))
    bnn.eval()
    x = torch.rand(6, 1, 8, 8)
    bf.save(bnn, tmp_path / "m.bnn")
    back = bf.load(tmp_path / "m.bnn").eval()
    assert back.conversion["variational"] == {"name": "rank1", "init_std": 0.3, "prior_std": 0.5, "components": 1}
    a = bnn(x, samples=4, generator=torch.Generator().manual_seed(0))
    b = back(x, samples=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    pred = bf.predict(back, x, samples=20, likelihood="categorical")
    assert pred.probs.shape == (6, 5) and (pred.mutual_information > 0).all()


def test_cli_convert_with_rank1(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    torch.save(net.state_dict(), tmp_path / "net.pt")
    env_path = str(ROOT)
    code = ("import sys; from bayesify.cli import main; sys.exit(main(['convert', 'net.pt', '--arch', "
            "'tests.test_rank1:tiny_mlp', '--variational', 'rank1:init_std=0.05', '-o', 'net.bnn']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": env_path}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    bnn = bf.load(tmp_path / "net.bnn")
    assert bnn.conversion["variational"]["name"] == "rank1"
    assert [s.qualname for s in bnn.bayesian_sites()] == ["model.0.weight", "model.2.weight"]


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_routes_that_need_a_meanfield_posterior_say_so() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    bnn = bf.bayesify(net, variational="rank1")
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    with pytest.raises(TypeError, match="IVON trains mean-field Normal posteriors.*rank1|Rank1Normal"):
        bf.optim.IVON(bnn.parameters(), model=bnn, ess=10)
    with pytest.raises(ValueError, match="laplace sets the spreads of a MeanFieldNormal"):
        bf.laplace(bnn, [(x, y)], likelihood="categorical")
    with pytest.raises(ValueError, match="calibrate rescales MeanFieldNormal spreads"):
        bf.calibrate(bnn, (x, y), "categorical")
    with pytest.raises(ValueError, match="estimator='local'.*use estimator='reparam'"):
        bf.bayesify(net, variational="rank1", estimator="local")
    with pytest.raises(ValueError, match="init_std must be a positive finite number"):
        get_variational("rank1:init_std=0")
    with pytest.raises(ValueError, match="nothing to convert"):  # only 1-D parameters: nothing covered
        bf.bayesify(nn.LayerNorm(4), variational="rank1")
    # the softmax-only calibration needs no spreads and works; so does the linearised predictive
    bf.calibrate(bnn, (x, y), "categorical", posterior=False)
    pred = bf.predict(bnn, x, samples=6, likelihood="categorical", linearized=True)
    assert pred.probs.shape == (10, 3) and (pred.mutual_information > 0).all()


def test_components_sample_in_turn_with_their_own_densities() -> None:
    torch.manual_seed(0)
    q = Rank1Normal(init_std=0.2, prior_std=0.4, components=3)
    weight = torch.randn(4, 3)
    params = q.init(weight)
    assert params["r_mean"].shape == (3, 4) and params["s_rho"].shape == (3, 3)
    assert not torch.equal(params["r_mean"][0], params["r_mean"][1])  # components start apart
    w, log_p, log_q = q.sample_with_prior(weight, params, None, {}, 7, None, True, seed=11, offset=2)
    f, _, _ = q.sample_factors(params, 7, seed=11, offset=2)
    ps = D.Normal(torch.ones(7), torch.full((7,), 0.4))
    for i in range(7):
        c = (2 + i) % 3  # sample i of the chunk at offset 2
        qc = D.Normal(torch.cat([params["r_mean"][c], params["s_mean"][c]]),
                      nn.functional.softplus(torch.cat([params["r_rho"][c], params["s_rho"][c]])))
        torch.testing.assert_close(log_q[i], qc.log_prob(f[i]).sum())
        torch.testing.assert_close(log_p[i], ps.log_prob(f[i]).sum())
        torch.testing.assert_close(w[i], weight * torch.outer(f[i, :4], f[i, 4:]))
    kls = [D.kl_divergence(D.Normal(torch.cat([params["r_mean"][c], params["s_mean"][c]]),
                                    nn.functional.softplus(torch.cat([params["r_rho"][c], params["s_rho"][c]]))),
                           ps).sum() for c in range(3)]
    torch.testing.assert_close(q.kl_to(None, weight, params, {}), torch.stack(kls).mean())
    # a chunked draw is the same samples as the whole call
    whole = q.sample_with_prior(weight, params, None, {}, 9, None, False, seed=5)[0]
    parts = torch.cat([q.sample_with_prior(weight, params, None, {}, k, None, False, seed=5, offset=o)[0]
                       for o, k in ((0, 4), (4, 5))])
    torch.testing.assert_close(parts, whole)


def test_component_std_sets_how_far_apart_components_start() -> None:
    weight = torch.randn(6, 5)
    default = Rank1Normal(init_std=0.2, components=3).init(weight)
    same = Rank1Normal(init_std=0.2, components=3, component_std=0.2).init(weight)
    wide = Rank1Normal(init_std=0.2, components=3, component_std=0.6).init(weight)
    for key in ("r_mean", "s_mean"):
        torch.testing.assert_close(same[key], default[key])  # the default is init_std
        torch.testing.assert_close(wide[key] - 1, 3 * (default[key] - 1))  # the same z, 3x as far
        torch.testing.assert_close(wide[key.replace("mean", "rho")], default[key.replace("mean", "rho")])
    zero = Rank1Normal(init_std=0.2, components=3, component_std=0).init(weight)
    assert torch.equal(zero["r_mean"], torch.ones(3, 6))  # components start together
    # the spec (save / load) carries it only where it was given
    assert "component_std" not in Rank1Normal(components=2).spec()
    back = get_variational(Rank1Normal(components=2, component_std=0.5).spec())
    assert back.component_std == 0.5 and back.components == 2
    assert get_variational("rank1:components=4,component_std=0.5").component_std == 0.5
    with pytest.raises(ValueError, match="components > 1"):
        Rank1Normal(component_std=0.5)
    with pytest.raises(ValueError, match="component_std"):
        Rank1Normal(components=2, component_std=-1.0)
    with pytest.raises(TypeError, match="component_std"):
        Rank1Normal(components=2, component_std="wide")  # type: ignore[arg-type]


def test_components_zero_spread_is_the_point_model_and_train() -> None:
    torch.manual_seed(0)
    model = digits_cnn().eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
        out = bf.bayesify(model, variational=Rank1Normal(init_std=1e-30, components=4)).eval()(x, samples=4)
    torch.testing.assert_close(out, ref.expand_as(out), rtol=0, atol=1e-6 * float(ref.abs().max()))
    bnn = bf.bayesify(model, variational="rank1:components=2").train()
    mc = bf.ELBOLoss("categorical", dataset_size=50)
    an = bf.ELBOLoss("categorical", dataset_size=50, kl="analytic")
    gen = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1, 2, 3])
    kls = []
    for _ in range(40):
        mc(bnn(x, samples=8, generator=gen), y)
        kls.append(mc.last.kl)
    an(bnn(x, samples=2), y)
    kls_t = torch.tensor(kls)
    assert abs(kls_t.mean().item() - an.last.kl) < 4 * kls_t.std().item() / math.sqrt(len(kls)) + 1e-3 * an.last.kl


# --- factor-level linear layers: ((x_s * s_s) @ W^T) * r_s + b, no (S, out, in) weight gradient ---


def _linear_under_vmap(x: torch.Tensor, x_dim: int | None, w: torch.Tensor, b: torch.Tensor | None,
                       b_dim: int | None) -> torch.Tensor:
    from bayesify._batched import SampleLinear

    return torch.vmap(lambda xx, ww, bb: SampleLinear.apply(xx, ww, bb), in_dims=(x_dim, 0, b_dim))(x, w, b)


@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("x_kind", ["shared", "per-sample", "shared 3-D", "per-sample 3-D", "per-sample dim 1"])
@pytest.mark.parametrize("bias", [None, "shared", "per-sample"])
def test_factor_level_linear_equals_the_materialised_samples(monkeypatch: pytest.MonkeyPatch, samples: int,
                                                             x_kind: str, bias: str | None) -> None:
    import bayesify._batched as batched

    monkeypatch.setattr(batched, "RANK1_FACTOR_MAX_RATIO", math.inf)  # these shapes: always the factor path
    gen = torch.Generator().manual_seed(samples * 100 + len(x_kind))
    o, i, n = 5, 4, 6
    shape = {"shared": (n, i), "per-sample": (samples, n, i), "shared 3-D": (n, 2, i),
             "per-sample 3-D": (samples, n, 2, i), "per-sample dim 1": (n, samples, i)}[x_kind]
    x_dim = {"shared": None, "shared 3-D": None, "per-sample dim 1": 1}.get(x_kind, 0)
    leaves = {"x": torch.randn(shape, generator=gen, dtype=torch.double),
              "W": torch.randn(o, i, generator=gen, dtype=torch.double),
              "r": 1 + 0.3 * torch.randn(samples, o, generator=gen, dtype=torch.double),
              "s": 1 + 0.3 * torch.randn(samples, i, generator=gen, dtype=torch.double)}
    if bias is not None:
        leaves["b"] = torch.randn((o,) if bias == "shared" else (samples, o), generator=gen, dtype=torch.double)
    results = []
    for factors in (False, True):
        monkeypatch.setattr(batched, "RANK1_FACTORS", factors)
        t = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        w = rank1_product(t["W"], t["r"], t["s"])
        through_w = []
        w.register_hook(lambda g: through_w.append(g))
        out = _linear_under_vmap(t["x"], x_dim, w, t.get("b"), None if bias in (None, "shared") else 0)
        assert out.shape == (samples, *shape[:x_dim], *shape[x_dim + 1:-1], o) if x_dim is not None \
            else out.shape == (samples, *shape[:-1], o)
        out.mul(torch.linspace(-1, 2, out.numel(), dtype=torch.double).view(out.shape)).sum().backward()
        assert bool(through_w) != factors  # the factor path sends nothing through the samples
        results.append((out.detach(), {k: v.grad for k, v in t.items()}))
    (out0, g0), (out1, g1) = results
    torch.testing.assert_close(out1, out0)
    assert g1.keys() == g0.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], msg=lambda m: f"gradient of {k}: {m}")


def _grads_both_ways(monkeypatch: pytest.MonkeyPatch, make: Any, inputs: Any, target: torch.Tensor,
                     **call: Any) -> list[tuple[torch.Tensor, dict[str, torch.Tensor], int]]:
    import bayesify._batched as batched
    from bayesify._rank1 import Rank1Product

    backward = Rank1Product.backward
    runs: list[int] = []

    def counted(ctx: Any, g: torch.Tensor) -> Any:
        runs.append(1)
        return backward(ctx, g)

    monkeypatch.setattr(Rank1Product, "backward", staticmethod(counted))
    monkeypatch.setattr(batched, "RANK1_FACTOR_MAX_RATIO", math.inf)  # every linear layer: the factor path
    results = []
    for factors in (False, True):
        monkeypatch.setattr(batched, "RANK1_FACTORS", factors)
        bnn = make()
        args, kwargs = inputs()
        runs.clear()
        out = bnn(*args, samples=3, generator=torch.Generator().manual_seed(5), **kwargs, **call)
        logits = getattr(out, "logits", out)
        loss = bf.ELBOLoss("categorical", dataset_size=20)(logits, target)
        loss.backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in bnn.named_parameters()
                                          if p.grad is not None}, len(runs)))
    return results


@pytest.mark.parametrize("call", [{}, {"chunk_size": 2}, {"recompute_samples": True}], ids=str)
def test_factor_level_mlp_equals_the_materialised_samples(monkeypatch: pytest.MonkeyPatch, call: dict) -> None:
    def make() -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        return bf.bayesify(net, variational="rank1:init_std=0.3").train()

    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(1))
    (out0, g0, runs0), (out1, g1, runs1) = _grads_both_ways(monkeypatch, make, lambda: ((x,), {}),
                                                            torch.tensor([0, 2, 1, 0]), **call)
    assert runs0 >= 3 and runs1 == 0  # every layer's samples went unused by backward
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g0.keys() and any(n.endswith("r_rho") for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("call", [{}, {"recompute_samples": True}], ids=str)
def test_factor_level_bert_equals_the_materialised_samples(monkeypatch: pytest.MonkeyPatch, call: dict) -> None:
    torch.manual_seed(0)
    tokens = _tokens()
    (out0, g0, runs0), (out1, g1, runs1) = _grads_both_ways(
        monkeypatch, lambda: bf.bayesify(tiny_bert().train(), variational="rank1:init_std=0.3"), lambda: tokens,
        torch.tensor([0, 2]), **call)
    # the 14 linear layers take the factor path; the word, position and token-type embeddings do not
    assert (runs0, runs1) == (17, 3)
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g0.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_factor_level_only_where_few_rows_per_sample() -> None:
    """The rule (``RANK1_FACTOR_MAX_RATIO``): the factor path where a sample's rows ``M`` have
    ``M (in + out) <= in * out``; more rows go through the materialised samples."""
    torch.manual_seed(0)
    weight = torch.randn(8, 6, requires_grad=True)
    r, s = torch.ones(3, 8, requires_grad=True), torch.ones(3, 6, requires_grad=True)
    for rows, factors in ((3, True), (4, False)):  # 3 * 14 <= 48 < 4 * 14
        w = rank1_product(weight, r, s)
        through_w = []
        w.register_hook(lambda g: through_w.append(g))
        _linear_under_vmap(torch.randn(3, rows, 6), 0, w, None, None).sum().backward()
        assert bool(through_w) != factors, rows


# --- benchmarks/quality.py's rank-1 recipe options (issue 14, out-of-sample targets) ---


def _quality_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_bench_rank1", ROOT / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_quality_rank1_recipe_factor_means_rate_and_dropout_off() -> None:
    """``_train_rank1(means_lr=...)``: the factor means move at their own rate (0: not at all, and the
    spreads and weights still train); ``train_dropout=False`` keeps the network's dropout off in the
    fine-tune (a different fit from the same start)."""
    q = _quality_module()
    task = q.Diabetes(quick=True)
    task.steps = 20
    net = task.pretrain(0)

    def factors(bnn: bf.BayesianModel, suffix: str) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in bnn.named_parameters() if n.endswith(suffix)}

    start = bf.bayesify(net, variational=Rank1Normal())
    frozen = q._train_rank1(task, copy.deepcopy(net), 0, means_lr=0.0)
    for n, p in factors(frozen, "_mean").items():
        torch.testing.assert_close(p, factors(start, "_mean")[n], rtol=0, atol=0)  # means untouched
    assert any(not torch.equal(p, factors(start, "_rho")[n]) for n, p in factors(frozen, "_rho").items())
    w0 = dict(start.named_parameters())["model.0.weight"]
    assert not torch.equal(dict(frozen.named_parameters())["model.0.weight"], w0)

    fast = q._train_rank1(task, copy.deepcopy(net), 0)
    slow = q._train_rank1(task, copy.deepcopy(net), 0, means_lr=1e-3)

    def drift(bnn: bf.BayesianModel) -> float:
        return max(float((p - 1).abs().max()) for p in factors(bnn, "_mean").values())
    assert 0 < drift(slow) < drift(fast)  # 20 Adam steps: at most ~20 * lr from 1
    assert drift(slow) <= 20 * 1e-3 * 1.05

    seen: list[bool] = []  # the dropout layers' mode at each call of the fine-tune
    probe = copy.deepcopy(net)
    for m in probe.modules():
        if isinstance(m, nn.Dropout):
            m.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    q._train_rank1(task, probe, 0, train_dropout=False)
    assert len(seen) == 2 * task.steps and not any(seen)
    seen.clear()
    q._train_rank1(task, copy.deepcopy(probe), 0)
    assert len(seen) == 2 * task.steps and all(seen)


def test_quality_rank1_prior_by_validation_nll(capsys: pytest.CaptureFixture[str]) -> None:
    """The row ``rank-1 (prior by validation NLL)`` fits every prior scale of the grid and keeps the
    one with the lowest NLL on the validation split (printed), never reading the test set."""
    q = _quality_module()
    task = q.Diabetes(quick=True)
    task.steps = 5
    net = task.pretrain(0)
    pred = q.METHODS["rank-1 (prior by validation NLL)"](task, net, 0)
    chosen = float(capsys.readouterr().out.split("prior ")[-1].split(",")[0])
    assert chosen in q.RANK1_PRIOR_GRID
    nlls = {}
    for prior in q.RANK1_PRIOR_GRID:
        fit = q._bnn_predictive(task, q._train_rank1(task, copy.deepcopy(net), 0, prior_std=prior), 0)(task.x_val)
        nlls[prior] = bf.metrics.gaussian_nll(fit["mean"], fit["var"], task.y_val.reshape(-1))
    assert chosen == min(nlls, key=nlls.get)
    out = pred(task.x_test)
    assert out["mean"].shape == (len(task.y_test),) and (out["epistemic_var"] > 0).all()
