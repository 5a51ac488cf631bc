"""The negative ELBO per data point: expected NLL over the samples + KL(q || prior) / dataset_size.

Example::

    >>> loss_fn = bf.ELBOLoss("categorical", dataset_size=60_000)
    >>> bnn.train(); out = bnn(x, samples=4)
    >>> loss = loss_fn(out, y); loss.backward()
    >>> loss_fn.last.nll, loss_fn.last.kl_term       # floats, for logging
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._choices import lookup
from .module import vi_attributes

__all__ = ["ELBOLoss", "ELBOTerms", "NLLLoss", "LIKELIHOODS", "first_tensor"]

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


@dataclass(frozen=True)
class ELBOTerms:
    """The parts of one ``ELBOLoss`` call, as floats: ``loss = nll + kl_term``."""

    nll: float  #: expected negative log likelihood per data point
    kl: float  #: KL(q || prior) estimate, nats, summed over all Bayesian weights
    kl_term: float  #: what the loss adds: ``kl_weight * kl / dataset_size``
    loss: float


#: The KL-domination check (see ``ELBOLoss``): over the first ``_WATCH`` training calls.
_WATCH = 20
_KL_DOMINATES = 100.0


class ELBOLoss(nn.Module):
    """Negative ELBO per data point.

    Args:
        likelihood: ``"categorical"`` (logits), ``"normal"`` (predicted mean) or a callable
            ``f(pred, target) -> mean NLL`` where ``pred`` has the leading sample dimension.
        dataset_size: number of training points (the KL is divided by it). Required.
        kl: ``"mc"`` (from the sampled log-probabilities) or ``"analytic"`` (closed form).
        kl_weight: multiplies the KL term (1.0 is the true ELBO).
        noise_std: observation noise of the normal likelihood: a positive number (fixed) or
            ``"learn"`` (a learnable parameter of this loss, starting at 1; add
            ``loss_fn.parameters()`` to the optimizer: ``bf.fit`` and the integrations do).
            Default: ``"learn"`` for ``"normal"`` (a fixed noise of 1 weighs data with noise 0.1
            a hundred times too little: docs/uncertainty.md, "A BNN from scratch"); for other
            likelihoods it is unused and no parameter is made.

    After each call, ``loss_fn.last`` holds its :class:`ELBOTerms` (``nll``, ``kl``,
    ``kl_term``, ``loss`` as floats) for logging. Over the first 20 calls with gradients it
    watches for the silent failure of a prior that pins the weights: if the KL term is over
    100x the NLL and the NLL has not fallen, it warns once and names the fixes.
    """

    def __init__(self, likelihood: str | Callable[[Tensor, Tensor], Tensor] = "categorical",
                 dataset_size: int | None = None, kl: str = "mc", kl_weight: float = 1.0,
                 noise_std: float | str | None = None) -> None:
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
        if noise_std is None:
            noise_std = "learn" if self.likelihood == "normal" else 1.0
        if noise_std == "learn":
            self.log_noise_std = nn.Parameter(torch.zeros(()))
        elif isinstance(noise_std, (int, float)) and not isinstance(noise_std, bool) and noise_std > 0:
            self.register_buffer("log_noise_std", torch.tensor(math.log(noise_std)))
        else:
            raise ValueError(f"noise_std must be a positive number or 'learn', got {noise_std!r}")

    _last: tuple[Tensor, Tensor, Tensor] | None = None
    _watched: list[tuple[float, float]] | None = None

    @property
    def last(self) -> ELBOTerms:
        """NLL, KL and loss of the last call (floats; read when logging, so no device sync per step)."""
        if self._last is None:
            raise ValueError("ELBOLoss.last is set by a call: loss_fn(out, target) first")
        nll, kl, term = (float(t) for t in self._last)
        return ELBOTerms(nll=nll, kl=kl, kl_term=term, loss=nll + term)

    @property
    def noise_std(self) -> Tensor:
        return self.log_noise_std.exp()

    def nll(self, pred: Tensor, target: Tensor) -> Tensor:
        """Expected negative log likelihood per data point, averaged over samples."""
        if callable(self.likelihood):
            return self.likelihood(pred, target)
        if pred.dim() < 2:
            raise ValueError(f"expected predictions with a leading sample dimension, got shape {tuple(pred.shape)}")
        _check_target(self.likelihood, pred, target)
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
        log_probs, kl_analytic, fn = info
        if log_probs is None:
            if getattr(getattr(fn, "__self__", None), "_prior_in_optimizer", None) or not self.kl_weight:
                # trained by an optimiser that applies the prior (bf.optim.IVON): its KL, as NLLLoss
                return torch.zeros((), device=pred.device)
            raise ValueError("the output carries no log_probs (the model was called with log_probs=False): "
                             "use ELBOLoss(..., kl='analytic'), or call the model without log_probs=False")
        kl = (log_probs[:, 1] - log_probs[:, 0]).mean()
        return kl + kl_analytic

    def forward(self, out: Any, target: Tensor) -> Tensor:
        pred = first_tensor(out)
        if self.kl_weight:
            _refuse_kl_if_optimiser_has_prior(pred)
        nll = self.nll(pred, target)
        kl = self.kl_term(pred)
        term = self.kl_weight * kl / self.dataset_size
        self._last = (nll.detach(), kl.detach(), term.detach())
        if torch.is_grad_enabled() and (self._watched is None or len(self._watched) < _WATCH):
            self._watch(float(nll.detach()), float(term.detach()))  # reads to host: first calls only
        return nll + term

    def _watch(self, nll: float, term: float) -> None:
        """Warn once if, over the first training calls, the KL term dwarfs a NLL that does not fall."""
        if self._watched is None:
            self._watched = []
        self._watched.append((nll, term))
        if len(self._watched) < _WATCH:
            return
        k = _WATCH // 4
        first = sum(n for n, _ in self._watched[:k]) / k
        recent = sum(n for n, _ in self._watched[-k:]) / k
        ratio = sum(t for _, t in self._watched) / max(sum(n for n, _ in self._watched), 1e-12)
        if ratio > _KL_DOMINATES and recent > 0.95 * first:
            warnings.warn(
                f"ELBOLoss: over the first {_WATCH} training steps the KL term is {ratio:,.0f}x the NLL "
                f"(dataset_size={self.dataset_size}) and the NLL has not fallen ({first:.3g} -> {recent:.3g}): "
                "the prior pins the weights where they started. Fixes: weights that were never trained "
                "need a zero-centred prior (see the prior column of bf.plan(model, ...); pass "
                "new_modules=['head'] or prior={'head': 'normal:loc=0,scale=1', '*': None}); make fewer "
                "weights Bayesian (include=[the last block, the head]); check that dataset_size is the "
                "number of training points; or warm up with ELBOLoss(kl_weight=0.1).",
                UserWarning, stacklevel=3)


def _check_target(likelihood: str, pred: Tensor, target: Any) -> None:
    """A target that cannot go with these predictions (``(samples, *per-sample shape)``): one line saying
    which shape the likelihood expects, instead of a broadcast that silently averages the wrong pairs
    (a normal target ``(B,)`` against predictions ``(S, B, 1)`` would be compared as ``(S, B, B)``) or an
    error in the per-sample sizes of the flattened call."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    per_sample = tuple(pred.shape[1:])
    got = tuple(target.shape)
    if likelihood == "categorical":
        if pred.dim() < 3:
            return  # one example per sample: cross_entropy's own unbatched rules
        labels = (per_sample[0], *per_sample[2:])
        if target.is_floating_point() or target.is_complex():
            if got != per_sample:
                raise ValueError(f"categorical targets are class indices (an integer tensor of shape {labels}) or "
                                 f"class probabilities (a float tensor of shape {per_sample}); got {target.dtype} "
                                 f"of shape {got} for predictions of shape {tuple(pred.shape)} (samples first)")
        elif got != labels:
            raise ValueError(f"categorical targets must have shape {labels} (one class index per example) for "
                             f"predictions of shape {tuple(pred.shape)} (samples first, class scores at dim 2, "
                             f"as F.cross_entropy's dim 1), got {got}")
        return
    try:
        fits = torch.broadcast_shapes(got, per_sample) == torch.Size(per_sample)
    except RuntimeError:
        fits = False
    if not fits:
        hint = (f"; reshape it with target.view({', '.join(map(str, per_sample))})"
                if target.numel() == math.prod(per_sample) else "")
        raise ValueError(f"normal targets must have the predictions' per-sample shape {per_sample} (predictions "
                         f"{tuple(pred.shape)}, samples first), got {got}{hint}")


