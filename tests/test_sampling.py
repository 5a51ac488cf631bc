"""The sampled forward of VIModule (vmap, fallback, log_probs, gradients) and the ELBO loss."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, distributions as D, nn

import bayesify as bf
from bayesify.module import _active as plain_forward
from bayesify.priors import Laplace, Normal
from bayesify.variational import MeanFieldNormal, PointMass

from .watch import LargestTensor


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class MLP(bf.VIModule):
    """Linear -> tanh -> LayerNorm -> Linear with different priors per layer."""

    def __init__(self, d_in: int = 4, hidden: int = 8, d_out: int = 3, std: float = 0.1) -> None:
        super().__init__()
        q = MeanFieldNormal(init_std=std)
        self.fc1 = bf.nn.VILinear(d_in, hidden, prior=Normal(0.0, 0.5), variational=q)
        self.norm = bf.nn.VILayerNorm(hidden, prior=Normal("pretrained", 0.2), variational=q)
        self.fc2 = bf.nn.VILinear(hidden, d_out, prior=Laplace(0.0, 1.0), variational=q)
        self.drop = nn.Identity()

    def forward(self, x):
        return self.fc2(self.drop(self.norm(torch.tanh(self.fc1(x)))))


def _hand_mlp(x, w, s):
    """The MLP written out for the s-th weight sample ``w`` (qualified names -> (S, ...))."""
    h = torch.tanh(F.linear(x, w["fc1.weight"][s], w["fc1.bias"][s]))
    h = F.layer_norm(h, (h.shape[-1],), w["norm.weight"][s], w["norm.bias"][s], 1e-5)
    return F.linear(h, w["fc2.weight"][s], w["fc2.bias"][s])


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP().double()


X = torch.randn(5, 4, generator=_gen(1), dtype=torch.float64)


# --------------------------------------------------------------------------------------
# vmap == loop, vectorisation
# --------------------------------------------------------------------------------------


def test_vmap_equals_hand_written_loop(mlp):
    S = 6
    out = mlp(X, samples=S, generator=_gen(42))
    w, *_ = mlp._draw(S, _gen(42), False)
    assert set(w) == {"fc1.weight", "fc1.bias", "norm.weight", "norm.bias", "fc2.weight", "fc2.bias"}
    assert out.shape == (S, 5, 3)
    for s in range(S):
        torch.testing.assert_close(out[s], _hand_mlp(X, w, s), rtol=1e-10, atol=1e-10)
    # the draws are distinct samples: different outputs per sample
    assert not torch.allclose(out[0], out[1])


def test_vmap_equals_functional_call_per_sample(mlp):
    S = 4
    out = mlp(X, samples=S, generator=_gen(3))
    w, *_ = mlp._draw(S, _gen(3), False)
    # run each sample through the same module with torch.func.functional_call; inside
    # plain_forward() the module is not outermost, so it runs its plain forward
    for s in range(S):
        with plain_forward():
            ref = torch.func.functional_call(mlp, {k: v[s] for k, v in w.items()}, (X,))
        assert ref.shape == (5, 3)  # a plain forward: no sample dim
        torch.testing.assert_close(out[s], ref, rtol=1e-10, atol=1e-10)


def test_draw_shapes_and_values(mlp):
    S = 5
    w, log_p, log_q, kl = mlp._draw(S, _gen(0), True)
    for site in mlp.bayesian_sites():
        assert w[site.qualname].shape == (S, *site.mean.shape)
    assert log_p.shape == (S,) and log_q.shape == (S,)
    assert kl.shape == ()


def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("S", [1, 7, 32])
def test_samples_are_vectorised(mlp, S):
    calls_fc1 = _count_calls(mlp.fc1)
    calls_outer = _count_calls(mlp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        out = mlp(X, samples=S)
    assert out.shape == (S, 5, 3)
    assert calls_fc1[0] == 1  # one traced call for all S samples
    assert calls_outer[0] == 1


def test_chunk_size(mlp):
    calls = _count_calls(mlp.fc1)
    a = mlp(X, samples=6, generator=_gen(5))
    b = mlp(X, samples=6, generator=_gen(5), chunk_size=2)
    assert calls[0] == 1 + 3
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_chunk_size_draws_weights_chunk_by_chunk_and_matches_unchunked():
    # Memory: with chunk_size the weights are drawn per chunk, so no tensor holds more than
    # chunk_size weight samples; BatchNorm running stats move exactly as without chunks.
    torch.manual_seed(0)
    point = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 400),
                          nn.ReLU(), nn.Linear(400, 400))
    a, b = bf.bayesify(point).train(), bf.bayesify(point).train()
    x = torch.randn(2, 2, 6, 6)
    out_a = a(x, samples=8, generator=_gen(3))
    with LargestTensor() as watch:
        out_b = b(x, samples=8, generator=_gen(3), chunk_size=3)
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(out_a.log_probs, out_b.log_probs)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(va, vb, msg=ka)
    assert watch.largest <= 3 * 400 * 400  # never 8 samples of the 400x400 weight
    with torch.no_grad():
        b.eval()(x, samples=7, chunk_size=2)  # an uneven last chunk


def test_default_samples_is_ten(mlp):
    assert mlp(X).shape == (10, 5, 3)


# --------------------------------------------------------------------------------------
# argument checks, reproducibility
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, False, "3", 3.0, torch.tensor(3), [3]])
def test_bad_samples_raise_value_error(mlp, bad):
    with pytest.raises(ValueError, match="samples"):
        mlp(X, samples=bad)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_bad_chunk_size_raises_value_error(mlp, bad):
    with pytest.raises(ValueError, match="chunk_size"):
        mlp(X, samples=2, chunk_size=bad)


def test_bad_generator_raises_type_error(mlp):
    with pytest.raises(TypeError, match="Generator"):
        mlp(X, samples=2, generator=0)


def test_generator_reproducibility(mlp):
    a = mlp(X, samples=4, generator=_gen(7))
    b = mlp(X, samples=4, generator=_gen(7))
    c = mlp(X, samples=4, generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.equal(a.log_probs, b.log_probs)
    # without a generator: the global RNG
    torch.manual_seed(1)
    d = mlp(X, samples=4)
    torch.manual_seed(1)
    e = mlp(X, samples=4)
    f = mlp(X, samples=4)
    assert torch.equal(d, e) and not torch.allclose(e, f)


def test_generator_also_drives_in_forward_randomness(mlp):
    mlp.drop = nn.Dropout(0.5)
    a = mlp(X, samples=4, generator=_gen(7))
    torch.manual_seed(123)  # the global RNG must not matter when a generator is given
    b = mlp(X, samples=4, generator=_gen(7))
    assert torch.equal(a, b)
    # dropout masks differ between samples (randomness="different")
    mlp.fc1.weight_rho.data.fill_(-30.0)  # ~zero weight noise: only dropout varies
    mlp.norm.weight_rho.data.fill_(-30.0)
    mlp.norm.bias_rho.data.fill_(-30.0)
    mlp.fc2.weight_rho.data.fill_(-30.0)
    mlp.fc2.bias_rho.data.fill_(-30.0)
    mlp.fc1.bias_rho.data.fill_(-30.0)
    out = mlp(X, samples=4, generator=_gen(1))
    assert not torch.allclose(out[0], out[1])


# --------------------------------------------------------------------------------------
# log_probs
# --------------------------------------------------------------------------------------


def test_log_probs_hand_computation(mlp):
    S = 5
    mlp.train()
    out = mlp(X, samples=S, generator=_gen(11))
    assert out.log_probs.shape == (S, 2)
    w, *_ = mlp._draw(S, _gen(11), False)
    log_p = torch.zeros(S, dtype=torch.float64)
    log_q = torch.zeros(S, dtype=torch.float64)
    priors = {
        "fc1.weight": lambda v: D.Normal(0.0, 0.5).log_prob(v),
        "fc1.bias": lambda v: D.Normal(0.0, 0.5).log_prob(v),
        "norm.weight": lambda v: D.Normal(torch.ones(8, dtype=torch.float64), 0.2).log_prob(v),  # pretrained loc
        "norm.bias": lambda v: D.Normal(torch.zeros(8, dtype=torch.float64), 0.2).log_prob(v),
        "fc2.weight": lambda v: D.Laplace(0.0, 1.0).log_prob(v),
        "fc2.bias": lambda v: D.Laplace(0.0, 1.0).log_prob(v),
    }
    params = dict(mlp.named_parameters())
    for name, sample in w.items():
        mean, std = params[name], F.softplus(params[name + "_rho"])
        for s in range(S):
            log_p[s] += priors[name](sample[s]).sum()
            log_q[s] += D.Normal(mean, std).log_prob(sample[s]).sum()
    torch.testing.assert_close(out.log_probs[:, 0], log_p, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(out.log_probs[:, 1], log_q, rtol=1e-8, atol=1e-8)
    # differentiable
    assert out.log_probs.requires_grad


def test_log_probs_pointmass_and_flat():
    class Net(bf.VIModule):
        def __init__(self):
            super().__init__()
            self.a = bf.nn.VILinear(3, 2, prior=Normal(0.0, 2.0), variational=PointMass())
            self.b = bf.nn.VILinear(2, 2, prior="flat", variational="meanfield:init_std=0.1")

        def forward(self, x):
            return self.b(self.a(x))

    net = Net()
    out = net(torch.randn(4, 3), samples=3)
    assert out.log_probs.shape == (3, 2)
    # point mass: the prior density at the mean, the same for every sample; flat: 0
    lp = D.Normal(0.0, 2.0).log_prob(net.a.weight).sum() + D.Normal(0.0, 2.0).log_prob(net.a.bias).sum()
    torch.testing.assert_close(out.log_probs[:, 0], lp.expand(3))
    w, *_ = net._draw(3, _gen(0), False)
    assert set(w) == {"b.weight", "b.bias"}  # point-mass weights are never materialised per sample


def test_no_log_probs_in_eval_mode(mlp):
    mlp.eval()
    out = mlp(X, samples=3)
    assert out.shape == (3, 5, 3)
    assert not hasattr(out, "log_probs")
    assert not hasattr(out, "kl_analytic")
    mlp.train()
    assert mlp(X, samples=3).log_probs.shape == (3, 2)


def test_structured_outputs_all_get_sample_dim_and_log_probs():
    class Net(bf.VIModule):
        def __init__(self):
            super().__init__()
            self.fc = bf.nn.VILinear(3, 2)

        def forward(self, x):
            y = self.fc(x)
            return {"logits": y, "aux": (y.sum(-1), "tag"), "n": 3}

    out = Net()(torch.randn(4, 3), samples=5)
    assert out["logits"].shape == (5, 4, 2)
    assert out["aux"][0].shape == (5, 4)
    assert out["aux"][1] == "tag" and out["n"] == 3
    assert out["logits"].log_probs.shape == (5, 2)
    assert torch.equal(out["aux"][0].log_probs, out["logits"].log_probs)


# --------------------------------------------------------------------------------------
# gradients: each sample's gradient uses its own noise
# --------------------------------------------------------------------------------------


def test_multi_sample_gradient_matches_hand_computation():
    torch.manual_seed(0)
    S, N, d_in, d_out, prior_scale = 5, 7, 3, 2, 0.8
    layer = bf.nn.VILinear(d_in, d_out, prior=Normal(0.0, prior_scale),
                           variational=MeanFieldNormal(init_std=0.3)).double()
    with torch.no_grad():
        layer.weight_rho.add_(0.4 * torch.randn_like(layer.weight_rho))
        layer.bias_rho.add_(0.4 * torch.randn_like(layer.bias_rho))
    x = torch.randn(N, d_in, dtype=torch.float64)
    t = torch.randn(N, d_out, dtype=torch.float64)

    out = layer(x, samples=S, generator=_gen(5))
    nll = 0.5 * (out - t).square().sum((1, 2)).mean()
    kl = (out.log_probs[:, 1] - out.log_probs[:, 0]).mean()
    (nll + kl).backward()

    # the same noise, recovered from the layer's own draws
    with torch.no_grad():
        w, *_ = layer._draw(S, _gen(5), False)
        grads = {}
        for name in ("weight", "bias"):
            mu, rho = getattr(layer, name), getattr(layer, name + "_rho")
            sig = F.softplus(rho)
            ws = w[name]
            eps = (ws - mu) / sig
            # y_s = x W_s^T + b_s ; d nll / d y_s = (y_s - t) / S
            ys = torch.einsum("ni,soi->sno", x, w["weight"]) + w["bias"][:, None, :]
            r = (ys - t) / S
            if name == "weight":
                d_ws = torch.einsum("sno,ni->soi", r, x)
            else:
                d_ws = r.sum(1)
            # KL: -log p contributes W_s / scale^2 / S per sample; log q (through eps) only -1/sigma via rho
            d_ws = d_ws + ws / prior_scale**2 / S
            d_mu = d_ws.sum(0)
            d_rho = (d_ws * eps).sum(0) * torch.sigmoid(rho) - torch.sigmoid(rho) / sig
            grads[name] = (d_mu, d_rho, d_ws, eps)

    for name in ("weight", "bias"):
        d_mu, d_rho, d_ws, eps = grads[name]
        torch.testing.assert_close(getattr(layer, name).grad, d_mu, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(getattr(layer, name + "_rho").grad, d_rho, rtol=1e-9, atol=1e-10)
        # the bayesian-torch bug (every sample's gradient with the last sample's noise)
        # gives a clearly different rho gradient: the check above can tell them apart
        wrong = (d_ws * eps[-1]).sum(0) * torch.sigmoid(getattr(layer, name + "_rho")) \
            - torch.sigmoid(getattr(layer, name + "_rho")) / F.softplus(getattr(layer, name + "_rho"))
        assert (wrong - d_rho).abs().max() > 1e-3


def test_gradient_equals_loop_of_single_sample_gradients(mlp):
    """The gradient of the S-sample mean loss == the mean of S one-sample gradients (same draws)."""
    S = 4
    out = mlp(X, samples=S, generator=_gen(9))
    out.square().mean().backward()
    vec = {n: p.grad.clone() for n, p in mlp.named_parameters()}
    mlp.zero_grad()
    w, *_ = mlp._draw(S, _gen(9), False)
    for s in range(S):
        # rebuild the s-th sample from the parameters so the gradient flows to mean and rho
        params = dict(mlp.named_parameters())
        sample = {}
        for k, v in w.items():
            eps = ((v[s] - params[k]) / F.softplus(params[k + "_rho"])).detach()
            sample[k] = params[k] + F.softplus(params[k + "_rho"]) * eps
        with plain_forward():
            one = torch.func.functional_call(mlp, sample, (X,))
        assert one.shape == (5, 3)
        (one.square().mean() / S).backward()
    for n, p in mlp.named_parameters():
        torch.testing.assert_close(p.grad, vec[n], rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------------------
# the loop fallback
# --------------------------------------------------------------------------------------


class Branchy(bf.VIModule):
    """Python control flow on a sampled value: vmap cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc1 = bf.nn.VILinear(4, 6, variational="meanfield:init_std=0.5")
        self.fc2 = bf.nn.VILinear(6, 2, variational="meanfield:init_std=0.5")

    def forward(self, x):
        h = self.fc1(x)
        if h.sum() > 0:
            h = 2.0 * h
        else:
            h = -h
        return self.fc2(h)


