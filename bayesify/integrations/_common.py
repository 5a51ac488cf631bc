"""What the framework integrations share: optimizer groups, the ELBO of one batch, calibration."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import metrics
from ..loss import ELBOLoss, first_tensor
from ..module import VIModule
from ..train import param_groups as _fit_groups

__all__ = ["check_model", "param_groups", "dataset_length", "ELBOTracker", "calibration", "predictive"]


def check_model(model: Any, where: str) -> VIModule:
    if not isinstance(model, VIModule):
        raise TypeError(f"{where} expects a bayesify model (bf.bayesify(model) or a bf.VIModule), "
                        f"got {type(model).__name__}; convert it first: bnn = bf.bayesify(model)")
    return model


def param_groups(model: nn.Module, lr: float, spread_lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """``bf.fit``'s optimizer groups (:func:`bayesify.train.param_groups`) with the spreads and
    newly initialised modules at ``spread_lr`` and ``weight_decay`` on the means only.

    A spread lives on a log scale: at a fine-tuning learning rate it barely moves (see the
    recipe in docs/uncertainty.md). Groups without parameters are left out.
    """
    if lr <= 0 or spread_lr <= 0:
        raise ValueError(f"learning rates must be positive, got lr={lr!r}, spread_lr={spread_lr!r}")
    groups = _fit_groups(model, lr=lr, fast=spread_lr / lr)
    for g in groups:
        g["weight_decay"] = weight_decay if g["name"] == "means" else 0.0
    return groups


def dataset_length(dataset: Any, given: int | None, where: str) -> int:
    """``given``, else ``len(dataset)``; a clear error for datasets without a length."""
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int) or given < 1:
            raise ValueError(f"dataset_size must be a positive int, got {given!r}")
        return given
    try:
        return len(dataset)
    except TypeError:
        raise ValueError(f"{where}: the training dataset has no len(); pass dataset_size= "
                         "(the number of training points, which divides the KL)") from None


class ELBOTracker:
    """The negative ELBO of a sampled output, with its NLL and KL kept (detached) for logging."""

    def __init__(self, loss_fn: ELBOLoss) -> None:
        self.loss_fn = loss_fn
        self.reset()

    def reset(self) -> None:
        self.nll_sum, self.kl_sum, self.count = 0.0, 0.0, 0

    @property
    def log_probs(self) -> bool:
        """Whether the loss reads the outputs' Monte Carlo log densities (not with ``kl="analytic"``):
        the training forward's ``log_probs=``."""
        return self.loss_fn.kl != "analytic"

    def __call__(self, out: Any, target: Tensor) -> Tensor:
        loss = self.loss_fn(out, target)  # ELBOLoss's own checks and warning, and its ``last`` terms
        last = self.loss_fn.last
        self.nll_sum += last.nll
        self.kl_sum += last.kl
        self.count += 1
        return loss

    def means(self) -> dict[str, float]:
        """``{"nll": mean NLL per data point, "kl": mean KL(q || prior) in nats}`` since the last reset."""
        if not self.count:
            return {}
        return {"nll": self.nll_sum / self.count, "kl": self.kl_sum / self.count}


def predictive(out: Any) -> Tensor:
    """Predictive probabilities ``(N, C)``: the mean over samples of the softmax of the logits."""
    logits = first_tensor(out)
    return torch.softmax(logits.float(), dim=-1).mean(0)


def calibration(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL, ECE and Brier score of predictive probabilities (``bf.metrics``)."""
    probs, labels = torch.as_tensor(probs).float(), torch.as_tensor(labels).long()
    out = {"accuracy": metrics.accuracy(probs, labels), "nll": metrics.nll(probs, labels),
           "ece": metrics.ece(probs, labels, n_bins=n_bins), "brier": metrics.brier(probs, labels)}
    return {k: (v if math.isfinite(v) else float("nan")) for k, v in out.items()}
