"""``bnn(x, samples=N, log_probs=False)``: a training forward without Monte Carlo log densities.

The draws, outputs and every gradient of ``ELBOLoss(kl="analytic")`` must equal those of the
default call (which also computes the log densities); the MC loss refuses such an output.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bayesify as bf
from tests.models import CASES, first

PICK = {c.name: c for c in CASES}


def _grads(bnn: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in bnn.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["resnet18", "distilbert", "control_flow", "shared_and_raw"])
def test_analytic_elbo_equal_with_and_without_log_probs(name: str) -> None:
    case = PICK[name]
    torch.manual_seed(0)
    bnn = bf.bayesify(case.build()).train()
    args, kwargs = case.inputs()
    loss_fn = bf.ELBOLoss(lambda pred, y: pred.float().square().mean(), dataset_size=100, kl="analytic")
    results = []
    for flag in (True, False):
        bnn.zero_grad(set_to_none=True)
        out = bnn(*args, samples=3, generator=torch.Generator().manual_seed(1), log_probs=flag, **kwargs)
        pred = first(out)
        assert (pred.log_probs is not None) is flag
        loss = loss_fn(out, None)
        loss.backward()
        results.append((pred.detach().clone(), loss.detach(), _grads(bnn)))
    (p1, l1, g1), (p2, l2, g2) = results
    torch.testing.assert_close(p2, p1, rtol=0, atol=0)  # the same draws, bit for bit
    torch.testing.assert_close(l2, l1)
    assert g1.keys() == g2.keys() and g1
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-5, atol=1e-7, msg=k)


def test_mc_loss_refuses_an_output_without_log_probs() -> None:
    bnn = bf.bayesify(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))).train()
    out = bnn(torch.randn(5, 4), samples=2, log_probs=False)
    with pytest.raises(ValueError, match="kl='analytic'"):
        bf.ELBOLoss("categorical", dataset_size=10)(out, torch.zeros(5, dtype=torch.long))
    # no KL term asked for: nothing to refuse
    loss = bf.ELBOLoss("categorical", dataset_size=10, kl_weight=0)(out, torch.zeros(5, dtype=torch.long))
    assert torch.isfinite(loss)


def test_log_probs_flag_is_checked_and_owned_by_the_outer_module() -> None:
    class Net(bf.VIModule):
        def __init__(self) -> None:
            super().__init__()
            self.inner = bf.nn.VILinear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x, log_probs=False)

    with pytest.raises(TypeError, match="log_probs must be True or False"):
        bf.bayesify(nn.Linear(3, 2))(torch.randn(2, 3), log_probs="no")
    with pytest.raises(ValueError, match="outermost VIModule"):
        Net()(torch.randn(2, 3), samples=2)


def test_eval_mode_and_recompute_unaffected() -> None:
    torch.manual_seed(0)
    bnn = bf.bayesify(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    x = torch.randn(5, 4)
    bnn.eval()
    a = bnn(x, samples=4, generator=torch.Generator().manual_seed(2))
    b = bnn(x, samples=4, generator=torch.Generator().manual_seed(2), log_probs=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    bnn.train()
    out = bnn(x, samples=4, generator=torch.Generator().manual_seed(2), recompute_samples=True, log_probs=False)
    assert out.log_probs is None
    loss = bf.ELBOLoss("categorical", dataset_size=10, kl="analytic")(out, torch.zeros(5, dtype=torch.long))
    loss.backward()
    assert all(p.grad is not None for p in bnn.parameters())


def test_fit_with_the_analytic_kl_trains_as_a_manual_loop() -> None:
    """bf.fit with ELBOLoss(kl="analytic") skips the log densities; the steps are the manual loop's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    runs = []
    for manual in (False, True):
        bnn = bf.bayesify(net)
        loss_fn = bf.ELBOLoss("categorical", dataset_size=16, kl="analytic")
        opt = torch.optim.SGD(bnn.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(3)
        if manual:
            bnn.train()
            for _ in range(3):
                loss = loss_fn(bnn(x, samples=2, generator=gen), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        else:
            bf.fit(bnn, [(x, y)], epochs=3, samples=2, optimizer=opt, loss_fn=loss_fn, generator=gen,
                   progress=False)
        runs.append({k: v.detach().clone() for k, v in bnn.state_dict().items()})
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], msg=k)


@pytest.mark.parametrize("name", ["resnet18", "distilbert"])
def test_closed_form_kl_reads_the_draws_spread_with_the_same_values(name: str, monkeypatch) -> None:
    """The draw lends its ``softplus(rho)`` to the closed-form KL of the same step
    (``_normal._lend_spread``): the loss and every gradient equal those computed without it."""
    from bayesify import _normal

    case = PICK[name]
    torch.manual_seed(0)
    bnn = bf.bayesify(case.build()).train()
    args, kwargs = case.inputs()
    loss_fn = bf.ELBOLoss(lambda pred, y: pred.float().square().mean(), dataset_size=100, kl="analytic")
    lent = []
    real = _normal._lend_spread
    results = []
    for lend in (real, lambda rho, sd: None):
        monkeypatch.setattr(_normal, "_lend_spread", lambda rho, sd, f=lend: (lent.append(f is real), f(rho, sd)))
        bnn.zero_grad(set_to_none=True)
        out = bnn(*args, samples=2, generator=torch.Generator().manual_seed(1), log_probs=False, **kwargs)
        loss = loss_fn(out, None)
        loss.backward()
        results.append((loss.detach(), _grads(bnn)))
        del out, loss
    assert any(lent) and not all(lent)  # both settings ran draws
    (l1, g1), (l2, g2) = results
    assert torch.equal(l1, l2)
    assert g1.keys() == g2.keys()
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


def test_a_lent_spread_is_not_read_by_a_later_forward() -> None:
    """Values written without a version bump (``p.data``, as FSDP2 refills an unsharded parameter between
    steps) while the first step's graph is still alive: the next forward draws from the new values."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    bnn = bf.bayesify(net).train()
    twin = bf.bayesify(net).train()
    x = torch.randn(4, 6)
    loss_fn = bf.ELBOLoss(lambda pred, y: pred.square().mean(), dataset_size=10, kl="analytic")
    first = loss_fn(bnn(x, samples=2, generator=torch.Generator().manual_seed(1), log_probs=False), None)
    with torch.no_grad():
        for (_, a), (_, b) in zip(bnn.named_parameters(), twin.named_parameters()):
            new = a + 0.3 * torch.randn_like(a)
            a.data.copy_(new)  # no version bump
            b.copy_(new)
    out = bnn(x, samples=2, generator=torch.Generator().manual_seed(2), log_probs=False)
    ref = twin(x, samples=2, generator=torch.Generator().manual_seed(2), log_probs=False)
    assert torch.equal(out, ref)
    assert torch.equal(loss_fn(out, None), loss_fn(ref, None))
    first.backward()  # the first graph was alive throughout