def test_loop_fallback_warns_and_matches_per_sample():
    torch.manual_seed(0)
    net = Branchy().double()
    S = 8
    with pytest.warns(RuntimeWarning, match="data-dependent control flow") as rec:
        out = net(X, samples=S, generator=_gen(4))
    msg = str(rec[0].message)
    assert "vmap" in msg and "one by one" in msg and "Branchy" in msg
    assert out.shape == (S, 5, 2)
    assert out.log_probs.shape == (S, 2)
    w, *_ = net._draw(S, _gen(4), False)
    branches = set()
    for s in range(S):
        h = F.linear(X, w["fc1.weight"][s], w["fc1.bias"][s])
        branches.add(bool(h.sum() > 0))
        h = 2.0 * h if h.sum() > 0 else -h
        torch.testing.assert_close(out[s], F.linear(h, w["fc2.weight"][s], w["fc2.bias"][s]))
    assert branches == {True, False}  # the samples really took different branches
    # the cause is remembered; later calls loop directly (S forward calls) and warn again
    calls = _count_calls(net.fc1)
    with pytest.warns(RuntimeWarning, match="one by one"):
        again = net(X, samples=S, generator=_gen(4))
    assert calls[0] == S
    assert torch.equal(again, out)
    # gradients flow in the fallback too
    again.sum().backward()
    assert net.fc1.weight_rho.grad is not None and net.fc1.weight_rho.grad.abs().sum() > 0


