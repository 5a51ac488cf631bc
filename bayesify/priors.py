"""Priors over Bayesian weights.

A prior is a small, picklable config object. For every Bayesian tensor it may
create buffers from the tensor's point (pretrained) value (``init``), and it
evaluates the elementwise log density of weight samples (``log_prob``).
``distribution`` returns the equivalent ``torch.distributions`` object, which
gives closed-form KL divergences via ``torch.distributions.kl_divergence``.

Example::

    >>> import bayesify as bf
    >>> p = bf.priors.Normal(0.0, 0.1)
    >>> p.log_prob(torch.zeros(3), {}).shape
    torch.Size([3])
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, distributions as D

from ._choices import lookup, parse_shortcut, with_defaults

__all__ = ["Prior", "Normal", "Laplace", "StudentT", "ScaleMixtureNormal", "Flat", "get_prior", "PRIORS"]

_PRETRAINED = "pretrained"


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_loc(loc: Any) -> float | str:
    if isinstance(loc, str) and loc == _PRETRAINED:
        return _PRETRAINED
    if not isinstance(loc, str) and (isinstance(loc, bool) or not isinstance(loc, (int, float))):
        raise TypeError(f"loc must be a finite number or 'pretrained' (centred on the point weights), "
                        f"got {type(loc).__name__}")
    if isinstance(loc, str) or not math.isfinite(loc):
        raise ValueError(f"loc must be a finite number or 'pretrained' (centred on the point weights), got {loc!r}")
    return float(loc)


class Prior:
    """Base class. Subclasses implement ``log_prob`` and, where possible, ``distribution``."""

    name: str = "prior"

    def init(self, point: Tensor) -> dict[str, Tensor]:
        """Buffers this prior needs for one tensor, built from its point value."""
        return {}

    def log_prob(self, value: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        """Elementwise log density of ``value`` (any leading sample dims broadcast)."""
        raise NotImplementedError

    def distribution(self, buffers: dict[str, Tensor], like: Tensor) -> D.Distribution:
        """The prior as a ``torch.distributions`` object with the shape of ``like``."""
        raise ValueError(
            f"prior {self!r} has no closed-form distribution for an analytic KL; use kl='mc'"
        )

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description; ``get_prior(spec)`` rebuilds it."""
        return {"name": self.name, **self.__dict__}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__  # type: ignore[union-attr]

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.__dict__.items()))))

    def _loc(self, buffers: dict[str, Tensor], like: Tensor) -> Tensor | float:
        return buffers["loc"] if self.loc == _PRETRAINED else self.loc  # type: ignore[attr-defined]

    def _init_loc(self, point: Tensor) -> dict[str, Tensor]:
        if self.loc == _PRETRAINED:  # type: ignore[attr-defined]
            return {"loc": point.detach().clone()}
        return {}


