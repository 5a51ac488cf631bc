"""bf.predict's progress bar: on request, off on request, and by default only where it helps."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import bayesify as bf

predict_module = importlib.import_module("bayesify.predict")  # bf.predict is the function


@pytest.fixture
def bnn():
    torch.manual_seed(0)
    return bf.bayesify(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))


def test_progress_true_draws_a_bar_on_stderr(bnn, capsys):
    pred = bf.predict(bnn, torch.randn(40, 4), samples=3, batch_size=10, progress=True)
    err = capsys.readouterr()
    assert "predict" in err.err and "100%" in err.err and err.out == ""
    assert pred.probs.shape == (40, 3)


def test_progress_false_and_default_off_a_terminal_print_nothing(bnn, capsys, monkeypatch):
    monkeypatch.setattr(predict_module, "AUTO_PROGRESS_SECONDS", 0.0)  # long enough to want a bar
    bf.predict(bnn, torch.randn(40, 4), samples=3, batch_size=10)  # stderr is not a terminal here
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    monkeypatch.setenv("FORCE_COLOR", "1")
    bf.predict(bnn, torch.randn(40, 4), samples=3, batch_size=10, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("seconds, shown", [(0.0, True), (1e9, False)])
def test_default_progress_on_a_terminal_depends_on_the_estimated_time(bnn, capsys, monkeypatch, seconds, shown):
    monkeypatch.setenv("TTY_INTERACTIVE", "1")  # rich: treat the captured stderr as a live terminal
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setattr(predict_module, "AUTO_PROGRESS_SECONDS", seconds)
    a = bf.predict(bnn, torch.randn(40, 4), samples=3, batch_size=10, generator=torch.Generator().manual_seed(0))
    assert ("predict" in capsys.readouterr().err) is shown
    b = bf.predict(bnn, torch.randn(40, 4).zero_(), samples=3, batch_size=10, progress=False)
    assert a.probs.shape == b.probs.shape


def test_progress_rejects_non_bool(bnn):
    with pytest.raises(TypeError, match="progress"):
        bf.predict(bnn, torch.randn(4, 4), samples=2, progress="yes")
