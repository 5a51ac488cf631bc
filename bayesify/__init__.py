"""bayesify: turn any pretrained PyTorch model into a Bayesian neural network in one line."""

from __future__ import annotations

from . import nn, priors, variational
from .loss import ELBOLoss
from .module import VIModule

__version__ = "0.1.0"

__all__ = ["ELBOLoss", "VIModule", "nn", "priors", "variational", "__version__"]