def test_model_errors_are_not_swallowed(mlp):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError):
            mlp(torch.randn(5, 7, dtype=torch.float64), samples=3)  # wrong input width
    assert mlp._vmap_failure is None


# --------------------------------------------------------------------------------------
# nesting
# --------------------------------------------------------------------------------------


class Inner(bf.VIModule):
    def __init__(self):
        super().__init__()
        self.fc = bf.nn.VILinear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x))


class Outer(bf.VIModule):
    def __init__(self, pass_samples: bool = False):
        super().__init__()
        self.block = Inner()
        self.seq = nn.Sequential(bf.nn.VILinear(4, 3), nn.Tanh())
        self.pass_samples = pass_samples

    def forward(self, x):
        h = self.block(x, samples=2) if self.pass_samples else self.block(x)
        return self.seq(h)


def test_nested_vimodules_add_one_sample_dim():
    net = Outer()
    calls = _count_calls(net.block)
    out = net(torch.randn(6, 4), samples=5)
    assert out.shape == (5, 6, 3)
    assert calls[0] == 1
    assert len(net.bayesian_sites()) == 4
    # the inner module used alone is itself outermost
    assert net.block(torch.randn(6, 4), samples=3).shape == (3, 6, 4)
    # log_probs cover every site of every nested module
    out = net(torch.randn(6, 4), samples=5, generator=_gen(0))
    _, lp, lq, _ = net._draw(5, _gen(0), True)
    torch.testing.assert_close(out.log_probs, torch.stack([lp, lq], 1))


