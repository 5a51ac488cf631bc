"""Variational layers: drop-in Bayesian versions of ``torch.nn`` layers.

Each ``VIxxx`` *is* its ``torch.nn`` namesake (a subclass), so it accepts every
argument of it (padding modes, groups, dilation, ``output_padding``,
``padding_idx``, ``bias=False``, ``elementwise_affine=False``, ...) plus
``prior=``, ``variational=`` and ``estimator=``, and computes with the same
``torch.nn.functional`` call. Its ``weight`` / ``bias`` hold the posterior
means; the sampler substitutes weight samples for them (see ``bayesify.sites``).

Example::

    >>> import bayesify as bf
    >>> layer = bf.nn.VILinear(3, 2, prior="normal", variational="meanfield")
    >>> layer(torch.randn(4, 3), samples=5).shape
    torch.Size([5, 4, 2])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .module import VIModule
from .priors import Prior, get_prior
from .sites import make_bayesian, remove_bayesian, validate_estimator
from .variational import VariationalFamily, get_variational

__all__ = [
    "VILayer", "VILinear", "VIConv1d", "VIConv2d", "VIConv3d", "VIConvTranspose1d", "VIConvTranspose2d",
    "VIConvTranspose3d", "VILayerNorm", "VIEmbedding", "DEFAULT_MAPPING",
]

_CONTAINERS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
               "_forward_hooks", "_forward_pre_hooks", "_backward_hooks")


def _rebuild_as(module: nn.Module, cls: type) -> Any:
    """A new ``cls`` instance carrying ``module``'s attributes and tensors (no copies, nothing lost)."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for key in _CONTAINERS:
        if key in module.__dict__:
            new.__dict__[key] = type(module.__dict__[key])(module.__dict__[key])
    return new


class VILayer(VIModule):
    """Mixin for the variational layers: ``point_type`` and conversion in both directions."""

    point_type: type[nn.Module] = nn.Module
    estimator: str = "reparam"
    _vi_layer = True

    def _make_sites(self, prior: Any, variational: Any, estimator: str,
                    shared: dict | None = None) -> None:
        self.estimator = validate_estimator(estimator)
        p: Prior = get_prior(prior)
        q: VariationalFamily = get_variational(variational)
        for name in ("weight", "bias"):
            if isinstance(self._parameters.get(name), nn.Parameter):
                make_bayesian(self, name, p, q, shared)

    @classmethod
    def from_point(cls, point: nn.Module, prior: Any = None, variational: Any = None,
                   estimator: str = "reparam", shared: dict | None = None) -> "VILayer":
        """Bayesian copy of ``point`` whose means *are* its parameters (no tensor is copied)."""
        if type(point) is not cls.point_type:
            raise TypeError(f"{cls.__name__}.from_point expects a {cls.point_type.__name__}, "
                            f"got {type(point).__name__}")
        new = _rebuild_as(point, cls)
        new._make_sites(prior, variational, estimator, shared)
        return new

    def to_point(self) -> nn.Module:
        """The point layer with the posterior means as weights."""
        point = _rebuild_as(self, self.point_type)
        for name in list(getattr(self, "_vi_sites", {})):
            remove_bayesian(point, name)
        point.__dict__.pop("estimator", None)
        return point

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        sites = getattr(self, "_vi_sites", {})
        if not sites:
            return base
        spec = next(iter(sites.values()))
        return f"{base}, prior={spec.prior!r}, variational={spec.variational!r}"


def _layer(point: type[nn.Module]) -> Any:
    """``__init__`` of a variational layer: the point layer's, then its sites."""

    def __init__(self: Any, *args: Any, prior: Any = None, variational: Any = None,
                 estimator: str = "reparam", **kwargs: Any) -> None:
        point.__init__(self, *args, **kwargs)
        self._make_sites(prior, variational, estimator)

    return __init__  # type: ignore[return-value]


class VILinear(VILayer, nn.Linear):
    """Bayesian ``nn.Linear``."""

    point_type = nn.Linear
    __init__ = _layer(nn.Linear)


class VIConv1d(VILayer, nn.Conv1d):
    """Bayesian ``nn.Conv1d``."""

    point_type = nn.Conv1d
    __init__ = _layer(nn.Conv1d)


class VIConv2d(VILayer, nn.Conv2d):
    """Bayesian ``nn.Conv2d``."""

    point_type = nn.Conv2d
    __init__ = _layer(nn.Conv2d)


class VIConv3d(VILayer, nn.Conv3d):
    """Bayesian ``nn.Conv3d``."""

    point_type = nn.Conv3d
    __init__ = _layer(nn.Conv3d)


class VIConvTranspose1d(VILayer, nn.ConvTranspose1d):
    """Bayesian ``nn.ConvTranspose1d``."""

    point_type = nn.ConvTranspose1d
    __init__ = _layer(nn.ConvTranspose1d)


class VIConvTranspose2d(VILayer, nn.ConvTranspose2d):
    """Bayesian ``nn.ConvTranspose2d``."""

    point_type = nn.ConvTranspose2d
    __init__ = _layer(nn.ConvTranspose2d)


class VIConvTranspose3d(VILayer, nn.ConvTranspose3d):
    """Bayesian ``nn.ConvTranspose3d``."""

    point_type = nn.ConvTranspose3d
    __init__ = _layer(nn.ConvTranspose3d)


class VILayerNorm(VILayer, nn.LayerNorm):
    """Bayesian ``nn.LayerNorm`` (its affine weight and bias)."""

    point_type = nn.LayerNorm
    __init__ = _layer(nn.LayerNorm)


class VIEmbedding(VILayer, nn.Embedding):
    """Bayesian ``nn.Embedding``."""

    point_type = nn.Embedding
    __init__ = _layer(nn.Embedding)


#: The exact-type rules ``bayesify()`` uses; pass a merged dict to extend them.
DEFAULT_MAPPING: dict[type[nn.Module], type[VILayer]] = {
    cls.point_type: cls
    for cls in (VILinear, VIConv1d, VIConv2d, VIConv3d, VIConvTranspose1d, VIConvTranspose2d,
                VIConvTranspose3d, VILayerNorm, VIEmbedding)
}
