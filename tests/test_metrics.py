"""bayesify.metrics: hand computations, agreement with scikit-learn / torch, input checks."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bayesify as bf
from bayesify import metrics as M

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def random_probs(n: int, c: int, seed: int, sharpness: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(sharpness * torch.randn(n, c, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, c, (n,), generator=g)
    return probs, labels


def numpy_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Reference ECE: bins (lo, hi], the first also holding 0."""
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total = 0.0
    for i in range(n_bins):
        lo, hi = edges[i], edges[i + 1]
        inside = (conf > lo) & (conf <= hi) if i > 0 else (conf >= lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    return total


# -- hand computations ------------------------------------------------------------------------------
P = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5], [0.9, 0.05, 0.05]])
Y = torch.tensor([0, 2, 2, 1])


def test_accuracy_by_hand() -> None:
    assert M.accuracy(P, Y) == 0.5


def test_nll_by_hand() -> None:
    expected = -(math.log(0.7) + math.log(0.3) + math.log(0.5) + math.log(0.05)) / 4
    assert M.nll(P, Y) == pytest.approx(expected, rel=1e-6)


def test_nll_clamps_zero_probability() -> None:
    p = torch.tensor([[1.0, 0.0]])
    assert M.nll(p, torch.tensor([1])) == pytest.approx(-math.log(1e-12))
    assert M.nll(p, torch.tensor([1]), eps=1e-3) == pytest.approx(-math.log(1e-3))
    assert M.nll(p, torch.tensor([0])) == 0.0


def test_brier_by_hand() -> None:
    rows = [
        0.3**2 + 0.2**2 + 0.1**2,
        0.1**2 + 0.6**2 + 0.7**2,
        0.25**2 + 0.25**2 + 0.5**2,
        0.9**2 + 0.95**2 + 0.05**2,
    ]
    assert M.brier(P, Y) == pytest.approx(sum(rows) / 4, rel=1e-6)
    assert M.brier(torch.eye(3), torch.arange(3)) == 0.0
    assert M.brier(torch.eye(2), torch.tensor([1, 0])) == 2.0


def test_ece_by_hand() -> None:
    # Confidences 0.7, 0.6, 0.5, 0.9 with 2 bins: (0, .5] holds 0.5 (correct),
    # (.5, 1] holds 0.7 (correct), 0.6 (wrong), 0.9 (wrong).
    expected = 1 / 4 * abs(1 - 0.5) + 3 / 4 * abs(1 / 3 - (0.7 + 0.6 + 0.9) / 3)
    assert M.ece(P, Y, n_bins=2) == pytest.approx(expected, rel=1e-6)
    # One bin: |accuracy - mean confidence|.
    assert M.ece(P, Y, n_bins=1) == pytest.approx(abs(0.5 - (0.7 + 0.6 + 0.5 + 0.9) / 4), rel=1e-6)
    assert M.ece(torch.tensor([[0.75, 0.25], [0.75, 0.25]]), torch.tensor([0, 1])) == 0.25


def test_ece_perfectly_confident_and_right_is_zero() -> None:
    assert M.ece(torch.eye(4), torch.arange(4)) == 0.0


def test_reliability_diagram_bins() -> None:
    d = M.reliability_diagram(P, Y, n_bins=4)
    assert d.edges.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert d.count.tolist() == [0, 1, 2, 1]  # 0.5 | 0.7, 0.6 | 0.9
    assert math.isnan(d.confidence[0]) and math.isnan(d.accuracy[0])
    assert d.confidence[2].item() == pytest.approx(0.65)
    assert d.accuracy.tolist()[1:] == [1.0, 0.5, 0.0]
    assert d.ece == pytest.approx(M.ece(P, Y, n_bins=4))


def test_confidence_zero_and_one_fall_in_the_end_bins() -> None:
    d = M.reliability_diagram(torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([0, 0]), n_bins=2)
    assert d.count.tolist() == [1, 1]


def test_auroc_by_hand() -> None:
    assert M.auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.9, 0.2])) == 0.875
    assert M.auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert M.auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 0.0
    assert M.auroc(torch.ones(5), torch.ones(3)) == 0.5
    assert M.auroc(torch.tensor([1, 2, 3]), torch.tensor([2])) == 0.5  # integer scores