def test_inner_module_rejects_samples():
    with pytest.raises(ValueError, match="outermost"):
        Outer(pass_samples=True)(torch.randn(6, 4), samples=5)


# --------------------------------------------------------------------------------------
# ELBOLoss
# --------------------------------------------------------------------------------------


class Classifier(bf.VIModule):
    def __init__(self, d_in=4, n_cls=3):
        super().__init__()
        self.fc = bf.nn.VILinear(d_in, n_cls, prior=Normal(0.0, 1.0), variational="meanfield:init_std=0.2")

    def forward(self, x):
        return self.fc(x)


def test_elbo_categorical_hand_computation():
    torch.manual_seed(0)
    net = Classifier().double()
    y = torch.tensor([0, 2, 1, 1, 0])
    out = net(X, samples=6)
    loss = bf.ELBOLoss("categorical", dataset_size=100)(out, y)
    logp = torch.log_softmax(out, -1)  # (S, N, C)
    nll = -logp[:, torch.arange(5), y].mean()
    kl = (out.log_probs[:, 1] - out.log_probs[:, 0]).mean()
    torch.testing.assert_close(loss, nll + kl / 100)
    # kl_weight scales the KL term only
    loss0 = bf.ELBOLoss("categorical", dataset_size=100, kl_weight=0.0)(out, y)
    torch.testing.assert_close(loss0, nll)
    loss2 = bf.ELBOLoss("categorical", dataset_size=100, kl_weight=2.0)(out, y)
    torch.testing.assert_close(loss2, nll + 2 * kl / 100)


