"""bf.laplace (the curvature pass) and bf.predict(..., linearized=True)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import bayesify as bf
from bayesify.laplace import NO_SPREAD
from bayesify._linearize import linearized_outputs, perturbations, site_means

from .models import _hf


def _std(bnn: bf.BayesianModel, qualname: str) -> torch.Tensor:
    site = next(s for s in bnn.bayesian_sites() if s.qualname == qualname)
    return torch.nn.functional.softplus(getattr(site.module, f"{site.name}_rho").double())


class SmallNet(nn.Sequential):
    """A small conv net (importable and constructible without arguments, so bf.save can rebuild it)."""

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 6), nn.ReLU(),
                         nn.Linear(6, 4))


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return SmallNet().double()


# -- linear-Gaussian model: the Laplace posterior is the exact posterior --------------------------------
@pytest.mark.parametrize("structure", ["diag", "full"])
def test_linear_gaussian_exact(structure: str) -> None:
    """y = X w + noise, prior N(0, 1/d): posterior precision A = X^T X / s^2 + d I, mean A^-1 X^T y / s^2.
    At the posterior mean, the pass keeps the mean and sets the variance to the exact marginal
    (A^-1)_ii ("full") or, for the mean-field (diagonal) family, the exact conditional 1 / A_ii."""
    gen = torch.Generator().manual_seed(0)
    n, p, s, d = 40, 5, 0.3, 2.0
    x = torch.randn(n, p, generator=gen, dtype=torch.float64)
    x[:, 1] += 0.8 * x[:, 0]  # correlated features: diag and full differ
    y = x @ torch.randn(p, 1, generator=gen, dtype=torch.float64) + s * torch.randn(n, 1, generator=gen,
                                                                                   dtype=torch.float64)
    a = x.T @ x / s ** 2 + d * torch.eye(p, dtype=torch.float64)
    mean = torch.linalg.solve(a, x.T @ y / s ** 2).squeeze(1)
    lin = nn.Linear(p, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(mean)
    bnn = bf.bayesify(lin)
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]
    r = bf.laplace(bnn, loader, likelihood="normal", noise_std=s, prior_precision=d, progress=False,
                   structure={"": structure} if structure == "full" else None)
    site = bnn.bayesian_sites()[0]
    torch.testing.assert_close(site.mean.detach().reshape(-1), mean, rtol=0, atol=0)  # means kept
    expected = torch.linalg.inv(a).diagonal() if structure == "full" else 1.0 / a.diagonal()
    torch.testing.assert_close(_std(bnn, site.qualname).square().reshape(-1), expected, rtol=1e-9, atol=0)
    assert r.n_examples == n and r.prior_precision[site.qualname] == d


def test_marglik_precision_is_the_evidence_maximiser() -> None:
    net = small_net()
    x = torch.randn(30, 1, 4, 4, dtype=torch.float64)
    bnn = bf.bayesify(net)
    r = bf.laplace(bnn, [x], progress=False, prior_structure="scalar")
    d = next(iter(r.prior_precision.values()))
    assert len(set(r.prior_precision.values())) == 1

    def evidence(delta: float) -> float:
        total = 0.0
        for s in bnn.bayesian_sites():
            h = r.curvature[s.qualname].reshape(-1)
            total += (-0.5 * delta * float(s.mean.detach().double().square().sum()) + 0.5 * h.numel() * math.log(delta)
                      - 0.5 * float(torch.log(h + delta).sum()))
        return total

    assert evidence(d) >= max(evidence(d * 1.05), evidence(d / 1.05))
    assert evidence(d) == pytest.approx(r.log_evidence, rel=1e-9)


# -- the GGN against a brute-force per-example computation ----------------------------------------------
def _brute_ggn(net: nn.Module, x: torch.Tensor, kind: str, noise: float = 1.0) -> dict[str, torch.Tensor]:
    params = dict(net.named_parameters())
    out = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(len(x)):
        f = net(x[i:i + 1])[0]
        rows = [torch.autograd.grad(f[c], list(params.values()), retain_graph=True) for c in range(f.numel())]
        if kind == "categorical":
            p = torch.softmax(f, -1).detach()
            lam = torch.diag(p) - torch.outer(p, p)
        else:
            lam = torch.eye(f.numel(), dtype=f.dtype) / noise ** 2
        for k, name in enumerate(params):
            jac = torch.stack([r[k].reshape(-1) for r in rows])  # (C, P)
            out[name] += torch.einsum("cp,cd,dp->p", jac, lam, jac).reshape(params[name].shape)
    return out


@pytest.mark.parametrize("kind", ["categorical", "normal"])
def test_diagonal_ggn_equals_brute_force(kind: str) -> None:
    net = small_net()
    x = torch.randn(12, 1, 4, 4, dtype=torch.float64)
    y = torch.randn(12, 4, dtype=torch.float64)
    bnn = bf.bayesify(net)
    r = bf.laplace(bnn, [(x[:5], y[:5]), (x[5:], y[5:])], likelihood=kind, progress=False,
                   noise_std=0.5 if kind == "normal" else None)
    ref = _brute_ggn(net, x, kind, 0.5)
    for name, h in ref.items():
        torch.testing.assert_close(r.curvature[f"model.{name}"], h, rtol=1e-8, atol=1e-12)
    # The spreads are the Laplace posterior's: var = 1 / (H + prior precision).
    for name, h in ref.items():
        q = f"model.{name}"
        torch.testing.assert_close(_std(bnn, q).square(), 1 / (h + r.prior_precision[q]), rtol=1e-5, atol=0)


def test_full_structure_and_mc_fisher() -> None:
    net = small_net()
    x = torch.randn(16, 1, 4, 4, dtype=torch.float64)
    bnn = bf.bayesify(net)
    r = bf.laplace(bnn, [x], include="last_layer", structure={"5": "full"}, progress=False)
    ref = _brute_ggn(net, x, "categorical")
    assert set(r.curvature) == {"model.5.weight", "model.5.bias"} and r.structure["model.5.weight"] == "full"
    evals, evecs, shape = r.curvature["model.5.weight"]
    full = evecs @ torch.diag(evals) @ evecs.T
    torch.testing.assert_close(full.diagonal().reshape(shape), ref["5.weight"], rtol=1e-7, atol=1e-10)
    # Sites outside `include` get no spread.
    assert float(_std(bnn, "model.0.weight").max()) <= 2 * NO_SPREAD
    # MC Fisher (one sampled label per example) is unbiased: its mean over passes nears the exact GGN.
    bnn = bf.bayesify(net)
    gen = torch.Generator().manual_seed(0)
    runs = [bf.laplace(bnn, [x], curvature="mc", include="last_layer", progress=False, generator=gen)
            for _ in range(40)]
    mc = sum(float(r.curvature["model.5.weight"].sum()) for r in runs) / len(runs)
    assert mc == pytest.approx(float(ref["5.weight"].sum()), rel=0.15)


# -- the linearised predictive --------------------------------------------------------------------------
def test_linearized_equals_output_at_mean_and_finite_differences() -> None:
    net = small_net()
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    bnn = bf.bayesify(net)
    sites = bnn.bayesian_sites()
    tangents = perturbations(sites, 3, torch.Generator().manual_seed(1))
    with torch.no_grad():
        primal, jt = linearized_outputs(bnn, (x,), {}, site_means(bnn, sites), tangents)
        torch.testing.assert_close(primal, net(x), rtol=0, atol=0)
        eps = 1e-6
        for s in range(3):
            moved = bf.bayesify(net)
            for site in moved.bayesian_sites():
                site.mean.add_(eps * tangents[site.qualname][s])
            fd = (moved.model(x) - net(x)) / eps
            torch.testing.assert_close(jt[s], fd, rtol=1e-4, atol=1e-7)
    # predict(linearized=True) at (numerically) zero spread: every sample is the output at the means.
    bf.laplace(bnn, [x], include="5", progress=False)
    for site in bnn.bayesian_sites():
        with torch.no_grad():
            getattr(site.module, f"{site.name}_rho").fill_(-40.0)
    pred = bf.predict(bnn, x, samples=4, linearized=True, keep_samples=True)
    torch.testing.assert_close(pred.sample_probs, torch.softmax(net(x), -1).expand(4, -1, -1).detach())


def test_after_laplace_the_model_is_an_ordinary_converted_model(tmp_path) -> None:
    net = small_net().float()
    x, y = torch.randn(20, 1, 4, 4), torch.randint(0, 4, (20,))
    bnn = bf.bayesify(net)
    bf.laplace(bnn, [(x, y)], progress=False)
    assert bnn.predictive == {"linearized": True}
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    lin = bf.predict(bnn, x, samples=6, generator=gen())  # linearised: what laplace recorded
    sampled = bf.predict(bnn, x, samples=6, generator=gen(), linearized=False)
    assert not torch.allclose(lin.probs, sampled.probs)
    bf.save(bnn, tmp_path / "m.bnn")
    back = bf.load(tmp_path / "m.bnn")
    assert back.predictive == {"linearized": True}
    torch.testing.assert_close(bf.predict(back, x, samples=6, generator=gen()).probs, lin.probs)
    # ELBO training from the Laplace posterior as a warm start.
    loss_fn = bf.ELBOLoss("categorical", dataset_size=20)
    opt = torch.optim.Adam(bnn.parameters(), lr=1e-3)
    bnn.train()
    loss = loss_fn(bnn(x, samples=2), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    # Natural-gradient training (IVON) from the Laplace spreads.
    bnn = bf.bayesify(net)
    bf.laplace(bnn, [(x, y)], progress=False)
    ivon = bf.optim.IVON(bnn, lr=0.05, ess=20)
    nll = bf.NLLLoss("categorical")
    bnn.train()
    for _ in range(2):
        loss = nll(bnn(x, samples=2), y)
        ivon.zero_grad()
        loss.backward()
        ivon.step()
    assert all(bool(torch.isfinite(p).all()) for p in bnn.parameters())


# -- real architectures ----------------------------------------------------------------------------------
def test_hugging_face_bert_goes_through_the_pass() -> None:
    model = _hf("BertForSequenceClassification", "BertConfig", num_hidden_layers=1, num_attention_heads=2,
                hidden_size=16, intermediate_size=32, vocab_size=50, max_position_embeddings=16, num_labels=3)()
    bnn = bf.bayesify(model)
    ids = torch.randint(1, 50, (6, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[1, 4:] = 0
    data = [{"input_ids": ids[i:i + 3], "attention_mask": mask[i:i + 3], "labels": torch.tensor([0, 1, 2])}
            for i in (0, 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no per-example loop: the backprop route needs no vmap
        r = bf.laplace(bnn, data, progress=False)
    assert r.n_examples == 6 and r.method == "backprop"
    assert set(r.curvature) == {s.qualname for s in bnn.bayesian_sites()}
    assert all(bool(torch.isfinite(h if isinstance(h, torch.Tensor) else h[0]).all()) for h in r.curvature.values())
    head = _std(bnn, "model.classifier.weight")
    assert float(head.min()) > 0 and float(head.max()) < 1 / math.sqrt(min(r.prior_precision.values())) + 1e-6
    pred = bf.predict(bnn, data, samples=4)  # linearised, through the HF forward
    assert pred.probs.shape == (6, 3) and float(pred.mutual_information.max()) > 0


def test_torchvision_last_layer() -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    bnn = bf.bayesify(model)
    x = torch.randn(4, 3, 32, 32)
    r = bf.laplace(bnn, [x], include="last_layer", structure={"fc": "full"}, progress=False)
    assert set(r.curvature) == {"model.fc.weight", "model.fc.bias"}
    assert bf.predict(bnn, x, samples=3).probs.shape == (4, 3)


def test_bad_input() -> None:
    bnn = bf.bayesify(small_net())
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="likelihood"):
        bf.laplace(bnn, [x], likelihood="poisson")
    with pytest.raises(ValueError, match="prior_precision"):
        bf.laplace(bnn, [x], prior_precision=-1.0)
    with pytest.raises(ValueError, match="matched no Bayesian module"):
        bf.laplace(bnn, [x], include="nothing_here")
    with pytest.raises(ValueError, match="needs targets"):
        bf.laplace(bnn, [x], likelihood="normal")
    with pytest.raises(TypeError, match="bayesify model"):
        bf.laplace(small_net(), [x])
    with pytest.raises(ValueError, match="MeanFieldNormal"):
        bf.laplace(bf.bayesify(small_net(), variational="pointmass"), [x])
    with pytest.raises(ValueError, match="no batches"):
        bf.laplace(bnn, [])
    with pytest.raises(ValueError, match="unknown structure 'kron'"):
        bf.laplace(bnn, [x], structure="kron")
    with pytest.raises(TypeError, match="structure must be"):
        bf.laplace(bnn, [x], structure=["full"])
    with pytest.raises(ValueError, match="3 targets for 4 examples"):
        bf.laplace(bnn, [(x, torch.zeros(3, dtype=torch.long))])
    with pytest.raises(ValueError, match="not finite"):
        bf.laplace(bnn, [x * float("nan")])
    before = {k: v.clone() for k, v in bnn.state_dict().items()}
    with pytest.raises(ValueError, match="not finite"):  # a bad batch after good ones: nothing set
        bf.laplace(bnn, [x, x * float("nan")], progress=False)
    assert all(torch.equal(v, bnn.state_dict()[k]) for k, v in before.items())


def test_one_structure_name_applies_to_every_site() -> None:
    torch.manual_seed(0)
    model = HandWritten().double()
    x = torch.randn(10, 3, dtype=torch.float64)
    r = bf.laplace(model, [x], include="out", structure="full", progress=False)
    assert set(r.structure.values()) == {"full"}


class HandWritten(bf.VIModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = bf.nn.VILinear(3, 8, variational=bf.variational.MeanFieldNormal(init_std=0.05))
        self.out = bf.nn.VILinear(8, 2, variational=bf.variational.MeanFieldNormal(init_std=0.05))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc1(x)))


def test_hand_written_vimodule() -> None:
    torch.manual_seed(0)
    model = HandWritten().double()
    x = torch.randn(10, 3, dtype=torch.float64)
    r = bf.laplace(model, [x], include="out", structure={"out": "full"}, progress=False)
    assert set(r.curvature) == {"out.weight", "out.bias"}
    pred = bf.predict(model, x, samples=3, keep_samples=True)
    assert pred.sample_probs.shape == (3, 10, 2)
    assert not torch.allclose(pred.sample_probs[0], pred.sample_probs[1])  # the head's spread shows
    assert float(torch.nn.functional.softplus(model.fc1.weight_rho).max()) <= 2 * NO_SPREAD
    # With a huge prior precision, every linearised sample is the forward at the means.
    r.apply(model, prior_precision=1e12)
    pred = bf.predict(model, x, samples=3, keep_samples=True)
    hidden = torch.tanh(torch.nn.functional.linear(x, model.fc1.weight, model.fc1.bias))
    mean_logits = torch.nn.functional.linear(hidden, model.out.weight, model.out.bias).detach()
    torch.testing.assert_close(pred.sample_probs, torch.softmax(mean_logits, -1).expand(3, -1, -1),
                               atol=1e-5, rtol=0)


def test_dataset_size_scales_the_curvature() -> None:
    net = small_net()
    x = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    r1 = bf.laplace(bf.bayesify(net), [x], include="5", progress=False)
    r2 = bf.laplace(bf.bayesify(net), [x], include="5", progress=False, dataset_size=24)
    torch.testing.assert_close(r2.curvature["model.5.weight"], 3 * r1.curvature["model.5.weight"])
    assert r1.n_examples == r2.n_examples == 8


@pytest.mark.parametrize("kind", ["categorical", "normal"])
@pytest.mark.parametrize("include", ["last_layer", "3"])
def test_single_linear_shortcut_and_its_limit(kind: str, include: str) -> None:
    """A last Linear whose output is the prediction takes the closed-form route (from its input
    alone); a hidden Linear ("3") cannot, and takes the per-example route: both equal brute force."""
    net = small_net()
    x = torch.randn(10, 1, 4, 4, dtype=torch.float64)
    y = torch.randn(10, 4, dtype=torch.float64)
    ref = _brute_ggn(net, x, kind, 0.5)
    name = "5" if include == "last_layer" else "3"
    r = bf.laplace(bf.bayesify(net), [(x[:4], y[:4]), (x[4:], y[4:])], likelihood=kind, include=include,
                   structure={name: "full"}, progress=False, noise_std=0.5 if kind == "normal" else None)
    for p in ("weight", "bias"):
        evals, evecs, shape = r.curvature[f"model.{name}.{p}"]
        got = (evecs @ torch.diag(evals) @ evecs.T).diagonal().reshape(shape)
        torch.testing.assert_close(got, ref[f"{name}.{p}"], rtol=1e-9, atol=1e-12)


# -- the backprop route (bayesify._backprop_ggn) against the per-example torch.func route --------------------
class ConvMix(nn.Sequential):
    """Conv2d with stride, asymmetric padding and dilation, an in-place ReLU right after it, Linear layers."""

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(2, 3, 3, stride=2, padding=(1, 2), dilation=(1, 2)), nn.ReLU(inplace=True),
                         nn.Flatten(), nn.Linear(3 * 3 * 3, 5), nn.Tanh(), nn.Linear(5, 4))


class TokenNet(nn.Module):
    """Embedding (with a padding row), LayerNorm, a Conv1d over positions, a per-token Linear: (B, L, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.ln = nn.LayerNorm(6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.out = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.emb(ids))
        return self.out(torch.tanh(h + self.conv(h.transpose(1, 2)).transpose(1, 2)))


def _tiny_bert() -> nn.Module:
    return _hf("BertForSequenceClassification", "BertConfig", num_hidden_layers=1, num_attention_heads=2,
               hidden_size=16, intermediate_size=32, vocab_size=50, max_position_embeddings=16, num_labels=3)()


def _case(name: str) -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "conv":
        x = torch.randn(9, 2, 6, 6, generator=gen, dtype=torch.float64)
        y = torch.randn(9, 4, generator=gen, dtype=torch.float64)
        return ConvMix().double(), [(x[:4], y[:4]), (x[4:], y[4:])]
    if name == "tokens":
        ids = torch.randint(0, 11, (7, 5), generator=gen)
        return TokenNet().double(), [ids[:3], ids[3:]]
    ids = torch.randint(1, 50, (6, 7), generator=gen)
    mask = torch.ones(6, 7, dtype=torch.long)
    mask[1, 4:] = 0
    return _tiny_bert().double(), [{"input_ids": ids[i:i + 3], "attention_mask": mask[i:i + 3],
                                    "labels": torch.tensor([0, 1, 2])} for i in (0, 3)]


@pytest.mark.parametrize("name,kind,curvature,structure", [
    ("conv", "categorical", "ggn", None), ("conv", "categorical", "mc", None), ("conv", "normal", "ggn", {"3": "full"}),
    ("tokens", "categorical", "ggn", {"ln": "full", "out": "full"}), ("tokens", "categorical", "mc", None),
    ("bert", "categorical", "ggn", None), ("bert", "categorical", "mc", None)])
def test_backprop_route_equals_per_example_route(name: str, kind: str, curvature: str, structure) -> None:
    """method="auto" takes the backprop route on conv / linear / LayerNorm / Embedding / Hugging Face models
    and gives the per-example route's numbers (the MC Fisher's labels too: the same generator draws)."""
    net, data = _case(name)
    kw = dict(likelihood=kind, curvature=curvature, structure=structure, progress=False,
              noise_std=0.5 if kind == "normal" else None)
    fast = bf.laplace(bf.bayesify(net), data, generator=torch.Generator().manual_seed(0), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Hugging Face: vmap over examples -> a loop
        ref = bf.laplace(bf.bayesify(net), data, generator=torch.Generator().manual_seed(0), method="per_example", **kw)
    assert fast.method == "backprop" and ref.method == "per_example"
    assert set(fast.curvature) == set(ref.curvature)
    top = max(float((r[0] if isinstance(r, tuple) else r).abs().max()) for r in ref.curvature.values())
    for q, r in ref.curvature.items():
        got, want = (fast.curvature[q][0], r[0]) if isinstance(r, tuple) else (fast.curvature[q], r)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * top)
    assert fast.prior_precision == pytest.approx(ref.prior_precision, rel=1e-9)


class ReadsWeightOutside(nn.Module):
    """Uses ``b.weight`` outside ``b``'s forward: the backprop route would miss that use."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.b(h) + nn.functional.linear(h, self.b.weight)


def test_auto_falls_back_where_backprop_does_not_apply() -> None:
    torch.manual_seed(0)
    net = ReadsWeightOutside().double()
    x = torch.randn(6, 3, dtype=torch.float64)
    r = bf.laplace(bf.bayesify(net), [x], progress=False)
    assert r.method == "per_example"  # the check on the first examples caught the outside use
    ref = _brute_ggn(net, x, "categorical")
    for name, h in ref.items():
        torch.testing.assert_close(r.curvature[f"model.{name}"], h, rtol=1e-8, atol=1e-12)
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    tied[2].weight = tied[0].weight
    with pytest.raises(ValueError, match=r"method='backprop'\) does not apply"):
        bf.laplace(bf.bayesify(tied.double()), [x], method="backprop", progress=False)
    assert bf.laplace(bf.bayesify(tied.double()), [x], progress=False).method == "per_example"
    with pytest.raises(ValueError, match="method"):
        bf.laplace(bf.bayesify(net), [x], method="fastest", progress=False)


def test_val_prior_precision() -> None:
    """prior_precision="val": one precision for all sites from VAL_PRECISIONS, the lowest held-out NLL of
    the linearised predictive; the spreads are the Laplace posterior's for it."""
    from bayesify.laplace import VAL_PRECISIONS

    net = small_net()
    gen = torch.Generator().manual_seed(0)
    x, xv = torch.randn(20, 1, 4, 4, generator=gen, dtype=torch.float64), torch.randn(16, 1, 4, 4, generator=gen,
                                                                                      dtype=torch.float64)
    y, yv = net(x).argmax(1).detach(), torch.randint(0, 4, (16,), generator=gen)
    bnn = bf.bayesify(net)
    r = bf.laplace(bnn, [(x, y)], prior_precision="val", val_data=(xv, yv), progress=False,
                   generator=torch.Generator().manual_seed(1))
    (d,) = set(r.prior_precision.values())
    assert d in VAL_PRECISIONS
    q = "model.3.weight"
    torch.testing.assert_close(_std(bnn, q).square(), 1 / (r.curvature[q] + d), rtol=1e-5, atol=0)
