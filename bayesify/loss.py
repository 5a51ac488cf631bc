"""The negative ELBO per data point: expected NLL over the samples + KL(q || prior) / dataset_size.

Example::

    >>> loss_fn = bf.ELBOLoss("categorical", dataset_size=60_000)
    >>> bnn.train(); out = bnn(x, samples=4)
    >>> loss = loss_fn(out, y); loss.backward()
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._choices import lookup
from .module import vi_attributes

__all__ = ["ELBOLoss", "NLLLoss", "LIKELIHOODS", "first_tensor"]

LIKELIHOODS = {"categorical": "categorical", "normal": "normal", "gaussian": "normal"}
KL_MODES = {"mc": "mc", "analytic": "analytic"}


def first_tensor(out: Any) -> Tensor:
    """The prediction tensor of a model output: itself, ``.logits`` of a dict / ModelOutput, or item 0."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        for key in ("logits", "prediction_logits", "last_hidden_state"):
            if isinstance(out.get(key), Tensor):
                return out[key]
        values = [v for v in out.values() if isinstance(v, Tensor)]
    elif isinstance(out, (tuple, list)):
        values = [v for v in out if isinstance(v, Tensor)]
    else:
        values = []
    if not values:
        raise TypeError(f"expected a model output holding a tensor, got {type(out).__name__}")
    return values[0]


class ELBOLoss(nn.Module):
    """Negative ELBO per data point.

    Args:
        likelihood: ``"categorical"`` (logits), ``"normal"`` (predicted mean) or a callable
            ``f(pred, target) -> mean NLL`` where ``pred`` has the leading sample dimension.
        dataset_size: number of training points (the KL is divided by it). Required.
        kl: ``"mc"`` (from the sampled log-probabilities) or ``"analytic"`` (closed form).
        kl_weight: multiplies the KL term (1.0 is the true ELBO).
        noise_std: observation noise of the normal likelihood: a positive number (fixed) or
            ``"learn"`` (a learnable parameter of this loss; add ``loss_fn.parameters()`` to
            the optimizer).
    """

    def __init__(self, likelihood: str | Callable[[Tensor, Tensor], Tensor] = "categorical",
                 dataset_size: int | None = None, kl: str = "mc", kl_weight: float = 1.0,
                 noise_std: float | str = 1.0) -> None:
        super().__init__()
        if callable(likelihood):
            self.likelihood: str | Callable = likelihood
        else:
            self.likelihood = lookup("likelihood", likelihood, LIKELIHOODS)
        if dataset_size is None:
            raise ValueError("dataset_size is required: pass the number of training points, "
                             "e.g. ELBOLoss('categorical', dataset_size=len(train_set))")
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
            raise ValueError(f"dataset_size must be a positive int, got {dataset_size!r}")
        self.dataset_size = dataset_size
        self.kl = lookup("kl mode", kl, KL_MODES)
        if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)) or kl_weight < 0:
            raise ValueError(f"kl_weight must be a non-negative number, got {kl_weight!r}")
        self.kl_weight = float(kl_weight)
        if noise_std == "learn":
            self.log_noise_std = nn.Parameter(torch.zeros(()))
        elif isinstance(noise_std, (int, float)) and not isinstance(noise_std, bool) and noise_std > 0:
            self.register_buffer("log_noise_std", torch.tensor(math.log(noise_std)))
        else:
            raise ValueError(f"noise_std must be a positive number or 'learn', got {noise_std!r}")

    @property
    def noise_std(self) -> Tensor:
        return self.log_noise_std.exp()

    def nll(self, pred: Tensor, target: Tensor) -> Tensor:
        """Expected negative log likelihood per data point, averaged over samples."""
        if callable(self.likelihood):
            return self.likelihood(pred, target)
        if pred.dim() < 2:
            raise ValueError(f"expected predictions with a leading sample dimension, got shape {tuple(pred.shape)}")
        s = pred.shape[0]
        if self.likelihood == "categorical":
            logits = pred.flatten(0, 1)
            y = target.unsqueeze(0).expand(s, *target.shape).flatten(0, 1)
            return F.cross_entropy(logits, y)
        log_sigma = self.log_noise_std.to(pred.dtype)
        z = (target.to(pred.dtype) - pred) / log_sigma.exp()
        return (0.5 * z * z).mean() + log_sigma + 0.5 * math.log(2 * math.pi)

    def kl_term(self, pred: Tensor) -> Tensor:
        """KL(q || prior) estimate carried by a sampled output."""
        info = vi_attributes(pred)
        if self.kl == "analytic":
            fn = None if info is None else info[2]
            if fn is None:
                raise ValueError("the output carries no KL information: call the model in training mode "
                                 "(model.train()) before computing the ELBO")
            return fn()
        if info is None:
            raise ValueError("the output carries no log_probs: call the model in training mode "
                             "(model.train()) before computing the ELBO")
        log_probs, kl_analytic, _ = info
        kl = (log_probs[:, 1] - log_probs[:, 0]).mean()
        return kl + kl_analytic

    def forward(self, out: Any, target: Tensor) -> Tensor:
        pred = first_tensor(out)
        if self.kl_weight:
            _refuse_kl_if_optimiser_has_prior(pred)
        return self.nll(pred, target) + self.kl_weight * self.kl_term(pred) / self.dataset_size


def _refuse_kl_if_optimiser_has_prior(pred: Tensor) -> None:
    """A model trained by ``bf.optim.IVON`` gets its prior from the optimiser: a KL term would count it twice."""
    info = vi_attributes(pred)
    owner = getattr(getattr(info[2], "__self__", None), "_prior_in_optimizer", None) if info else None
    if owner:
        raise ValueError(f"this model is trained by {owner}, which applies the prior itself: use a loss without "
                         "the KL term, bf.NLLLoss(likelihood) or ELBOLoss(..., kl_weight=0)")


class NLLLoss(ELBOLoss):
    """Expected negative log likelihood per data point over the samples, no KL term: the loss for
    :class:`bayesify.optim.IVON`, which applies the prior itself. ``bf.NLLLoss("categorical")``."""

    def __init__(self, likelihood: str | Callable[[Tensor, Tensor], Tensor] = "categorical",
                 noise_std: float | str = 1.0) -> None:
        super().__init__(likelihood, dataset_size=1, kl_weight=0.0, noise_std=noise_std)

    def forward(self, out: Any, target: Tensor) -> Tensor:
        return self.nll(first_tensor(out), target)