def test_elbo_accepts_structured_outputs():
    torch.manual_seed(0)
    net = Classifier().double()
    y = torch.tensor([0, 2, 1, 1, 0])
    out = net(X, samples=3)
    fn = bf.ELBOLoss("categorical", dataset_size=10)
    ref = fn(out, y)
    torch.testing.assert_close(fn({"logits": out, "other": out * 0}, y), ref)
    torch.testing.assert_close(fn((out, "x"), y), ref)


@pytest.mark.parametrize("noise_std", [1.0, 0.3])
def test_elbo_normal_fixed_noise_hand_computation(noise_std):
    torch.manual_seed(0)
    net = Classifier(d_in=4, n_cls=1).double()
    y = torch.randn(5, 1, dtype=torch.float64)
    out = net(X, samples=6)
    fn = bf.ELBOLoss("normal", dataset_size=50, noise_std=noise_std)
    assert list(fn.parameters()) == []
    loss = fn(out, y)
    nll = -D.Normal(out, noise_std).log_prob(y.expand_as(out)).mean()
    kl = (out.log_probs[:, 1] - out.log_probs[:, 0]).mean()
    torch.testing.assert_close(loss, nll + kl / 50)
    assert fn.noise_std.item() == pytest.approx(noise_std)


def test_elbo_normal_learned_noise():
    torch.manual_seed(0)
    net = Classifier(d_in=4, n_cls=2).double()
    y = torch.randn(5, 2, dtype=torch.float64)
    fn = bf.ELBOLoss("gaussian", dataset_size=50, noise_std="learn").double()
    params = list(fn.parameters())
    assert len(params) == 1 and fn.noise_std.item() == pytest.approx(1.0)
    with torch.no_grad():
        fn.log_noise_std.fill_(math.log(0.7))
    out = net(X, samples=4)
    loss = fn(out, y)
    nll = -D.Normal(out, 0.7).log_prob(y.expand_as(out)).mean()
    kl = (out.log_probs[:, 1] - out.log_probs[:, 0]).mean()
    torch.testing.assert_close(loss, nll + kl / 50)
    loss.backward()
    # d nll / d log sigma = 1 - mean(z^2)
    z2 = ((y - out.detach()) / 0.7).square().mean()
    torch.testing.assert_close(fn.log_noise_std.grad, (1 - z2).to(fn.log_noise_std.grad.dtype))
    assert net.fc.weight_rho.grad is not None


@pytest.mark.parametrize("kwargs", [{}, {"dataset_size": None}, {"dataset_size": 0}, {"dataset_size": -5},
                                    {"dataset_size": 2.5}, {"dataset_size": True}, {"dataset_size": "10"}])
def test_elbo_dataset_size_required(kwargs):
    with pytest.raises(ValueError, match="dataset_size"):
        bf.ELBOLoss("categorical", **kwargs)


def test_elbo_argument_errors():
    with pytest.raises(ValueError, match="categorical") as exc:
        bf.ELBOLoss("poisson", dataset_size=10)
    assert "normal" in str(exc.value)
    with pytest.raises(ValueError, match="analytic"):
        bf.ELBOLoss("normal", dataset_size=10, kl="exact")
    with pytest.raises(ValueError, match="noise_std"):
        bf.ELBOLoss("normal", dataset_size=10, noise_std=0.0)
    with pytest.raises(ValueError, match="noise_std"):
        bf.ELBOLoss("normal", dataset_size=10, noise_std="learned")
    with pytest.raises(ValueError, match="kl_weight"):
        bf.ELBOLoss("normal", dataset_size=10, kl_weight=-1.0)


@pytest.mark.parametrize("kl", ["mc", "analytic"])
def test_elbo_in_eval_mode_is_a_clear_error(kl):
    net = Classifier().eval()
    out = net(X.float(), samples=3)
    with pytest.raises(ValueError, match=r"train"):
        bf.ELBOLoss("categorical", dataset_size=10, kl=kl)(out, torch.zeros(5, dtype=torch.long))


