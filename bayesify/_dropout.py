"""The model's own dropout as part of the posterior in prediction (``bf.predict(..., dropout=True)``).

MC dropout is variational inference with a Bernoulli family over a layer's inputs (Gal &
Ghahramani 2016); a converted model that was trained with dropout carries that family in its
``nn.Dropout`` layers as well as the Gaussian one in its sites. :func:`dropout_on` switches only
those layers to training mode for one prediction call (everything else stays in eval mode:
BatchNorm keeps its running statistics), so each weight sample of the vmapped call
(``torch.vmap(..., randomness="different")``) draws its own dropout masks, also where the
dropout's input depends on no sampled weight.

Which layers: the ``nn.Dropout`` family (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,
``FeatureAlphaDropout``) with ``p > 0``. Dropout that a forward applies through
``F.dropout(..., training=self.training)`` of another module (e.g. attention-probability dropout
inside a Hugging Face attention module) reads that module's flag and stays off.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn
from torch.nn.modules.dropout import _DropoutNd

__all__ = ["dropout_layers", "dropout_on"]


def dropout_layers(model: nn.Module) -> list[nn.Module]:
    """The ``nn.Dropout``-family modules of ``model`` with ``p > 0`` (each once)."""
    return [m for m in model.modules() if isinstance(m, _DropoutNd) and float(m.p) > 0]


@contextmanager
def dropout_on(model: nn.Module) -> Iterator[None]:
    """Put the dropout layers of ``model`` in training mode for the block (their modes restored
    after); a ``ValueError`` where the model has none, since the predictive would then be the
    one without dropout."""
    layers = dropout_layers(model)
    if not layers:
        raise ValueError(f"dropout=True: {type(model).__name__} has no dropout layer with p > 0 "
                         "(nn.Dropout, Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout); "
                         "pass dropout=False")
    modes = [(m, m.training) for m in layers]
    try:
        for m in layers:
            m.training = True
        yield
    finally:
        for m, mode in modes:
            m.training = mode