# -- agreement with references ----------------------------------------------------------------------
@pytest.mark.parametrize("n,c,seed", [(50, 2, 0), (300, 5, 1), (1000, 10, 2)])
def test_nll_brier_accuracy_match_sklearn(n: int, c: int, seed: int) -> None:
    probs, labels = random_probs(n, c, seed)
    p, y = probs.numpy(), labels.numpy()
    assert M.nll(probs, labels) == pytest.approx(sklearn_metrics.log_loss(y, p, labels=list(range(c))), rel=1e-9)
    assert M.accuracy(probs, labels) == pytest.approx(sklearn_metrics.accuracy_score(y, p.argmax(1)))
    onehot = np.eye(c)[y]
    assert M.brier(probs, labels) == pytest.approx(((p - onehot) ** 2).sum(1).mean(), rel=1e-12)
    if c == 2:  # sklearn's binary Brier score is half the multi-class one
        assert M.brier(probs, labels) == pytest.approx(2 * sklearn_metrics.brier_score_loss(y, p[:, 1]))


@pytest.mark.parametrize("n_bins", [1, 5, 10, 15, 100])
@pytest.mark.parametrize("seed", [0, 1])
def test_ece_matches_numpy_loop(n_bins: int, seed: int) -> None:
    probs, labels = random_probs(2000, 7, seed, sharpness=2.0)
    assert M.ece(probs, labels, n_bins) == pytest.approx(numpy_ece(probs.numpy(), labels.numpy(), n_bins), abs=1e-12)


def test_ece_float32_matches_float64() -> None:
    probs, labels = random_probs(500, 4, 3)
    assert M.ece(probs.float(), labels) == pytest.approx(M.ece(probs, labels), abs=1e-5)


@pytest.mark.parametrize("n_in,n_out,ties,seed", [(10, 7, False, 0), (500, 300, False, 1), (400, 600, True, 2),
                                                  (1, 1, False, 3), (2000, 50, True, 4)])
def test_auroc_matches_sklearn(n_in: int, n_out: int, ties: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    s_in = torch.randn(n_in, generator=g, dtype=torch.float64)
    s_out = torch.randn(n_out, generator=g, dtype=torch.float64) + 0.5
    if ties:  # few distinct values: many ties within and across groups
        s_in, s_out = s_in.round(), s_out.round()
    y = np.r_[np.zeros(n_in), np.ones(n_out)]
    s = np.r_[s_in.numpy(), s_out.numpy()]
    expected = sklearn_metrics.roc_auc_score(y, s) if n_in > 1 or n_out > 1 else float(s_out > s_in)
    assert M.auroc(s_in, s_out) == pytest.approx(expected, abs=1e-12)


def test_auroc_is_fast_on_large_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    s_in, s_out = torch.randn(100_000, generator=g), torch.randn(50_000, generator=g) + 1
    assert 0.7 < M.auroc(s_in, s_out) < 0.8  # Phi(1 / sqrt 2) ~ 0.76


def test_gaussian_nll_matches_torch() -> None:
    g = torch.Generator().manual_seed(0)
    mean, y = torch.randn(20, 3, generator=g), torch.randn(20, 3, generator=g)
    var = torch.rand(20, 3, generator=g) + 0.1
    expected = F.gaussian_nll_loss(mean, y, var, full=True).item()
    assert M.gaussian_nll(mean, var, y) == pytest.approx(expected, rel=1e-6)
    log_prob = torch.distributions.Normal(mean.double(), var.double().sqrt()).log_prob(y.double())
    assert M.gaussian_nll(mean, var, y) == pytest.approx(-log_prob.mean().item(), rel=1e-6)


def test_gaussian_nll_scalar_and_broadcast_variance() -> None:
    mean, y = torch.zeros(4, 2), torch.ones(4, 2)
    expected = 0.5 * (math.log(2 * math.pi * 2.0) + 1 / 2.0)
    assert M.gaussian_nll(mean, 2.0, y) == pytest.approx(expected)
    assert M.gaussian_nll(mean, torch.full((2,), 2.0), y) == pytest.approx(expected)
    # Zero variance is clamped at eps, not an error.
    assert math.isfinite(M.gaussian_nll(mean, 0.0, y))


def test_numpy_inputs_accepted() -> None:
    assert M.accuracy(P.numpy(), Y.numpy()) == 0.5
    assert M.auroc(np.array([0.1, 0.2]), np.array([0.9, 0.2])) == 0.875


def test_metrics_exported() -> None:
    assert bf.metrics is M
    for name in ("accuracy", "nll", "brier", "ece", "reliability_diagram", "plot_reliability", "auroc",
                 "gaussian_nll"):
        assert callable(getattr(bf.metrics, name))


# -- plotting ------------------------------------------------------------------------------------------
def test_plot_reliability_writes_figure(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    probs, labels = random_probs(200, 3, 0)
    out = tmp_path / "rel.png"
    fig = M.plot_reliability(probs, labels, n_bins=10, path=str(out))
    assert isinstance(fig, Figure) and out.stat().st_size > 0
    fig2 = M.plot_reliability(M.reliability_diagram(probs, labels), title="t")
    assert fig2.axes[0].get_title() == "t"
    fig3 = Figure()
    ax = fig3.add_subplot()
    assert M.plot_reliability(probs, labels, ax=ax) is fig3


def test_plot_reliability_without_matplotlib(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install matplotlib"):
        M.plot_reliability(P, Y)


def test_plot_reliability_argument_checks() -> None:
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="labels are required"):
        M.plot_reliability(P)
    with pytest.raises(ValueError, match="not both"):
        M.plot_reliability(M.reliability_diagram(P, Y), Y)


# -- input checks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("probs,labels,exc,match", [
    ([[0.5, 0.5]], torch.tensor([0]), TypeError, "probs must be a torch.Tensor"),
    (torch.tensor([[1, 0]]), torch.tensor([0]), TypeError, "floating-point"),
    (torch.tensor([0.2, 0.8]), torch.tensor([1, 0]), ValueError, r"shape \(N, C\).*torch.stack"),
    (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), ValueError, "at least one row"),
    (P, Y.float(), TypeError, "integer tensor"),
    (P, Y.bool(), TypeError, "integer tensor"),
    (P, Y[:3], ValueError, r"shape \(N,\) = \(4,\)"),
    (P, Y[:, None], ValueError, r"shape \(N,\)"),
    (P, torch.tensor([0, 1, 2, 3]), ValueError, r"labels must lie in \[0, 2\]"),
    (P, torch.tensor([0, -1, 2, 2]), ValueError, r"labels must lie in"),
    (torch.randn(4, 3), Y, ValueError, "logits"),
    (P * 2, Y, ValueError, "logits"),
    (P * 0.9, Y, ValueError, "sum to 1"),
    (torch.full((4, 3), math.nan), Y, ValueError, "finite"),
])
@pytest.mark.parametrize("fn", [M.accuracy, M.nll, M.brier, M.ece, M.reliability_diagram])
def test_classification_input_checks(fn, probs, labels, exc, match) -> None:
    with pytest.raises(exc, match=match):
        fn(probs, labels)