def test_elbo_without_sample_dim_is_a_clear_error():
    net = Classifier()
    with pytest.raises(ValueError, match="sample"):
        bf.ELBOLoss("normal", dataset_size=10)(torch.randn(5), torch.randn(5))
    assert net  # keep flake quiet


@pytest.mark.parametrize("prior", [Normal(0.0, 0.5), Normal("pretrained", 0.3), Laplace(0.2, 0.4)],
                         ids=["normal", "pretrained", "laplace"])
def test_elbo_analytic_and_mc_kl_agree_in_expectation(prior):
    torch.manual_seed(0)

    class Net(bf.VIModule):
        def __init__(self):
            super().__init__()
            self.a = bf.nn.VILinear(4, 5, prior=prior, variational="meanfield:init_std=0.2")
            self.b = bf.nn.VILayerNorm(5, prior=prior, variational="meanfield:init_std=0.1")

        def forward(self, x):
            return self.b(self.a(x))

    net = Net().double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    S = 4000
    out = net(X, samples=S)
    y = torch.randn(5, 5, dtype=torch.float64)
    mc = bf.ELBOLoss("normal", dataset_size=1, kl="mc")
    an = bf.ELBOLoss("normal", dataset_size=1, kl="analytic")
    nll = mc.nll(out, y)
    kl_mc = mc(out, y) - nll
    kl_an = an(out, y) - nll
    torch.testing.assert_close(kl_an, net.kl_divergence())
    per = out.log_probs[:, 1] - out.log_probs[:, 0]
    se = per.std() / math.sqrt(S)
    assert abs(kl_mc - kl_an) < 5 * se, (kl_mc.item(), kl_an.item(), se.item())
    # both are differentiable in the variational parameters
    kl_an.backward()
    assert net.a.weight_rho.grad is not None


def test_elbo_analytic_kl_without_closed_form_is_a_clear_error():
    class Net(bf.VIModule):
        def __init__(self):
            super().__init__()
            self.a = bf.nn.VILinear(4, 2, prior="studentt")

        def forward(self, x):
            return self.a(x)

    out = Net()(X.float(), samples=2)
    with pytest.raises(ValueError, match="kl='mc'"):
        bf.ELBOLoss("normal", dataset_size=10, kl="analytic")(out, torch.randn(5, 2))
    # mc works for the same model
    assert torch.isfinite(bf.ELBOLoss("normal", dataset_size=10, kl="mc")(out, torch.randn(5, 2)))


def test_stochastic_depth_runs_vectorised_and_drops_per_sample():
    # torchvision's StochasticDepth (EfficientNet, ConvNeXt, Swin) draws its mask into an
    # unbatched tensor: in train mode vmap refused it and every sample ran in the loop.
    from torchvision.ops import StochasticDepth

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.depth = StochasticDepth(0.5, "row")

        def forward(self, x):
            return self.depth(self.fc(x))

    torch.manual_seed(0)
    bnn = bf.bayesify(Net(), variational="pointmass").train()  # equal weights: only the drops differ
    x = torch.randn(64, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no loop fallback
        out = bnn(x, samples=8)
    assert type(bnn.model.depth) is StochasticDepth  # the user's module is left as it was
    dropped = (out == 0).all(-1)  # (samples, rows)
    assert 0.3 < dropped.float().mean() < 0.7
    assert not all(torch.equal(dropped[0], dropped[s]) for s in range(1, 8))  # each sample its own rows
    with torch.no_grad():
        scaled = (bnn.model.fc(x) / 0.5).expand(8, -1, -1)
    torch.testing.assert_close(out[~dropped], scaled[~dropped])
    bnn.eval()
    torch.testing.assert_close(bnn(x, samples=2)[0], bnn.model.fc(x))  # identity outside training


@pytest.mark.parametrize("in_dims", [(0, 0, 0), (None, 0, 0), (0, 0, None), (None, 0, None), (2, 1, 0), (0, None, 0)])
def test_per_sample_linear_equals_vmapped_f_linear(in_dims):
    # VILinear's rule for per-sample weights: the outputs of PyTorch's own vmap rule bit for
    # bit, the same gradients, and the weight gradient contiguous in the weight's layout.
    from bayesify._batched import SampleLinear as _SampleLinear

    g = _gen(0)
    s, n, i, o = 4, 6, 5, 3
    x = torch.randn(n, 2, i, generator=g) if in_dims[0] is None else torch.randn(n, 2, i, s, generator=g)
    x = x.movedim(-1, in_dims[0]) if in_dims[0] is not None else x
    w = torch.randn(o, i, generator=g) if in_dims[1] is None else torch.randn(o, s, i, generator=g).movedim(1, in_dims[1])
    b = torch.randn(o, generator=g) if in_dims[2] is None else torch.randn(s, o, generator=g)
    for t in (x, w, b):
        t.requires_grad_()
    ref = torch.vmap(F.linear, in_dims=in_dims)(x, w, b)
    out = torch.vmap(_SampleLinear.apply, in_dims=in_dims)(x, w, b)
    assert torch.equal(out, ref)
    up = torch.randn(ref.shape, generator=g)
    for got, want in zip(torch.autograd.grad(out, (x, w, b), up), torch.autograd.grad(ref, (x, w, b), up)):
        torch.testing.assert_close(got, want)


def test_linear_weight_gradients_reach_the_draws_contiguous(monkeypatch):
    # vmapped F.linear hands its weight gradient over as a transpose; the draws' backward then
    # reads every sample through a strided copy. VILinear's own rule returns it contiguous
    # (where the layer does not take the draw's gradients itself: _normal.FUSED_WEIGHT_GRADS).
    from bayesify import _normal

    monkeypatch.setattr(_normal, "FUSED_WEIGHT_GRADS", False)
    seen = []
    backward = _normal._MeanFieldDraw.backward

    def recording(ctx, gw, *rest):
        seen.append((tuple(gw.shape), gw.is_contiguous()))
        return backward(ctx, gw, *rest)

    monkeypatch.setattr(_normal._MeanFieldDraw, "backward", staticmethod(recording))
    bnn = bf.bayesify(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)))
    x = torch.randn(5, 6, requires_grad=True)  # the first layer also passes an input gradient
    out = bnn(x, samples=3)
    (out.sum() + out.log_probs.sum()).backward()
    weights = [c for shape, c in seen if len(shape) == 3]
    assert len(weights) == 2 and all(weights), seen
    assert x.grad is not None


