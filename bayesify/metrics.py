"""Calibration, out-of-distribution and regression metrics (pure torch).

Classification metrics take ``probs`` of shape ``(N, C)`` (rows are predictive
distributions, e.g. :attr:`bayesify.Prediction.probs`) and integer ``labels`` of
shape ``(N,)``. Every metric returns a Python ``float``; lower is better except
for :func:`accuracy` and :func:`auroc`.

Example::

    >>> pred = bf.predict(bnn, x_test, samples=100)
    >>> bf.metrics.accuracy(pred.probs, y_test), bf.metrics.ece(pred.probs, y_test)
    >>> bf.metrics.auroc(pred_in.entropy, pred_out.entropy)   # higher score = more likely OOD
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "accuracy",
    "nll",
    "brier",
    "ece",
    "ReliabilityDiagram",
    "reliability_diagram",
    "plot_reliability",
    "auroc",
    "gaussian_nll",
]


# -- input checks -------------------------------------------------------------------------
def _as_tensor(x: Any, name: str) -> Tensor:
    """A tensor from a tensor or a NumPy array; ``TypeError`` for anything else."""
    if isinstance(x, Tensor):
        return x.detach()
    if type(x).__module__ == "numpy" and hasattr(x, "__array__"):
        return torch.as_tensor(x)
    raise TypeError(f"{name} must be a torch.Tensor (or NumPy array), got {type(x).__name__}")


def _wide(t: Tensor) -> Tensor:
    """Float64 for exact sums where the device has it (not MPS), else float32."""
    return t.float() if t.device.type == "mps" else t.double()


def _check_probs(probs: Any, labels: Any) -> tuple[Tensor, Tensor]:
    p = _as_tensor(probs, "probs")
    y = _as_tensor(labels, "labels")
    if not p.is_floating_point():
        raise TypeError(f"probs must be a floating-point tensor of class probabilities, got dtype {p.dtype}")
    if p.dim() != 2:
        hint = (" (for binary probabilities p of class 1, pass torch.stack([1 - p, p], dim=1))"
                if p.dim() == 1 else "")
        raise ValueError(f"probs must have shape (N, C), got shape {tuple(p.shape)}{hint}")
    if p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"probs must hold at least one row and one class, got shape {tuple(p.shape)}")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise TypeError(f"labels must be an integer tensor of class indices, got dtype {y.dtype} "
                        "(convert with labels.long())")
    if y.shape != (p.shape[0],):
        raise ValueError(f"labels must have shape (N,) = ({p.shape[0]},) to match probs {tuple(p.shape)}, "
                         f"got shape {tuple(y.shape)}")
    if y.device != p.device:
        raise ValueError(f"probs and labels must be on the same device, got {p.device} and {y.device}")
    if bool((y < 0).any()) or bool((y >= p.shape[1]).any()):
        raise ValueError(f"labels must lie in [0, {p.shape[1] - 1}] for {p.shape[1]} classes, "
                         f"got values in [{int(y.min())}, {int(y.max())}]")
    # Low-precision rows may miss 1 by more than float32 round-off.
    atol = 1e-3 if p.dtype in (torch.float32, torch.float64) else 2e-2
    p = _wide(p)
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or bool((p > 1).any()):
        raise ValueError("probs must be finite probabilities in [0, 1]; did you pass logits? "
                         "Apply torch.softmax(logits, dim=-1) first")
    sums = p.sum(1)
    if not bool(torch.allclose(sums, torch.ones_like(sums), atol=atol)):
        worst = float((sums - 1).abs().max())
        raise ValueError(f"each row of probs must sum to 1 (largest deviation {worst:.3g}); "
                         "did you pass logits? Apply torch.softmax(logits, dim=-1) first")
    return p, y.long()


def _check_n_bins(n_bins: Any) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    return n_bins


# -- classification -------------------------------------------------------------------------
def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Fraction of inputs whose most probable class is the label.

    Example::

        >>> bf.metrics.accuracy(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([0, 0]))
        0.5
    """
    p, y = _check_probs(probs, labels)
    return float((p.argmax(1) == y).double().mean())


def nll(probs: Tensor, labels: Tensor, eps: float = 1e-12) -> float:
    """Mean negative log probability of the true class (``log`` of probabilities below ``eps`` is
    taken at ``eps``, so one confidently wrong prediction costs at most ``-log(eps)``)."""
    p, y = _check_probs(probs, labels)
    true = p.gather(1, y[:, None]).squeeze(1)
    return float(-true.clamp_min(eps).log().mean())


