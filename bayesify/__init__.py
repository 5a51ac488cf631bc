"""bayesify: turn any pretrained PyTorch model into a Bayesian neural network in one line."""

from __future__ import annotations

from . import metrics, nn, optim, priors, variational
from .convert import BayesianModel, bayesify
from .io import load, save
from .loss import ELBOLoss, NLLLoss
from .module import VIModule
from .plan import Plan, plan
from .predict import Prediction, predict
from .train import History, fit

__version__ = "0.1.0"

__all__ = ["BayesianModel", "ELBOLoss", "NLLLoss", "History", "fit", "Plan", "VIModule", "bayesify", "plan", "predict", "Prediction", "save", "load", "metrics", "nn", "optim", "priors", "variational", "__version__"]
