"""From-scratch regression with the defaults: a small tanh BNN of bf.nn layers fits a smooth 1-D
function to about the data's noise, with Bayes by backprop (ELBOLoss + Adam, the README recipe)
and with bf.optim.IVON (NLLLoss, via bf.fit), and the learned noise lands near the true one.

Before the default ``noise_std`` of the normal likelihood became ``"learn"``, the noise stayed at
1 (ten times the data's 0.1): the likelihood weighed the data a hundred times too little, the
ELBO fine-tune drifted back to the prior and IVON barely moved the means (docs/uncertainty.md,
"A BNN from scratch").
"""

from __future__ import annotations

import math

import torch

import bayesify as bf

N = 200
NOISE = 0.1


def _f(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(1.5 * x) + 0.2 * x


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, 1, generator=g) * 6 - 3
    return x, _f(x) + NOISE * torch.randn(N, 1, generator=g)


class Net(bf.VIModule):
    """The README's from-scratch example: default prior Normal(0, 1), spreads starting at 1e-2."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        q = bf.variational.MeanFieldNormal(init_std=1e-2)
        self.fc1 = bf.nn.VILinear(1, hidden, variational=q)
        self.fc2 = bf.nn.VILinear(hidden, 1, variational=q)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _rmse(net: Net) -> float:
    """RMSE of the predictive mean against the noiseless function on a grid over the data."""
    xt = torch.linspace(-3, 3, 200)[:, None]
    net.eval()
    with torch.no_grad():
        mean = net(xt, samples=100, generator=torch.Generator().manual_seed(1)).mean(0)
    return (mean - _f(xt)).square().mean().sqrt().item()


def test_default_normal_likelihood_learns_the_noise():
    loss_fn = bf.ELBOLoss("normal", dataset_size=N)
    assert [n for n, _ in loss_fn.named_parameters()] == ["log_noise_std"]
    assert loss_fn.noise_std.item() == 1.0  # starts at 1: the loss is the fixed-noise loss until trained
    assert not list(bf.ELBOLoss("categorical", dataset_size=N).parameters())  # unused there: no parameter
    assert not list(bf.ELBOLoss("normal", dataset_size=N, noise_std=0.5).parameters())
    assert math.isclose(bf.NLLLoss("normal").noise_std.item(), 1.0) and list(bf.NLLLoss("normal").parameters())


def test_from_scratch_elbo_adam_fits_with_the_defaults():
    torch.manual_seed(0)
    x, y = _data()
    net = Net()
    loss_fn = bf.ELBOLoss("normal", dataset_size=N)  # the default likelihood noise
    opt = torch.optim.Adam([*net.parameters(), *loss_fn.parameters()], lr=1e-2)  # the README recipe
    gen = torch.Generator().manual_seed(2)
    net.train()
    for _ in range(300):
        loss = loss_fn(net(x, samples=4, generator=gen), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    rmse, noise = _rmse(net), loss_fn.noise_std.item()
    assert rmse < 2 * NOISE, (rmse, noise)
    assert 0.5 * NOISE < noise < 3 * NOISE, (rmse, noise)


def test_from_scratch_ivon_fits_with_the_defaults():
    """IVON + NLLLoss("normal") (learned noise by default, stepped by an Adam of its own) with a
    cosine schedule: IVON's mean is a noisy iterate, and without annealing the last one's RMSE
    wanders between 0.04 and 0.22 from step to step (measured: docs/uncertainty.md)."""
    torch.manual_seed(0)
    x, y = _data()
    net = Net()
    loss_fn = bf.NLLLoss("normal")
    opt = bf.optim.IVON(net, lr=0.2, ess=N)
    noise_opt = torch.optim.Adam(loss_fn.parameters(), lr=1e-2)
    steps = 500
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(2)
    net.train()
    for _ in range(steps):
        loss = loss_fn(net(x, samples=2, generator=gen), y)
        opt.zero_grad()
        noise_opt.zero_grad()
        loss.backward()
        opt.step()
        noise_opt.step()
        sched.step()
    rmse, noise = _rmse(net), loss_fn.noise_std.item()
    assert rmse < 2 * NOISE, (rmse, noise)
    assert 0.5 * NOISE < noise < 3 * NOISE, (rmse, noise)


def test_fit_with_ivon_trains_the_learned_noise():
    """bf.fit with an IVON factory: the loss's learned noise (not a Bayesian tensor, which IVON refuses)
    is stepped by an Adam beside it; the hook doing so is removed when fit returns."""
    torch.manual_seed(0)
    x, y = _data()
    net = Net()
    loss_fn = bf.NLLLoss("normal")
    opts = []

    def make(m):
        opts.append(bf.optim.IVON(m, lr=0.1, ess=N))
        return opts[0]

    mean0 = net.fc1.weight.detach().clone()
    bf.fit(net, [(x, y)], loss_fn=loss_fn, optimizer=make, epochs=30, samples=2, lr=1e-3, progress=False,
           generator=torch.Generator().manual_seed(2))
    assert not torch.equal(net.fc1.weight, mean0)  # IVON stepped the means
    assert loss_fn.noise_std.item() < 0.9  # and the noise moved from 1 (Adam at 10 * lr: ~0.01 per step in log)
    assert not opts[0]._optimizer_step_post_hooks  # nothing of fit's left on the user's optimiser