def brier(probs: Tensor, labels: Tensor) -> float:
    """Mean over inputs of the squared error, summed over classes, against the one-hot label
    (0 is perfect, 2 the worst; the multi-class definition of Brier, 1950)."""
    p, y = _check_probs(probs, labels)
    err = p.clone()
    err[torch.arange(len(y), device=y.device), y] -= 1
    return float(err.square().sum(1).mean())


@dataclass(frozen=True)
class ReliabilityDiagram:
    """Per-bin summary of calibration, ``n_bins`` equal-width bins of the top-class confidence.

    Bin ``i`` holds confidences in ``(edges[i], edges[i + 1]]`` (the first also holds 0).
    ``confidence`` / ``accuracy`` are NaN for empty bins; ``count`` is the number of inputs.
    """

    edges: Tensor  # (n_bins + 1,)
    confidence: Tensor  # (n_bins,) mean top-class probability in the bin
    accuracy: Tensor  # (n_bins,) fraction of correct top-class predictions in the bin
    count: Tensor  # (n_bins,) int64

    @property
    def ece(self) -> float:
        """Expected calibration error: ``sum_b count_b / N * |accuracy_b - confidence_b|``."""
        n = int(self.count.sum())
        seen = self.count > 0
        gap = (self.accuracy[seen] - self.confidence[seen]).abs()
        return float((self.count[seen].to(gap.dtype) * gap).sum() / n)


def reliability_diagram(probs: Tensor, labels: Tensor, n_bins: int = 15) -> ReliabilityDiagram:
    """Bin inputs by top-class confidence and compare mean confidence with accuracy per bin."""
    p, y = _check_probs(probs, labels)
    n_bins = _check_n_bins(n_bins)
    conf, pred = p.max(1)
    correct = (pred == y).to(conf.dtype)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype, device=conf.device)
    # right=False: index i with edges[i] < conf <= edges[i + 1] (0 falls in bin 0, 1 in the last).
    idx = torch.bucketize(conf, edges[1:-1], right=False)
    count = torch.bincount(idx, minlength=n_bins)
    sum_conf = torch.zeros(n_bins, dtype=conf.dtype, device=conf.device).index_add_(0, idx, conf)
    sum_acc = torch.zeros(n_bins, dtype=conf.dtype, device=conf.device).index_add_(0, idx, correct)
    denom = count.to(conf.dtype)
    nan = torch.full_like(denom, math.nan)
    return ReliabilityDiagram(
        edges=edges.cpu(),
        confidence=torch.where(count > 0, sum_conf / denom.clamp_min(1), nan).cpu(),
        accuracy=torch.where(count > 0, sum_acc / denom.clamp_min(1), nan).cpu(),
        count=count.cpu(),
    )


