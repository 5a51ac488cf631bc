"""bf.calibrate: posterior scale and softmax temperature on held-out data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bayesify as bf

from .test_laplace import SmallNet


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=gen)
    return x, (x.flatten(1)[:, :4].argmax(1) + (torch.rand(n, generator=gen) < 0.2).long()) % 4


def _fitted() -> bf.BayesianModel:
    """A small net trained to overfit 40 examples (so the held-out data wants a temperature)."""
    torch.manual_seed(0)
    net = SmallNet()
    x, y = _data(40, 0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    bnn = bf.bayesify(net.eval())
    bf.laplace(bnn, [(x, y)], progress=False)
    return bnn


def test_linearised_grid_matches_predict_and_never_worsens_val_nll() -> None:
    bnn = _fitted()
    xv, yv = _data(60, 1)
    before = bf.predict(bnn, xv, samples=16, generator=torch.Generator().manual_seed(5))
    cal = bf.calibrate(bnn, [(xv[:30], yv[:30]), (xv[30:], yv[30:])], samples=16,
                       generator=torch.Generator().manual_seed(5), method="jvp")  # bf.predict's draws
    assert cal.linearized and cal.n_examples == 60 and cal.method == "jvp"
    assert cal.nll <= cal.nll_before + 1e-12
    assert cal.nll_before == pytest.approx(bf.metrics.nll(before.probs, yv), rel=1e-5)
    # The grid's value for the chosen scale is the NLL of bf.predict on the rescaled model (same draws).
    after = bf.predict(bnn, xv, samples=16, generator=torch.Generator().manual_seed(5))
    assert cal.nll == pytest.approx(bf.metrics.nll(after.probs, yv), rel=1e-4)
    assert bnn.predictive["posterior_scale"] == cal.posterior_scale


def test_softmax_temperature_is_applied_and_survives_save_load(tmp_path) -> None:
    bnn = _fitted()
    xv, yv = _data(60, 1)
    logits_before = bnn.model(xv).detach()
    cal = bf.calibrate(bnn, (xv, yv), posterior=False, softmax=True, temperatures=[0.5, 2.0],
                       generator=torch.Generator().manual_seed(0))
    t = cal.softmax_temperature
    assert t != 1.0 and bnn.predictive["softmax_temperature"] == t
    # With the spreads at (numerically) zero, the prediction is the temperature-scaled point softmax.
    point = bf.bayesify(SmallNet())
    point.load_state_dict(bnn.state_dict())
    point.predictive = dict(bnn.predictive)
    for s in point.bayesian_sites():
        with torch.no_grad():
            getattr(s.module, f"{s.name}_rho").fill_(-40.0)
    pred = bf.predict(point, xv, samples=2)
    torch.testing.assert_close(pred.probs, torch.softmax(logits_before / t, -1), rtol=1e-5, atol=1e-6)
    # save / load keep the temperature, the predictive and the spreads.
    bf.save(bnn, tmp_path / "cal.bnn")
    back = bf.load(tmp_path / "cal.bnn")
    assert back.predictive == bnn.predictive
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    torch.testing.assert_close(bf.predict(back, xv, samples=8, generator=gen()).probs,
                               bf.predict(bnn, xv, samples=8, generator=gen()).probs)


def test_sampled_route_groups_and_full_factor(tmp_path) -> None:
    torch.manual_seed(0)
    net = SmallNet().eval()
    x, y = _data(40, 0)
    bnn = bf.bayesify(net)
    bf.laplace(bnn, [(x, y)], structure={"5": "full"}, progress=False)
    factor = bnn.posterior_factors["model.5.weight"].clone()
    rho = bnn.model[0].weight_rho.detach().clone()
    cal = bf.calibrate(bnn, (x, y), groups={"head": "5", "body": ["0", "3"]}, scales=[0.5, 2.0],
                       generator=torch.Generator().manual_seed(0))
    assert set(cal.posterior_scale) == {"head", "body"}
    c_body, c_head = cal.posterior_scale["body"], cal.posterior_scale["head"]
    torch.testing.assert_close(F.softplus(bnn.model[0].weight_rho.detach()), F.softplus(rho) * c_body)
    torch.testing.assert_close(bnn.posterior_factors["model.5.weight"], factor * c_head)
    bf.save(bnn, tmp_path / "f.bnn")
    torch.testing.assert_close(bf.load(tmp_path / "f.bnn").posterior_factors["model.5.weight"], factor * c_head)
    # The sampled (non-linearised) predictive: the network runs on each candidate's weights.
    cal2 = bf.calibrate(bnn, (x, y), linearized=False, scales=[0.0, 1.0], samples=4,
                        generator=torch.Generator().manual_seed(0))
    assert not cal2.linearized and bnn.predictive["linearized"] is False
    assert cal2.nll <= cal2.nll_before + 1e-12


def test_after_elbo_training() -> None:
    torch.manual_seed(0)
    bnn = bf.bayesify(SmallNet())
    x, y = _data(40, 0)
    loss_fn = bf.ELBOLoss("categorical", dataset_size=40)
    opt = torch.optim.Adam(bnn.parameters(), lr=1e-2)
    bnn.train()
    for _ in range(5):
        loss = loss_fn(bnn(x, samples=2), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    cal = bf.calibrate(bnn, (x, y), scales=[0.0, 0.5, 1.0], samples=4, softmax=True)
    assert not cal.linearized  # nothing recorded a linearised predictive
    assert set(bnn.predictive) == {"posterior_scale", "softmax_temperature", "linearized"}


def test_bad_input() -> None:
    bnn = bf.bayesify(SmallNet())
    x, y = _data(8, 0)
    with pytest.raises(ValueError, match="no labels"):
        bf.calibrate(bnn, [x])
    with pytest.raises(ValueError, match="scales"):
        bf.calibrate(bnn, (x, y), scales=[-1.0])
    with pytest.raises(ValueError, match="temperatures"):
        bf.calibrate(bnn, (x, y), softmax=True, temperatures=[0.0, 1.0])
    with pytest.raises(ValueError, match="noise_std"):
        bf.calibrate(bnn, (x, y.float()), likelihood="normal")
    with pytest.raises(ValueError, match="matched no Bayesian module"):
        bf.calibrate(bnn, (x, y), groups={"g": "nothing"})
    with pytest.raises(TypeError, match="bayesify model"):
        bf.calibrate(SmallNet(), (x, y))
    with pytest.raises(ValueError, match="no examples"):
        bf.calibrate(bnn, (x[:0], y[:0]))


def test_covariance_route_equals_brute_force_and_the_jvp_route() -> None:
    """The per-example output covariance of the linearised predictive, J diag(var) J^T, equals a brute-force
    Jacobian's; calibrate's covariance route and its jvp route estimate the same predictive NLL."""
    from bayesify._backprop_ggn import output_covariance
    from bayesify._linearize import at_means

    torch.manual_seed(0)
    net = SmallNet().double().eval()
    x, y = _data(24, 0)
    x = x.double()
    bnn = bf.bayesify(net)
    bf.laplace(bnn, [(x, y)], progress=False, prior_precision=30.0)
    sites = bnn.bayesian_sites()
    var = {s.qualname: F.softplus(getattr(s.module, f"{s.name}_rho").detach()).square() for s in sites}
    groups = {"body": sites[:2], "head": sites[2:]}
    with at_means(bnn), torch.no_grad():
        primal, covs = output_covariance(bnn, groups, var, (x,), {}, len(x))
    torch.testing.assert_close(primal, net(x).detach())
    params = {s.qualname.removeprefix("model."): s.mean.detach() for s in sites}
    for i in range(len(x)):
        jac = torch.func.jacrev(lambda p: torch.func.functional_call(net, p, (x[i:i + 1],))[0])(params)
        for g, ss in groups.items():
            ref = sum((jac[s.qualname.removeprefix("model.")].reshape(4, -1) * var[s.qualname].reshape(1, -1))
                      @ jac[s.qualname.removeprefix("model.")].reshape(4, -1).T for s in ss)
            torch.testing.assert_close(covs[g][i], ref, rtol=1e-9, atol=1e-12)
    xv, yv = _data(60, 1)
    nll = {}
    for method in ("covariance", "jvp"):
        cal = bf.calibrate(bnn, (xv.double(), yv), samples=3000, scales=[1.0], method=method,
                           generator=torch.Generator().manual_seed(0))
        assert cal.method == method
        nll[method] = cal.nll_before
    assert nll["covariance"] == pytest.approx(nll["jvp"], rel=0.03)
    # "auto" takes the covariance route here; with a "full" Laplace factor, the jvp route.
    assert bf.calibrate(bnn, (xv.double(), yv), scales=[0.0, 1.0]).method == "covariance"
    bf.laplace(bnn, [(x, y)], structure={"5": "full"}, progress=False)
    assert bf.calibrate(bnn, (xv.double(), yv), scales=[0.0, 1.0]).method == "jvp"
    with pytest.raises(ValueError, match="covariance"):
        bf.calibrate(bnn, (xv.double(), yv), method="covariance")