class Normal(Prior):
    """Gaussian prior ``N(loc, scale^2)``; ``loc="pretrained"`` centres it on the point weights."""

    name = "normal"

    def __init__(self, loc: float | str = 0.0, scale: float = 1.0) -> None:
        self.loc = _check_loc(loc)
        self.scale = _check_positive("scale", scale)

    init = Prior._init_loc

    def log_prob(self, value: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        z = (value - self._loc(buffers, value)) / self.scale
        return -0.5 * z * z - (math.log(self.scale) + 0.5 * math.log(2 * math.pi))

    def distribution(self, buffers: dict[str, Tensor], like: Tensor) -> D.Distribution:
        loc = torch.as_tensor(self._loc(buffers, like), dtype=like.dtype, device=like.device)
        return D.Normal(loc.expand_as(like), torch.full_like(like, self.scale), validate_args=False)


class Laplace(Prior):
    """Laplace prior (sparsity-inducing); ``loc="pretrained"`` centres it on the point weights."""

    name = "laplace"

    def __init__(self, loc: float | str = 0.0, scale: float = 1.0) -> None:
        self.loc = _check_loc(loc)
        self.scale = _check_positive("scale", scale)

    init = Prior._init_loc

    def log_prob(self, value: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        return -(value - self._loc(buffers, value)).abs() / self.scale - math.log(2 * self.scale)

    def distribution(self, buffers: dict[str, Tensor], like: Tensor) -> D.Distribution:
        loc = torch.as_tensor(self._loc(buffers, like), dtype=like.dtype, device=like.device)
        return D.Laplace(loc.expand_as(like), torch.full_like(like, self.scale), validate_args=False)


class StudentT(Prior):
    """Student-t prior (heavy tails) with ``df`` degrees of freedom."""

    name = "studentt"

    def __init__(self, df: float = 3.0, loc: float | str = 0.0, scale: float = 1.0) -> None:
        self.df = _check_positive("df", df)
        self.loc = _check_loc(loc)
        self.scale = _check_positive("scale", scale)

    init = Prior._init_loc

    def log_prob(self, value: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        df, s = self.df, self.scale
        z = (value - self._loc(buffers, value)) / s
        const = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi) - math.log(s)
        return const - (df + 1) / 2 * torch.log1p(z * z / df)

    def distribution(self, buffers: dict[str, Tensor], like: Tensor) -> D.Distribution:
        loc = torch.as_tensor(self._loc(buffers, like), dtype=like.dtype, device=like.device)
        return D.StudentT(self.df, loc.expand_as(like), torch.full_like(like, self.scale), validate_args=False)


class ScaleMixtureNormal(Prior):
    """Blundell et al. (2015): ``pi N(0, sigma1^2) + (1 - pi) N(0, sigma2^2)``."""

    name = "scalemixture"

    def __init__(self, pi: float = 0.5, sigma1: float = 1.0, sigma2: float = 0.0025) -> None:
        if isinstance(pi, bool) or not isinstance(pi, (int, float)):
            raise TypeError(f"pi must be a number strictly between 0 and 1, got {type(pi).__name__}")
        if not 0.0 < pi < 1.0:
            raise ValueError(f"pi must be a number strictly between 0 and 1, got {pi!r}")
        self.pi = float(pi)
        self.sigma1 = _check_positive("sigma1", sigma1)
        self.sigma2 = _check_positive("sigma2", sigma2)

    def log_prob(self, value: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        parts = []
        for w, s in ((self.pi, self.sigma1), (1 - self.pi, self.sigma2)):
            z = value / s
            parts.append(math.log(w) - 0.5 * z * z - math.log(s) - 0.5 * math.log(2 * math.pi))
        return torch.logaddexp(parts[0], parts[1])

    def distribution(self, buffers: dict[str, Tensor], like: Tensor) -> D.Distribution:
        # A mixture is a valid distribution (for sampling and log_prob) but has no closed-form KL.
        mix = D.Categorical(torch.tensor([self.pi, 1 - self.pi], dtype=like.dtype, device=like.device))
        comp = D.Normal(torch.zeros(2, dtype=like.dtype, device=like.device),
                        torch.tensor([self.sigma1, self.sigma2], dtype=like.dtype, device=like.device))
        return D.MixtureSameFamily(mix, comp, validate_args=False).expand(like.shape)


class Flat(Prior):
    """Improper uniform prior: log density 0 everywhere (MAP training, debugging)."""

    name = "flat"

    def log_prob(self, value: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        return torch.zeros_like(value)


PRIORS: dict[str, type[Prior]] = {
    "normal": Normal,
    "gaussian": Normal,
    "laplace": Laplace,
    "studentt": StudentT,
    "student_t": StudentT,
    "scalemixture": ScaleMixtureNormal,
    "scale_mixture": ScaleMixtureNormal,
    "flat": Flat,
}


def get_prior(prior: Prior | str | dict[str, Any] | None, default: Prior | None = None) -> Prior:
    """Resolve a prior from an instance, a shortcut string (``"normal:scale=0.1"``) or a spec dict.

    A shortcut's unnamed fields come from ``default`` where its family has them (else from the
    family's own defaults), so a partial spec changes only what it names.
    """
    if prior is None:
        return default if default is not None else Normal(0.0, 1.0)
    if isinstance(prior, Prior):
        return prior
    if isinstance(prior, dict):
        spec = dict(prior)
        cls = lookup("prior", spec.pop("name", None), PRIORS)
        return cls(**spec)
    if isinstance(prior, str):
        name, kwargs = parse_shortcut(prior)
        cls = lookup("prior", name, PRIORS)
        try:
            return cls(**with_defaults(cls, kwargs, default))
        except TypeError as exc:
            raise ValueError(f"bad arguments for prior {name!r}: {exc}") from None
    raise TypeError(
        f"prior must be a bayesify.priors.Prior, a name ({', '.join(sorted(set(PRIORS)))}) or None, "
        f"got {type(prior).__name__}"
    )

