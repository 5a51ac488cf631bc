"""bayesify: turn any pretrained PyTorch model into a Bayesian neural network in one line."""

from __future__ import annotations

from . import metrics, nn, optim, priors, variational
from .convert import BayesianModel, bayesify
from .calibrate import Calibration, calibrate
from .io import load, save
from .laplace import LaplaceResult, laplace
from .loss import ELBOLoss, NLLLoss
from .module import VIModule
from .plan import Plan, plan
from .predict import Prediction, predict
from .train import History, fit

__version__ = "0.1.0"

__all__ = ["BayesianModel", "Calibration", "ELBOLoss", "History", "LaplaceResult", "NLLLoss", "Plan", "VIModule",
           "bayesify", "calibrate", "fit", "laplace", "plan", "predict", "Prediction", "save", "load", "metrics", "nn",
           "optim", "priors", "variational", "__version__"]