@pytest.mark.parametrize("n_bins", [0, -3, 2.5, True, "15"])
def test_n_bins_checked(n_bins) -> None:
    with pytest.raises(ValueError, match="n_bins must be a positive int"):
        M.ece(P, Y, n_bins=n_bins)


@pytest.mark.parametrize("s_in,s_out,exc,match", [
    ([0.1], torch.tensor([0.2]), TypeError, "scores_in must be a torch.Tensor"),
    (torch.tensor([0.1]), "x", TypeError, "scores_out must be a torch.Tensor"),
    (torch.zeros(2, 2), torch.zeros(2), ValueError, "scores_in must be a non-empty 1-D"),
    (torch.zeros(2), torch.zeros(0), ValueError, "scores_out must be a non-empty 1-D"),
    (torch.tensor([True]), torch.zeros(2), TypeError, "real-valued"),
    (torch.tensor([math.nan]), torch.zeros(2), ValueError, "finite"),
])
def test_auroc_input_checks(s_in, s_out, exc, match) -> None:
    with pytest.raises(exc, match=match):
        M.auroc(s_in, s_out)


@pytest.mark.parametrize("mean,var,y,exc,match", [
    (torch.zeros(3), torch.ones(3), torch.zeros(4), ValueError, "y must have the shape of mean"),
    (torch.zeros(3), torch.ones(4), torch.zeros(3), ValueError, "does not broadcast"),
    (torch.zeros(3), torch.ones(2, 3), torch.zeros(3), ValueError, "must broadcast to mean's shape"),
    (torch.zeros(3), -torch.ones(3), torch.zeros(3), ValueError, "non-negative"),
    (torch.zeros(3), "1", torch.zeros(3), TypeError, "var must be a torch.Tensor"),
    (torch.zeros(3), True, torch.zeros(3), TypeError, "var must be a tensor"),
    (torch.zeros(3, dtype=torch.long), 1.0, torch.zeros(3), TypeError, "mean must be a floating-point"),
    ([0.0], 1.0, torch.zeros(1), TypeError, "mean must be a torch.Tensor"),
    (torch.zeros(0), 1.0, torch.zeros(0), ValueError, "must not be empty"),
])
def test_gaussian_nll_input_checks(mean, var, y, exc, match) -> None:
    with pytest.raises(exc, match=match):
        M.gaussian_nll(mean, var, y)


def test_half_precision_probs() -> None:
    probs, labels = random_probs(200, 50, 5)
    half = probs.half()
    assert M.ece(half, labels) == pytest.approx(M.ece(probs, labels), abs=5e-3)
    assert M.nll(half, labels) == pytest.approx(M.nll(probs, labels), rel=1e-2)