def _refuse_kl_if_optimiser_has_prior(pred: Tensor) -> None:
    """A model trained by ``bf.optim.IVON`` gets its prior from the optimiser: a KL term would count it twice."""
    info = vi_attributes(pred)
    owner = getattr(getattr(info[2], "__self__", None), "_prior_in_optimizer", None) if info else None
    if owner:
        raise ValueError(f"this model is trained by {owner}, which applies the prior itself: use a loss without "
                         "the KL term, bf.NLLLoss(likelihood) or ELBOLoss(..., kl_weight=0)")


class NLLLoss(ELBOLoss):
    """Expected negative log likelihood per data point over the samples, no KL term: the loss for
    :class:`bayesify.optim.IVON`, which applies the prior itself. ``bf.NLLLoss("categorical")``.

    ``noise_std`` as in :class:`ELBOLoss` (default ``"learn"`` for ``"normal"``). IVON steps the
    Bayesian tensors only, so a learned noise needs an optimiser of its own, e.g.
    ``torch.optim.Adam(loss_fn.parameters(), lr=1e-2)`` stepped with IVON (``bf.fit`` does this)."""

    def __init__(self, likelihood: str | Callable[[Tensor, Tensor], Tensor] = "categorical",
                 noise_std: float | str | None = None) -> None:
        super().__init__(likelihood, dataset_size=1, kl_weight=0.0, noise_std=noise_std)

    def forward(self, out: Any, target: Tensor) -> Tensor:
        nll = self.nll(first_tensor(out), target)
        zero = torch.zeros((), device=nll.device)
        self._last = (nll.detach(), zero, zero)  # ``last``: the KL is the optimiser's, not this loss's
        return nll
