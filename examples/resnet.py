"""torchvision ResNet-18 -> ``bf.bayesify`` -> a few ELBO steps in train mode (BatchNorm) -> predict.

A mechanics check on synthetic 3x32x32 data (no download): every conv / linear layer
becomes variational, BatchNorm stays deterministic and its running statistics are
updated by the mean over samples, all samples run in one vectorised call. The script
prints the shapes, the loss, the time per step and the predictive uncertainty on the
training images vs pure-noise images, and writes a histogram of the entropies.

Run::

    python examples/resnet.py           # writes out/resnet.png
    python examples/resnet.py --fast    # fewer, smaller steps (CI)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import Tensor

import bayesify as bf


def synthetic(n: int, classes: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Each class is a fixed random colour pattern plus noise (learnable in a few steps)."""
    protos = torch.randn(classes, 3, 32, 32, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return protos[y] + 0.5 * torch.randn(n, 3, 32, 32, generator=gen), y


def pretrain(model: torch.nn.Module, x: Tensor, y: Tensor, steps: int, batch: int, gen: torch.Generator) -> None:
    """A few point-model steps, so that the Bayesian fine-tune starts from a network that has
    learned something (a random ResNet is equally unsure of every input)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == steps - 1:
            print(f"  point pre-training step {step + 1}/{steps}: cross-entropy {loss.item():.3f}", flush=True)


def main(argv: list[str] | None = None) -> dict[str, float]:
    import torchvision

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="fewer, smaller steps (CI)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    n, pre_steps, steps, batch, samples = (128, 12, 4, 16, 2) if args.fast else (256, 40, 20, 32, 4)
    x, y = synthetic(n, 10, gen)

    model = torchvision.models.resnet18(num_classes=10)
    pretrain(model, x, y, pre_steps, batch, gen)  # stands in for your pretrained network
    bnn = bf.bayesify(model)
    plan = bnn.conversion_plan
    print(f"converted {len(plan.converted)} conv / linear modules; {len(plan.skipped)} BatchNorm modules stay "
          f"deterministic; parameters {plan.params_before:,} -> {plan.params_after:,} (mean + spread)")
    loss_fn = bf.ELBOLoss("categorical", dataset_size=n)
    opt = torch.optim.Adam(bnn.parameters(), lr=1e-3)
    bnn.train()  # BatchNorm uses batch statistics; outputs carry log_probs for the KL term
    bn = bnn.model.bn1
    before = bn.running_mean.clone()
    losses = []
    t = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        out = bnn(x[idx], samples=samples)
        if step == 0:
            print(f"train-mode output {tuple(out.shape)} (samples, batch, classes), "
                  f"log_probs {tuple(out.log_probs.shape)} (samples, [prior, variational])")
        loss = loss_fn(out, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append((loss.item(), loss_fn.nll(out, y[idx]).item()))
        print(f"  ELBO step {step + 1}/{steps}: negative ELBO {losses[-1][0]:.1f}, NLL {losses[-1][1]:.3f}",
              flush=True)
    per_step = (time.perf_counter() - t) / steps
    moved = float((bn.running_mean - before).abs().max())
    print(f"{steps} ELBO steps ({samples} samples x batch {batch}), {per_step:.2f} s/step: negative ELBO "
          f"{losses[0][0]:.1f} -> {losses[-1][0]:.1f} (of which expected NLL {losses[0][1]:.2f} -> "
          f"{losses[-1][1]:.2f}; the rest is KL / dataset_size); BatchNorm running mean moved by up to {moved:.3f}")

    x_noise = torch.rand(batch, 3, 32, 32, generator=gen) * 4 - 2
    pred_in = bf.predict(bnn, x[:batch], samples=2 * samples, generator=gen)
    pred_out = bf.predict(bnn, x_noise, samples=2 * samples, generator=gen)
    print(f"predict: probs {tuple(pred_in.probs.shape)}, entropy {tuple(pred_in.entropy.shape)}, "
          f"mutual_information {tuple(pred_in.mutual_information.shape)}")
    res = {
        "train_acc": bf.metrics.accuracy(pred_in.probs, y[:batch]),
        "entropy_train": float(pred_in.entropy.mean()), "entropy_noise": float(pred_out.entropy.mean()),
        "mi_train": float(pred_in.mutual_information.mean()), "mi_noise": float(pred_out.mutual_information.mean()),
        "loss_first": losses[0][0], "loss_last": losses[-1][0], "nll_first": losses[0][1], "nll_last": losses[-1][1], "bn_moved": moved, "s_per_step": per_step,
    }
    print("| inputs | mean entropy | mean mutual information |\n|---|---|---|")
    print(f"| training images (acc {res['train_acc']:.2f}) | {res['entropy_train']:.3f} | {res['mi_train']:.4f} |")
    print(f"| noise images | {res['entropy_noise']:.3f} | {res['mi_noise']:.4f} |")

    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3))
    ax = fig.add_subplot()
    ax.hist(pred_in.entropy.numpy(), bins=15, alpha=0.6, label="training images")
    ax.hist(pred_out.entropy.numpy(), bins=15, alpha=0.6, label="noise images")
    ax.set_xlabel("predictive entropy (nats)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "resnet.png")
    fig.savefig(path)
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
