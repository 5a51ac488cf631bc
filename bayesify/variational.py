"""Variational families: the approximate posterior of each Bayesian tensor.

Extension contract (a new family subclasses :class:`VariationalFamily`):

- ``init(point)`` returns the *unconstrained* extra parameters of one tensor
  (the mean is always the tensor itself, initialised at the point weights);
- ``sample(mean, params, n, generator)`` returns ``n`` differentiable samples
  ``(n, *shape)`` and their summed log density ``(n,)``;
- ``log_prob(value, mean, params)`` is the elementwise log density;
- ``distribution(mean, params)`` (optional) returns a ``torch.distributions``
  object, from which ``kl_divergence`` gives a closed-form KL;
- ``sample_with_prior`` / ``kl_to`` (optional) are what the sampler calls: a family
  may specialise them for a prior it knows (``MeanFieldNormal`` does for ``Normal``);
- ``covers(point)`` (optional, default True): a tensor the family does not cover stays a
  plain deterministic parameter (``Rank1Normal``: tensors of fewer than 2 dims);
  ``weight_prior = False``: the family carries its own prior (over its factors), so the
  site's weight prior makes no buffers and is not evaluated; ``elementwise_std = False``:
  no independent per-weight std (the local / Flipout estimators refuse the family).

Example::

    >>> import bayesify as bf
    >>> q = bf.variational.MeanFieldNormal(init_std=1e-3)
    >>> params = q.init(torch.zeros(3))
    >>> w, logq = q.sample(torch.zeros(3), params, 5)
    >>> w.shape, logq.shape
    (torch.Size([5, 3]), torch.Size([5]))
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, distributions as D

from ._choices import lookup, parse_shortcut, with_defaults
from ._normal import blocks, kept_spread, meanfield_draw, run_parallel, scratch, softplus_scratch, standard_normal

__all__ = ["VariationalFamily", "MeanFieldNormal", "PointMass", "Rank1Normal", "get_variational", "VARIATIONAL"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def inverse_softplus(x: Tensor) -> Tensor:
    """``rho`` such that ``softplus(rho) == x`` (stable for tiny and large ``x``)."""
    return torch.where(x > 20, x, torch.log(torch.expm1(x.clamp_min(1e-30))))


def _relative_rho(p: Tensor, init_std: float, min_std: float) -> Tensor:
    """``inverse_softplus(max(init_std * |p|, min_std))`` in cache-sized chunks written in place
    (the unchunked chain makes six full-size temporaries: most of a conversion's time)."""
    rho = torch.empty_like(p)
    src, dst = p.reshape(-1), rho.view(-1)
    lo, hi = torch.aminmax(src) if src.numel() else (src.new_zeros(()), src.new_zeros(()))
    large = max(-float(lo), float(hi)) * init_std > 20  # where inverse_softplus is the identity

    def chunk(c: slice) -> None:
        o = dst[c]
        torch.abs(src[c], out=o).mul_(init_std).clamp_min_(min_std)
        if large:
            tmp = torch.expm1(o, out=scratch(o.numel(), o.dtype, 2)).log_()
            torch.where(o > 20, o, tmp, out=o)
        else:
            o.expm1_().log_()

    run_parallel([lambda c=c: chunk(c) for c in blocks(src.numel())])
    return rho


class VariationalFamily:
    """Base class for approximate posteriors over one tensor."""

    name: str = "family"
    #: True when samples equal the mean (no per-sample weights are ever needed).
    deterministic: bool = False
    #: True when ``sample_with_prior`` accepts ``seed=`` / ``offset=`` (samples ``offset ..
    #: offset + n`` of one seed's noise), so a chunked call can draw its weights chunk by chunk.
    chunked_draws: bool = False
    #: False where the site's weight prior does not apply (the family carries a prior of its own,
    #: as the rank-1 family does on its factors): then no prior buffers are made for the site.
    weight_prior: bool = True
    #: True where ``std`` gives independent elementwise stds (what the local / Flipout estimators need).
    elementwise_std: bool = True

    def covers(self, point: Tensor) -> bool:
        """Whether this family gives ``point`` a posterior; a tensor it does not cover stays a
        deterministic parameter (no site), e.g. a bias under the rank-1 family."""
        return True

    def extra_numel(self, shape: tuple[int, ...]) -> int:
        """How many variational parameters ``init`` makes for a tensor of ``shape``."""
        return math.prod(shape) * len(self.init(torch.zeros(1)))

    def init(self, point: Tensor) -> dict[str, Tensor]:
        return {}

    def sample(
        self, mean: Tensor, params: dict[str, Tensor], n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def log_prob(self, value: Tensor, mean: Tensor, params: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def distribution(self, mean: Tensor, params: dict[str, Tensor]) -> D.Distribution:
        raise ValueError(f"variational family {self!r} has no closed-form distribution; use kl='mc'")

    def std(self, mean: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Elementwise standard deviation (needed by local reparameterisation and Flipout)."""
        raise ValueError(f"variational family {self!r} has no elementwise standard deviation")

    def sample_with_prior(self, mean: Tensor, params: dict[str, Tensor], prior: Any, prior_buffers: dict[str, Tensor],
                          n: int, generator: torch.Generator | None, with_logp: bool, **noise: int
                          ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``n`` samples and, with ``with_logp``, their summed log prior and log q ``(n,)``.

        ``noise`` (``seed``, ``offset``) only where ``chunked_draws``; passed on to ``sample``."""
        w, log_q = self.sample(mean, params, n, generator, **noise)
        if not with_logp:
            return w, None, None
        return w, prior.log_prob(w, prior_buffers).reshape(n, -1).sum(1), log_q

    def kl_to(self, prior: Any, mean: Tensor, params: dict[str, Tensor], prior_buffers: dict[str, Tensor]
              ) -> Tensor | None:
        """Closed-form summed KL(q || prior) where this family has a shortcut for ``prior``, else None."""
        return None

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, **self.__dict__}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__  # type: ignore[union-attr]

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.__dict__.items()))))