@pytest.mark.parametrize("x_in", ["batched", "shared", "batched at dim 2", "unbatched per sample"])
@pytest.mark.parametrize("bias", ["per sample", "shared", None])
@pytest.mark.parametrize("geometry", [
    # (in, out, H, W, kernel, stride, padding, dilation): outputs of 1, 1, 4 and 4 positions
    (4, 5, 1, 1, 3, 1, 1, 1), (4, 5, 2, 2, 3, 2, 1, 1), (3, 2, 2, 1, (1, 2), 1, (0, 1), 1), (4, 6, 4, 4, 3, 2, 1, 2),
])
def test_small_map_convolution_by_gemm_equals_vmapped_conv2d(x_in, bias, geometry):
    from bayesify._batched import SampleConv2d, conv2d_by_gemm

    c, o, h, w_, k, stride, padding, dilation = geometry
    g = _gen(1)
    s, n = 3, 2
    one = (c, h, w_) if x_in == "unbatched per sample" else (n, c, h, w_)
    x, x_dim = {"shared": (torch.randn(one, generator=g), None),
                "batched at dim 2": (torch.randn(n, c, s, h, w_, generator=g), 2)}.get(x_in, (torch.randn(s, *one, generator=g), 0))
    kh, kw = (k, k) if isinstance(k, int) else k
    w = torch.randn(s, o, c, kh, kw, generator=g)
    b, b_dim = {"per sample": (torch.randn(s, o, generator=g), 0), "shared": (torch.randn(o, generator=g), None)}.get(
        bias, (None, None))
    assert conv2d_by_gemm(torch.empty(one), (o, c, kh, kw), stride, padding, dilation, 1)
    inputs = [t.requires_grad_() for t in (x, w, b) if t is not None]

    def conv(fn):
        return torch.vmap(lambda a, ww, bb: fn(a, ww, bb, stride, padding, dilation), in_dims=(x_dim, 0, b_dim))(x, w, b)

    ref, out = conv(F.conv2d), conv(SampleConv2d.apply)
    torch.testing.assert_close(out, ref)
    up = torch.randn(ref.shape, generator=g)
    for got, want in zip(torch.autograd.grad(out, inputs, up), torch.autograd.grad(ref, inputs, up)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("x_dim", [0, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_small_map_convolution_with_one_weight_for_all_samples_by_gemm(x_dim, bias):
    # Local reparameterisation convolves every sample's input with the means (no sample dim on
    # the weight): the GEMM rule then folds samples into the batch.
    from bayesify._batched import SampleConv2d

    g = _gen(2)
    x = torch.randn(3, 2, 4, 2, 2, generator=g).movedim(0, x_dim).requires_grad_()
    w = torch.randn(5, 4, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(5, generator=g, requires_grad=True) if bias else None
    inputs = [t for t in (x, w, b) if t is not None]

    def conv(fn):
        return torch.vmap(lambda a, ww, bb: fn(a, ww, bb, 1, 1, 1), in_dims=(x_dim, None, None))(x, w, b)

    ref, out = conv(F.conv2d), conv(SampleConv2d.apply)
    torch.testing.assert_close(out, ref)
    up = torch.randn(ref.shape, generator=g)
    for got, want in zip(torch.autograd.grad(out, inputs, up), torch.autograd.grad(ref, inputs, up)):
        torch.testing.assert_close(got, want)


def test_small_map_convolution_output_can_be_modified_in_place(monkeypatch):
    # ResNet's ReLU(inplace=True) after a convolution on a 1x1 map (the GEMM rule); the same
    # outputs and gradients as with PyTorch's own rule for every convolution.
    from bayesify import _batched

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(8, 2))
    bnn = bf.bayesify(model)
    x = torch.randn(4, 3, 1, 1)

    def step() -> tuple[Tensor, list[Tensor]]:
        out = bnn(x, samples=3, generator=_gen(0))
        return out, torch.autograd.grad(out.sum() + out.log_probs.sum(), list(bnn.parameters()))

    out, grads = step()
    monkeypatch.setattr(_batched, "GEMM_MAX_POSITIONS", 0)
    ref, ref_grads = step()
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_layer_kernels_under_autocast():
    # Inside a custom Function's vmap rule autocast's casts are lost: with the GEMM convolution
    # under autocast the next (PyTorch) convolution got bfloat16 inputs and float32 weights.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 2, padding="same"),
                          nn.Flatten(), nn.Linear(16, 2))
    bnn = bf.bayesify(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bnn(torch.randn(5, 3, 2, 2), samples=3)
    (out.float().sum() + out.log_probs.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in bnn.parameters() if p.grad is not None)


@pytest.mark.parametrize("dims, mask_shape, options", [
    ((0, 0, 0, None), None, {}),
    ((0, 0, 0, None), (2, 1, 5, 5), {}),
    ((0, None, 0, 0), (2, 1, 5, 5), {"scale": 0.3}),
    ((2, 0, 1, None), (5, 5), {}),
    ((0, 0, 0, 0), (1, 1, 5, 5), {}),
    ((0, 0, 0, None), None, {"is_causal": True}),
])
def test_attention_folds_samples_into_the_batch(dims, mask_shape, options):
    from bayesify._batched import SDPA, SampleAttention

    g = _gen(3)
    s, shape = 3, (2, 4, 5, 6)

    def make(d: int | None, one: tuple[int, ...]) -> Tensor:
        t = torch.randn(one, generator=g) if d is None else torch.randn(s, *one, generator=g).movedim(0, d)
        return t

    q, k, v = (make(d, shape).requires_grad_() for d in dims[:3])
    mask = None if mask_shape is None else make(dims[3], mask_shape)
    opts = {"dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False, **options}
    ref = torch.vmap(lambda a, b, c, m: SDPA(a, b, c, attn_mask=m, **opts), in_dims=dims)(q, k, v, mask)
    out = torch.vmap(lambda a, b, c, m: SampleAttention.apply(a, b, c, m, tuple(opts.items())), in_dims=dims)(
        q, k, v, mask)
    torch.testing.assert_close(out, ref)
    up = torch.randn(ref.shape, generator=g)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), up), torch.autograd.grad(ref, (q, k, v), up)):
        torch.testing.assert_close(got, want)


def test_minilm_attention_runs_folded_and_is_restored(monkeypatch):
    # Hugging Face calls F.scaled_dot_product_attention; PyTorch has no vmap rule for the CPU
    # flash kernel ("performance drop" warning, per-sample fallback). bayesify folds the samples
    # into the batch for its vmapped call only: same outputs, no warning, the function restored.
    from contextlib import nullcontext

    from bayesify import _batched, module

    from .models import _minilm

    bnn = bf.bayesify(_minilm()).eval()
    ids = torch.randint(1000, 2000, (2, 8), generator=_gen(0))

    def run() -> Tensor:
        with torch.no_grad():
            return bnn(input_ids=ids, samples=3, generator=_gen(1)).last_hidden_state

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback's UserWarning would raise here
        out = run()
    assert F.scaled_dot_product_attention is _batched.SDPA
    monkeypatch.setattr(module, "vmap_rules", lambda index: nullcontext())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = run()  # PyTorch's own (per-sample fallback) attention
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("variational", ["meanfield", "rank1"])
def test_sampled_call_inside_torch_func_says_what_to_use(variational):
    """A sampled call under torch.func.grad raised functorch's "must override the setup_context
    staticmethod" (about bayesify's internals); now one line naming what works instead, while
    torch.autograd.grad through the same call still works."""
    torch.manual_seed(0)
    bnn = bf.bayesify(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), variational=variational).eval()
    x = torch.randn(5, 4)

    def f(v):
        return bnn(v, samples=3, generator=torch.Generator().manual_seed(0)).sum()

    with pytest.raises(RuntimeError, match=r"cannot run inside a torch\.func transform.*torch\.autograd\.grad"):
        torch.func.grad(f)(x)
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(xr), xr)
    assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0
