"""Glue for training frameworks, imported lazily (``import bayesify`` imports neither).

- :mod:`bayesify.integrations.hf` — :class:`~bayesify.integrations.hf.BayesianTrainer`, a
  ``transformers.Trainer`` whose loss is the negative ELBO and whose evaluation reports
  calibration (``pip install bayesify[hf]``);
- :mod:`bayesify.integrations.lightning` —
  :class:`~bayesify.integrations.lightning.BayesianLightningModule`, a ``LightningModule``
  around a converted model (``pip install bayesify[lightning]``).

Example::

    >>> from bayesify.integrations.hf import BayesianTrainer
    >>> from bayesify.integrations.lightning import BayesianLightningModule
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["hf", "lightning"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
