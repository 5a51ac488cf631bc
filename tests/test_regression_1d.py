"""End to end: a from-scratch BNN of bf.nn layers on 1-D regression with a gap.

The data lie in [-3, -1] U [1, 3] (y = sin(x) + N(0, 0.1^2)). After ELBO training the
posterior predictive must fit the data and be clearly more uncertain (epistemic spread:
std over weight samples of the predicted mean) away from the data than on it.

Library defaults are used throughout (prior Normal(0, 1), MeanFieldNormal(init_std=1e-3)).
Mean-field VI with ReLU is known to give *little* extra uncertainty in between two data
clusters (Foong et al., 2019, "'In-Between' Uncertainty in Bayesian Neural Networks"), so
the check is made outside the data's hull, where the sampled slopes fan out.
"""

from __future__ import annotations

import pytest
import torch

import bayesify as bf

N = 200
NOISE = 0.1


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.rand(N // 2, 1, generator=g) * 2 - 3, torch.rand(N // 2, 1, generator=g) * 2 + 1])
    y = torch.sin(x) + NOISE * torch.randn(N, 1, generator=g)
    return x, y


class Net(bf.VIModule):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = bf.nn.VILinear(1, hidden)
        self.fc2 = bf.nn.VILinear(hidden, 1)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _train(noise_std, seed: int = 0, steps: int = 300) -> tuple[Net, bf.ELBOLoss]:
    torch.manual_seed(seed)
    x, y = _data(seed)
    net = Net()
    loss_fn = bf.ELBOLoss("normal", dataset_size=len(x), noise_std=noise_std)
    opt = torch.optim.Adam([*net.parameters(), *loss_fn.parameters()], lr=3e-2)
    gen = torch.Generator().manual_seed(seed + 100)
    net.train()
    first = None
    for _ in range(steps):
        out = net(x, samples=8, generator=gen)
        assert out.shape == (8, N, 1) and out.log_probs.shape == (8, 2)
        loss = loss_fn(out, y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    return net, loss_fn


ON = torch.cat([torch.linspace(-3, -1, 50), torch.linspace(1, 3, 50)])[:, None]
AWAY = torch.cat([torch.linspace(-6, -4.5, 25), torch.linspace(4.5, 6, 25)])[:, None]


def _predict(net: Net, x: torch.Tensor) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        out = net(x, samples=200, generator=torch.Generator().manual_seed(1))
    assert not hasattr(out, "log_probs")
    return out


@pytest.mark.parametrize("noise_std", ["learn", NOISE], ids=["learned-noise", "fixed-noise"])
def test_bnn_fits_and_is_uncertain_away_from_data(noise_std):
    net, loss_fn = _train(noise_std)
    on, away = _predict(net, ON), _predict(net, AWAY)

    # it fits: the predictive mean is close to the true function on the data
    mse_on = (on.mean(0) - torch.sin(ON)).square().mean().item()
    assert mse_on < 0.01, mse_on
    if noise_std == "learn":
        # the learned observation noise is near the true one
        assert 0.07 < loss_fn.noise_std.item() < 0.2, loss_fn.noise_std.item()

    # the posterior is not collapsed to a point (some spread on the data) ...
    spread_on = on.std(0).mean().item()
    assert spread_on > 1e-2, spread_on
    # ... and the epistemic spread grows away from the data
    spread_away = away.std(0).mean().item()
    assert spread_away / spread_on > 2.0, (spread_away, spread_on)
    # every far point is more uncertain than the most uncertain point on the data
    assert away.std(0).min() > on.std(0).max()