def ece(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error with ``n_bins`` equal-width confidence bins (Guo et al., 2017).

    ``sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` over the bins of the top-class confidence;
    0 is perfectly calibrated.

    Example::

        >>> bf.metrics.ece(torch.tensor([[0.75, 0.25], [0.75, 0.25]]), torch.tensor([0, 1]))
        0.25
    """
    return reliability_diagram(probs, labels, n_bins).ece


def plot_reliability(probs: Tensor | ReliabilityDiagram, labels: Tensor | None = None, n_bins: int = 15,
                     *, ax: Any = None, path: str | None = None, title: str | None = None) -> Any:
    """Draw a reliability diagram (accuracy per confidence bin against the diagonal).

    ``probs`` may also be a :class:`ReliabilityDiagram` (then ``labels`` is not needed).
    Draws into ``ax`` when given, else into a new ``matplotlib.figure.Figure`` (no pyplot
    state is touched); writes it to ``path`` when given. Returns the figure.
    Needs matplotlib (``pip install matplotlib``).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("plot_reliability needs matplotlib, which is not installed: "
                          "pip install matplotlib") from None
    if isinstance(probs, ReliabilityDiagram):
        if labels is not None:
            raise ValueError("pass either a ReliabilityDiagram or probs and labels, not both")
        diag = probs
    else:
        if labels is None:
            raise ValueError("labels are required unless probs is a ReliabilityDiagram")
        diag = reliability_diagram(probs, labels, n_bins)
    if ax is None:
        fig = Figure(figsize=(4, 4))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    edges = diag.edges.double().numpy()
    widths = edges[1:] - edges[:-1]
    acc = diag.accuracy.double().nan_to_num(0.0).numpy()
    ax.bar(edges[:-1], acc, width=widths, align="edge", edgecolor="black", alpha=0.8, label="accuracy")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title if title is not None else f"ECE = {diag.ece:.3f}")
    ax.legend(loc="upper left")
    if path is not None:
        fig.savefig(path, bbox_inches="tight")
    return fig


# -- out-of-distribution detection ---------------------------------------------------------------
def _check_scores(x: Any, name: str) -> Tensor:
    t = _as_tensor(x, name)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be a real-valued tensor, got dtype {t.dtype}")
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor of scores, got shape {tuple(t.shape)}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return t


def auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    """Area under the ROC curve for separating out-of-distribution from in-distribution inputs.

    Convention: a **higher score means more likely out-of-distribution** (as predictive
    entropy or mutual information are). The result is the probability that a random
    out-of-distribution input scores higher than a random in-distribution one, ties
    counting 1/2: 1 is perfect separation, 0.5 chance. For a confidence-like score
    (max probability, higher = more in-distribution) pass its negation.
    Computed from midranks (Mann-Whitney U) in ``O(n log n)``.

    Example::

        >>> bf.metrics.auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.9, 0.2]))
        0.875
    """
    s_in = _check_scores(scores_in, "scores_in")
    s_out = _check_scores(scores_out, "scores_out").to(s_in.device)
    n_in, n_out = s_in.numel(), s_out.numel()
    both = torch.cat([_wide(s_in), _wide(s_out)])
    _, inverse, counts = torch.unique(both, sorted=True, return_inverse=True, return_counts=True)
    # Midrank of each distinct value: (first rank + last rank) / 2 with 1-based ranks.
    ends = counts.cumsum(0).to(both.dtype)
    midrank = ends - (counts.to(both.dtype) - 1) / 2
    rank_out = midrank[inverse[n_in:]].sum()
    u = rank_out - n_out * (n_out + 1) / 2
    return float(u / (n_in * n_out))


# -- regression -----------------------------------------------------------------------------------
def gaussian_nll(mean: Tensor, var: Tensor | float, y: Tensor, eps: float = 1e-6) -> float:
    """Mean negative log density of ``y`` under ``Normal(mean, var)``, constant included.

    ``0.5 * (log(2 pi var) + (y - mean)^2 / var)`` averaged over all elements; ``var`` (e.g.
    :attr:`bayesify.Prediction.variance`) broadcasts to ``mean`` and is clamped at ``eps``
    for stability, as in ``torch.nn.functional.gaussian_nll_loss(..., full=True)``.
    """
    m = _as_tensor(mean, "mean")
    t = _as_tensor(y, "y")
    if isinstance(var, bool):
        raise TypeError("var must be a tensor or a positive number, got bool")
    v = torch.as_tensor(var, device=m.device) if isinstance(var, (int, float)) else _as_tensor(var, "var")
    if not m.is_floating_point():
        raise TypeError(f"mean must be a floating-point tensor, got dtype {m.dtype}")
    for name, x in (("var", v), ("y", t)):
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"{name} must be a real-valued tensor, got dtype {x.dtype}")
    if m.numel() == 0:
        raise ValueError("mean must not be empty")
    if t.shape != m.shape:
        raise ValueError(f"y must have the shape of mean {tuple(m.shape)}, got {tuple(t.shape)}")
    try:
        torch.broadcast_shapes(v.shape, m.shape)
    except RuntimeError:
        raise ValueError(f"var of shape {tuple(v.shape)} does not broadcast to mean's shape "
                         f"{tuple(m.shape)}") from None
    if torch.broadcast_shapes(v.shape, m.shape) != m.shape:
        raise ValueError(f"var of shape {tuple(v.shape)} must broadcast to mean's shape {tuple(m.shape)}")
    m, t, v = _wide(m), _wide(t.to(m.device)), _wide(v.to(m.device))
    if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
        raise ValueError("var must be finite and non-negative (a variance, not a standard deviation "
                         "or log variance)")
    v = v.clamp_min(eps)
    return float((0.5 * (torch.log(2 * math.pi * v) + (t - m).square() / v)).mean())
