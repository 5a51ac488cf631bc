"""A from-scratch tanh BNN of ``bf.nn`` layers on a smooth 1-D function: does it fit, and where is the ELBO?

200 points of ``sin(1.5 x) + 0.2 x + N(0, 0.1^2)`` on [-3, 3]; a tanh MLP (1-50-50-1 by default)
of ``bf.nn.VILinear`` with the layer defaults (prior Normal(0, 1), spreads from 1e-3); batches of
50, 4 samples per step. Prints the RMSE of the predictive mean against the noiseless function
(every ``--log`` steps and at the end), the noise, and the full-data negative ELBO in nats
(analytic KL, 256 samples) at the learned noise, at the noise that is optimal for the final
posterior, and at the true noise 0.1. docs/uncertainty.md ("A BNN from scratch") quotes runs of it.

Run::

    python benchmarks/regression_scratch.py --noise learn                  # ELBOLoss + Adam 1e-2
    python benchmarks/regression_scratch.py --opt ivon --lr 0.1 --noise learn --cosine
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import bayesify as bf


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--opt", default="adam", choices=["adam", "ivon"])
    p.add_argument("--noise", default="learn", help="'learn' or a fixed noise std")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam's lr (all parameters) or IVON's")
    p.add_argument("--noise-lr", type=float, default=None, help="Adam lr of a learned noise (default: --lr; 1e-2 with IVON)")
    p.add_argument("--init-noise", type=float, default=None, help="start of a learned noise (default 1)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--klw", type=float, default=1.0, help="kl_weight of the ELBO (Adam)")
    p.add_argument("--log", type=int, default=200)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--full", action="store_true", help="full batch instead of batches of 50")
    p.add_argument("--prior", default="1", help="prior std of every layer: '1' (the default), a number, or 'fanin'")
    p.add_argument("--hess-init", type=float, default=None, help="IVON's hess_init")
    p.add_argument("--init-std", type=float, default=None, help="MeanFieldNormal(init_std=...) of every layer")
    p.add_argument("--depth", type=int, default=2, help="hidden layers")
    p.add_argument("--width", type=int, default=50)
    p.add_argument("--cosine", action="store_true", help="cosine-anneal the lr (of Adam or IVON) to 0")
    a = p.parse_args(argv)

    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    n = 200
    x = torch.rand(n, 1, generator=g) * 6 - 3

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(1.5 * x) + 0.2 * x

    y = f(x) + 0.1 * torch.randn(n, 1, generator=g)
    xt = torch.linspace(-3, 3, 200)[:, None]

    def layer(i: int, o: int) -> bf.nn.VILinear:
        kw = {} if a.init_std is None else {"variational": bf.variational.MeanFieldNormal(init_std=a.init_std)}
        if a.prior == "1":
            return bf.nn.VILinear(i, o, **kw)
        sc = 1 / math.sqrt(i) if a.prior == "fanin" else float(a.prior)
        return bf.nn.VILinear(i, o, prior=bf.priors.Normal(0.0, sc), **kw)

    class Net(bf.VIModule):
        def __init__(self) -> None:
            super().__init__()
            w = a.width
            self.layers = torch.nn.ModuleList([layer(1, w)] + [layer(w, w) for _ in range(a.depth - 1)] + [layer(w, 1)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for lin in self.layers[:-1]:
                x = torch.tanh(lin(x))
            return self.layers[-1](x)

    net = Net()
    noise = a.noise if a.noise == "learn" else float(a.noise)
    if a.opt == "adam":
        loss_fn: bf.ELBOLoss = bf.ELBOLoss("normal", dataset_size=n, noise_std=noise, kl_weight=a.klw)
    else:
        loss_fn = bf.NLLLoss("normal", noise_std=noise)
    if a.init_noise is not None and noise == "learn":
        with torch.no_grad():
            loss_fn.log_noise_std.fill_(math.log(a.init_noise))
    nlr = a.noise_lr if a.noise_lr is not None else (a.lr if a.opt == "adam" else 1e-2)
    if a.opt == "adam":
        groups = [{"params": list(net.parameters())}]
        if noise == "learn":
            groups.append({"params": list(loss_fn.parameters()), "lr": nlr})
        opt: torch.optim.Optimizer = torch.optim.Adam(groups, lr=a.lr)
        opts = [opt]
    else:
        opt = bf.optim.IVON(net, lr=a.lr, ess=n, hess_init=a.hess_init)
        opts = [opt]
        if noise == "learn":
            opts.append(torch.optim.Adam(loss_fn.parameters(), lr=nlr))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.steps) if a.cosine else None

    def rmse(samples: int) -> float:
        net.eval()
        with torch.no_grad():
            m = net(xt, samples=samples).mean(0)
        net.train()
        return (m - f(xt)).square().mean().sqrt().item()

    t0 = time.time()
    net.train()
    for step in range(a.steps):
        idx = torch.arange(n) if a.full else torch.randperm(n, generator=g)[:50]
        loss = loss_fn(net(x[idx], samples=a.samples), y[idx])
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        if sched is not None:
            sched.step()
        if a.log and (step + 1) % a.log == 0:
            print(f"step {step + 1} loss {loss.item():.3f} nll {loss_fn.last.nll:.3f} kl/N {loss_fn.last.kl_term:.3f} "
                  f"noise {loss_fn.noise_std.item():.3f} rmse {rmse(50):.3f}", flush=True)
    final = rmse(100)
    print(f"FINAL rmse {final:.4f} noise {loss_fn.noise_std.item():.3f} time {time.time() - t0:.1f} s")
    with torch.no_grad():
        outs = net(x, samples=256)
        kl = bf.ELBOLoss("normal", dataset_size=n, kl="analytic").kl_term(outs).item()
        r2 = (y - outs).square().mean().item()

    def neg_elbo(s: float) -> float:
        return n * (0.5 * r2 / s ** 2 + math.log(s) + 0.5 * math.log(2 * math.pi)) + kl

    s_opt = math.sqrt(r2)
    print(f"negative ELBO (nats): at the noise {neg_elbo(loss_fn.noise_std.item()):.1f}, at its optimum "
          f"{s_opt:.3f} {neg_elbo(s_opt):.1f}, at 0.1 {neg_elbo(0.1):.1f}; KL {kl:.1f}")
    return final


if __name__ == "__main__":
    main()