class MeanFieldNormal(VariationalFamily):
    """Fully factorised Gaussian, ``std = softplus(rho)``.

    ``init_std`` is the initial standard deviation: absolute, or with
    ``relative=True`` a fraction of ``|w|`` of each point weight (as in MOPED),
    floored at ``min_std``.
    """

    name = "meanfield"
    chunked_draws = True

    def __init__(self, init_std: float = 1e-3, relative: bool = False, min_std: float = 1e-6) -> None:
        for key, val in (("init_std", init_std), ("min_std", min_std)):
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise TypeError(f"{key} must be a positive number, got {val!r}")
            if not (val > 0 and math.isfinite(val)):
                raise ValueError(f"{key} must be a positive finite number, got {val!r}")
        if not isinstance(relative, bool):
            raise TypeError(f"relative must be True or False, got {relative!r}")
        self.init_std = float(init_std)
        self.relative = relative
        self.min_std = float(min_std)

    def init(self, point: Tensor) -> dict[str, Tensor]:
        p = point.detach()
        if not self.relative:
            # One scalar, one fill: conversion of large models stays close to a memcpy.
            rho0 = float(inverse_softplus(torch.tensor(self.init_std, dtype=torch.float64)))
            return {"rho": torch.full_like(p, rho0)}
        if p.dtype in (torch.float32, torch.float64) and p.device.type == "cpu" and p.is_contiguous():
            return {"rho": _relative_rho(p, self.init_std, self.min_std)}
        # Compute in float32 at least: bfloat16 cannot represent log(expm1(1e-3)) well.
        std = p.abs().float().mul_(self.init_std).clamp_min_(self.min_std)
        return {"rho": inverse_softplus(std).to(p.dtype)}

    def std(self, mean: Tensor, params: dict[str, Tensor]) -> Tensor:
        return F.softplus(params["rho"])

    def sample(
        self, mean: Tensor, params: dict[str, Tensor], n: int, generator: torch.Generator | None = None,
        *, seed: int | None = None, offset: int = 0,
    ) -> tuple[Tensor, Tensor]:
        std = self.std(mean, params)
        eps = standard_normal((n, *mean.shape), mean.dtype, mean.device, generator, seed, offset)
        value = torch.addcmul(mean, std, eps)  # one rounding, as the fused draw (_normal.affine_)
        # log q evaluated through eps = (value - mean) / std: same value and same total
        # derivative as through value, without cancellation when std << |mean|.
        dims = tuple(range(1, eps.dim()))
        log_q = -0.5 * eps.square().sum(dims) - (std.log().sum() + mean.numel() * _HALF_LOG_2PI)
        return value, log_q

    def log_prob(self, value: Tensor, mean: Tensor, params: dict[str, Tensor]) -> Tensor:
        std = self.std(mean, params)
        z = (value - mean) / std
        return -0.5 * z * z - std.log() - _HALF_LOG_2PI

    def distribution(self, mean: Tensor, params: dict[str, Tensor]) -> D.Distribution:
        return D.Normal(mean, self.std(mean, params), validate_args=False)

    def sample_with_prior(self, mean: Tensor, params: dict[str, Tensor], prior: Any, prior_buffers: dict[str, Tensor],
                          n: int, generator: torch.Generator | None, with_logp: bool, **noise: int
                          ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """With a ``Normal`` prior: the same draws as :meth:`sample` (same noise, same arithmetic)
        and the same log densities, computed from two per-sample sums while each block of
        noise is in cache; the noise itself is regenerated in backward, never stored."""
        from .priors import Normal

        if type(prior) is not Normal or type(self).std is not MeanFieldNormal.std:
            return super().sample_with_prior(mean, params, prior, prior_buffers, n, generator, with_logp, **noise)
        loc = (prior_buffers["loc"] if prior.loc == "pretrained" else prior.loc) if with_logp else None
        w, quad, sq, log_std = meanfield_draw(mean, params["rho"], loc, n, generator, **noise)
        if not with_logp:
            return w, None, None
        numel = mean.numel()
        log_q = -0.5 * sq - (log_std + numel * _HALF_LOG_2PI)
        log_p = (-0.5 / prior.scale ** 2) * quad - numel * (math.log(prior.scale) + _HALF_LOG_2PI)
        return w, log_p, log_q

    def kl_to(self, prior: Any, mean: Tensor, params: dict[str, Tensor], prior_buffers: dict[str, Tensor]
              ) -> Tensor | None:
        """KL to a ``Normal`` prior in a few fused passes (the generic route makes ~25)."""
        from .priors import Normal

        if type(prior) is not Normal:
            return None
        loc = prior_buffers["loc"] if prior.loc == "pretrained" else prior.loc
        return _NormalKL.apply(mean, params["rho"], loc, prior.scale)


class _NormalKL(torch.autograd.Function):
    """``KL(N(mean, softplus(rho)^2) || N(loc, scale^2))`` summed, computed block by block in
    parallel and keeping nothing but its inputs for backward (the autograd chain keeps
    ``std`` and ``mean - loc``, and its backward makes ~4 more weight-sized temporaries: for
    MiniLM's embedding table, 45 MB each, while a training step's activations are alive)."""

    @staticmethod
    def forward(ctx: Any, mean: Tensor, rho: Tensor, loc: Tensor | float, scale: float) -> Tensor:
        m, r, lc = mean.reshape(-1), rho.reshape(-1), loc.reshape(-1) if isinstance(loc, Tensor) else loc
        kept = kept_spread(rho)  # a training draw's of this step, where there is one

        def part(cols: slice) -> Tensor:
            s = softplus_scratch(r[cols], 3) if kept is None else kept[cols]
            d = torch.sub(m[cols], lc[cols] if isinstance(lc, Tensor) else lc, out=scratch(s.numel(), s.dtype))
            sq = torch.dot(s, s) + torch.dot(d, d)  # before s.log_() below
            log_s = s.log_() if kept is None else torch.log(s, out=scratch(s.numel(), s.dtype, 4))
            return torch.stack([sq, log_s.sum()])

        sums = torch.stack(run_parallel([lambda c=c: part(c) for c in blocks(m.numel())])).sum(0)
        ctx.save_for_backward(mean, rho, loc if isinstance(loc, Tensor) else None)
        ctx.loc, ctx.scale = (None if isinstance(loc, Tensor) else loc), scale
        ctx.kept = kept  # the draw's spread, for backward (rho is saved: a write to it raises there)
        return sums[0] / (2 * scale ** 2) - sums[1] + mean.numel() * (math.log(scale) - 0.5)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        mean, rho, loc_t = ctx.saved_tensors
        m, r = mean.reshape(-1), rho.reshape(-1)
        lc = loc_t.reshape(-1) if loc_t is not None else ctx.loc
        inv = 1.0 / ctx.scale ** 2
        g_mean = torch.empty_like(m) if ctx.needs_input_grad[0] else None
        g_rho = torch.empty_like(r) if ctx.needs_input_grad[1] else None
        kept = ctx.kept if g_rho is not None else None

        def part(cols: slice) -> None:
            if g_mean is not None:
                torch.sub(m[cols], lc[cols] if isinstance(lc, Tensor) else lc, out=g_mean[cols]).mul_(g * inv)
            if g_rho is not None:
                # d/drho [s^2 / (2 scale^2) - log s] = (s / scale^2 - 1 / s) * sigmoid(rho)
                s = softplus_scratch(r[cols], 3) if kept is None else kept[cols]
                out = torch.mul(s, inv, out=g_rho[cols])
                inv_s = s.reciprocal_() if kept is None else torch.reciprocal(s, out=scratch(s.numel(), s.dtype, 4))
                out.sub_(inv_s).mul_(torch.sigmoid(r[cols], out=scratch(s.numel(), s.dtype))).mul_(g)

        run_parallel([lambda c=c: part(c) for c in blocks(m.numel())])
        return (None if g_mean is None else g_mean.view_as(mean), None if g_rho is None else g_rho.view_as(rho),
                None, None)


class PointMass(VariationalFamily):
    """Zero variance: every sample is the mean (MAP training; reproduces the point model exactly)."""

    name = "pointmass"
    deterministic = True

    def sample(
        self, mean: Tensor, params: dict[str, Tensor], n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        return mean.expand(n, *mean.shape), mean.new_zeros(n)

    def log_prob(self, value: Tensor, mean: Tensor, params: dict[str, Tensor]) -> Tensor:
        return torch.zeros_like(value)

    def std(self, mean: Tensor, params: dict[str, Tensor]) -> Tensor:
        return torch.zeros_like(mean)


class Rank1Normal(VariationalFamily):
    """Rank-1 multiplicative Gaussian posterior (Dusenberry et al. 2020, "Efficient and Scalable
    Bayesian Neural Nets with Rank-1 Factors"): ``w_s = W * (r_s s_s^T)``.

    ``W`` (the parameter itself) is a point estimate; ``r`` has one factor per output unit (the
    tensor's dim 0: a linear layer's out features, a convolution's output channels, an
    embedding's rows) and ``s`` one per input unit (dim 1: in features, input channels per
    group; a transposed convolution's dims are (in, out): the same family with the roles
    swapped), shared over the kernel. Each sample draws ``r_s ~ N(r_mean, softplus(r_rho)^2)``
    and ``s_s ~ N(s_mean, softplus(s_rho)^2)``: the noise scales whole units, as dropout does
    (Gaussian dropout of rate ``p`` is multiplicative unit noise ``N(1, p / (1 - p))``).

    - The factors start at mean 1 and std ``init_std``: a zero ``init_std`` limit is the point
      model exactly.
    - Their prior is ``N(1, prior_std^2)``, this family's own: the site's weight prior is not
      used (the weight's distribution is degenerate; for a MAP ``W`` add weight decay in the
      optimiser). ``log_probs`` and the analytic KL are over the factors only.
    - Tensors of fewer than 2 dims (biases, LayerNorm scales) are not covered: they stay
      deterministic point parameters, as in the paper.
    - ``init_std`` of a factor is the relative std of every weight of its unit; two factors
      multiply, so a weight's relative std is about ``sqrt(2) * init_std``.
    - ``components=K > 1``: K factor pairs per weight (the paper's mixture), sample ``i`` of a
      call drawn from component ``i mod K``; ``log q`` is that component's density, so the ELBO
      is the average of the components' ELBOs (the analytic KL the mean of their KLs). The
      components' means start at ``1 + component_std * z`` (fixed-seed ``z``; ``component_std``
      defaults to ``init_std``) so that they can part; a larger ``component_std`` starts them
      further apart (each component's spreads still start at ``init_std``).

    Example::

        >>> bnn = bf.bayesify(model, variational="rank1:init_std=0.1")
    """

    name = "rank1"
    chunked_draws = True
    weight_prior = False
    elementwise_std = False

    def __init__(self, init_std: float = 0.2, prior_std: float = 0.5, components: int = 1,
                 component_std: float | None = None) -> None:
        for key, val in (("init_std", init_std), ("prior_std", prior_std)):
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise TypeError(f"{key} must be a positive number, got {val!r}")
            if not (val > 0 and math.isfinite(val)):
                raise ValueError(f"{key} must be a positive finite number, got {val!r}")
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise ValueError(f"components must be a positive int, got {components!r}")
        if component_std is not None:
            if isinstance(component_std, bool) or not isinstance(component_std, (int, float)):
                raise TypeError(f"component_std must be a non-negative number or None, got {component_std!r}")
            if not (component_std >= 0 and math.isfinite(component_std)):
                raise ValueError(f"component_std must be a non-negative finite number or None, got {component_std!r}")
            if components == 1:
                raise ValueError("component_std sets how far apart several components start; it needs components > 1")
            component_std = float(component_std)
        self.init_std = float(init_std)
        self.prior_std = float(prior_std)
        self.components = components
        self.component_std = component_std

    def spec(self) -> dict[str, Any]:
        spec = super().spec()
        if spec["component_std"] is None:  # the default (init_std): left out, as before the option
            del spec["component_std"]
        return spec

    def covers(self, point: Tensor) -> bool:
        return point.dim() >= 2

    def extra_numel(self, shape: tuple[int, ...]) -> int:
        return 2 * self.components * (shape[0] + shape[1]) if len(shape) >= 2 else 0

    def init(self, point: Tensor) -> dict[str, Tensor]:
        if point.dim() < 2:
            raise ValueError(f"the rank-1 family needs a tensor of at least 2 dims, got shape {tuple(point.shape)}")
        a, b = point.shape[:2]
        k = self.components
        rho0 = float(inverse_softplus(torch.tensor(self.init_std, dtype=torch.float64)))
        kw = {"dtype": point.dtype, "device": point.device}
        shape_r, shape_s = ((a,), (b,)) if k == 1 else ((k, a), (k, b))
        r_mean, s_mean = torch.ones(shape_r, **kw), torch.ones(shape_s, **kw)
        if k > 1:
            # Components start apart (else they see the same data and stay one mode): means
            # 1 + component_std * z, z from a fixed seed (a conversion stays deterministic and
            # leaves the global RNG alone; init_std -> 0 is still the point model by default).
            apart = self.init_std if self.component_std is None else self.component_std
            gen = torch.Generator().manual_seed(a * 7919 + b)
            r_mean += apart * torch.randn(shape_r, generator=gen).to(**kw)
            s_mean += apart * torch.randn(shape_s, generator=gen).to(**kw)
        return {"r_mean": r_mean, "r_rho": torch.full(shape_r, rho0, **kw),
                "s_mean": s_mean, "s_rho": torch.full(shape_s, rho0, **kw)}

    def factor_params(self, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The factors' means and stds, ``r`` and ``s`` concatenated: ``(components, a + b)`` each."""
        mean = torch.cat([params["r_mean"], params["s_mean"]], -1).reshape(self.components, -1)
        std = F.softplus(torch.cat([params["r_rho"], params["s_rho"]], -1)).reshape(self.components, -1)
        return mean, std

    def sample_factors(self, params: dict[str, Tensor], n: int, generator: torch.Generator | None = None,
                       *, seed: int | None = None, offset: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """``n`` factor draws ``(n, a + b)`` (``r`` then ``s``; sample ``i`` of a call from component
        ``i mod components``), the standard noise behind them and each draw's stds ``(n, a + b)``."""
        mean, std = self.factor_params(params)
        eps = standard_normal((n, mean.shape[1]), mean.dtype, mean.device, generator, seed, offset)
        if self.components > 1:
            comp = torch.arange(offset, offset + n, device=mean.device) % self.components
            mean, std = mean.index_select(0, comp), std.index_select(0, comp)
        return torch.addcmul(mean, std, eps), eps, std.expand(n, -1)

    def sample(
        self, mean: Tensor, params: dict[str, Tensor], n: int, generator: torch.Generator | None = None,
        *, seed: int | None = None, offset: int = 0,
    ) -> tuple[Tensor, Tensor]:
        w, _, log_q = self.sample_with_prior(mean, params, None, {}, n, generator, True, seed=seed, offset=offset)
        return w, log_q  # type: ignore[return-value]

    def sample_with_prior(self, mean: Tensor, params: dict[str, Tensor], prior: Any, prior_buffers: dict[str, Tensor],
                          n: int, generator: torch.Generator | None, with_logp: bool, **noise: int
                          ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Weight samples and the log densities of their *factors* under ``N(1, prior_std^2)`` and
        under q (``prior`` is the site's weight prior, not used)."""
        from ._rank1 import rank1_product

        f, eps, std = self.sample_factors(params, n, generator, **noise)
        a = params["r_mean"].shape[-1]
        w = rank1_product(mean, f[:, :a], f[:, a:])
        if not with_logp:
            return w, None, None
        k = f.shape[1]
        log_q = -0.5 * eps.square().sum(1) - (std.log().sum(1) + k * _HALF_LOG_2PI)
        log_p = (-0.5 / self.prior_std ** 2) * (f - 1).square().sum(1) - k * (math.log(self.prior_std)
                                                                             + _HALF_LOG_2PI)
        return w, log_p, log_q

    def log_prob(self, value: Tensor, mean: Tensor, params: dict[str, Tensor]) -> Tensor:
        raise ValueError("a rank-1 posterior has no density over the weights (it lives on the factors); "
                         "its log densities come with the samples (sample / sample_with_prior)")

    def kl_to(self, prior: Any, mean: Tensor, params: dict[str, Tensor], prior_buffers: dict[str, Tensor]
              ) -> Tensor:
        """Closed-form KL of the factors, ``N(mu, sigma^2)`` to ``N(1, prior_std^2)``, summed (with
        several components: their mean, the KL of the average of the components' ELBOs)."""
        mu, std = self.factor_params(params)
        p = self.prior_std
        kl = (std.square().sum() + (mu - 1).square().sum()) / (2 * p * p) - std.log().sum() \
            + mu.numel() * (math.log(p) - 0.5)
        return kl / self.components


VARIATIONAL: dict[str, type[VariationalFamily]] = {
    "meanfield": MeanFieldNormal,
    "mean_field": MeanFieldNormal,
    "meanfieldnormal": MeanFieldNormal,
    "pointmass": PointMass,
    "point_mass": PointMass,
    "map": PointMass,
    "rank1": Rank1Normal,
    "rank_1": Rank1Normal,
    "rank1normal": Rank1Normal,
}


def get_variational(
    variational: VariationalFamily | str | dict[str, Any] | None, default: VariationalFamily | None = None
) -> VariationalFamily:
    """Resolve a family from an instance, a shortcut (``"meanfield:init_std=1e-3"``) or a spec dict.

    A shortcut's unnamed fields come from ``default`` where its family has them.
    """
    if variational is None:
        return default if default is not None else MeanFieldNormal()
    if isinstance(variational, VariationalFamily):
        return variational
    if isinstance(variational, dict):
        spec = dict(variational)
        cls = lookup("variational family", spec.pop("name", None), VARIATIONAL)
        return cls(**spec)
    if isinstance(variational, str):
        name, kwargs = parse_shortcut(variational)
        cls = lookup("variational family", name, VARIATIONAL)
        try:
            return cls(**with_defaults(cls, kwargs, default))
        except TypeError as exc:
            raise ValueError(f"bad arguments for variational family {name!r}: {exc}") from None
    raise TypeError(
        "variational must be a bayesify.variational.VariationalFamily, a name "
        f"({', '.join(sorted(set(VARIATIONAL)))}) or None, got {type(variational).__name__}"
    )
