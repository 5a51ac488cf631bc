"""A Bayesian model as a function of its posterior means, for torch.func.

The curvature pass (``laplace.py``) differentiates the network at its means per example, and
the linearised predictive (``predict(..., linearized=True)``) pushes weight perturbations
through it with forward-mode AD. Both need ``f(params, inputs)``: the model's own forward
with the site means replaced by ``params`` (``torch.func.functional_call``), every Bayesian
layer computing with the values it is given instead of sampling (:func:`at_means`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .loss import first_tensor
from .module import VIModule
from .sites import Site, iter_sites

__all__ = ["math_attention", "at_means", "spread_sites", "mean_output", "site_means", "linearized_outputs",
           "perturbations"]

_ABSENT = object()
#: ids of the roots inside :func:`at_means` (a nested call on the same root is free).
_ACTIVE: set[int] = set()


def math_attention() -> Any:
    """``scaled_dot_product_attention`` on its composite (math) kernel: the fused CPU kernels have
    no forward-mode derivative and no batching rule for their backward, which the transforms here need."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


@contextmanager
def at_means(root: nn.Module) -> Iterator[None]:
    """Within: calling ``root`` (or any VIModule in it) without ``samples=`` runs its forward
    with the parameters as they are (the means, or what ``functional_call`` substitutes);
    attention runs on the math kernel (:func:`math_attention`)."""
    if id(root) in _ACTIVE:  # already inside at_means(root): nothing to set again
        yield
        return
    mods = [m for m in root.modules() if isinstance(m, VIModule)]
    saved = [(m, m.__dict__.get("_means_outside_sampling", _ABSENT)) for m in mods]
    for m in mods:
        m._means_outside_sampling = True
    _ACTIVE.add(id(root))
    try:
        with math_attention():
            yield
    finally:
        _ACTIVE.discard(id(root))
        for m, old in saved:
            if old is _ABSENT:
                m.__dict__.pop("_means_outside_sampling", None)
            else:
                m._means_outside_sampling = old


def site_means(root: nn.Module, sites: list[Site] | None = None) -> dict[str, Tensor]:
    """``{qualname: mean}`` (detached) for ``sites`` (default: every site of ``root``)."""
    return {s.qualname: s.mean.detach() for s in (iter_sites(root) if sites is None else sites)}


def mean_output(root: nn.Module, params: dict[str, Tensor], args: tuple, kwargs: dict) -> Tensor:
    """The prediction tensor (``.logits`` or the first tensor) of ``root`` with ``params``
    substituted for its site means; call inside :func:`at_means`."""
    return first_tensor(torch.func.functional_call(root, params, args, kwargs, strict=False))


def spread_sites(sites: list[Site], factors: dict[str, Tensor] | None = None, floor: float = 2e-12) -> list[Site]:
    """The sites with a spread: those a last-layer Laplace left at (numerically) zero spread are
    skipped, so that the linearised predictive batches tangents only from the layers that move."""
    out = []
    for s in sites:
        if factors and s.qualname in factors:
            out.append(s)
            continue
        try:
            std = s.spec.variational.std(s.mean.detach(), {k: v.detach() for k, v in s.vparams().items()})
        except ValueError:
            out.append(s)
            continue
        if std.numel() and float(std.max()) > floor:
            out.append(s)
    return out


def perturbations(sites: list[Site], n: int, generator: torch.Generator | None,
                  factors: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """``w_s - mean`` ``(n, *shape)`` for every site: ``U z`` where ``factors`` holds a covariance
    factor ``U`` ``(P, P)`` of the site (a "full" Laplace site: correlated draws), else ``std * eps``
    where the family has an elementwise std, else a draw of the family minus the mean."""
    out = {}
    factors = factors or {}
    for s in sites:
        q, mean, vp = s.spec.variational, s.mean.detach(), {k: v.detach() for k, v in s.vparams().items()}
        u = factors.get(s.qualname)
        if u is not None:
            z = torch.randn((n, u.shape[1]), generator=generator, dtype=u.dtype, device=u.device)
            out[s.qualname] = (z @ u.T).to(mean.dtype).reshape(n, *mean.shape)
            continue
        try:
            std = q.std(mean, vp)
        except ValueError:
            out[s.qualname] = q.sample(mean, vp, n, generator)[0].detach() - mean
            continue
        eps = torch.randn((n, *mean.shape), generator=generator, dtype=mean.dtype, device=mean.device)
        out[s.qualname] = std * eps
    return out


def linearized_outputs(root: nn.Module, args: tuple, kwargs: dict, means: dict[str, Tensor],
                       tangents: dict[str, Tensor], chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """``(f(x, mean), J(x) @ tangent_s)`` for every ``s``: one forward-mode pass (``torch.func.jvp``)
    vectorised over the ``S`` tangents with ``torch.vmap``; the primal is not batched, so the
    network at the means runs once."""
    def f(p: dict[str, Tensor]) -> Tensor:
        return mean_output(root, p, args, kwargs)

    def one(t: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return torch.func.jvp(f, (means,), (t,))

    with at_means(root):
        primal, jt = torch.vmap(one, out_dims=(None, 0), chunk_size=chunk_size)(tangents)
    return primal, jt
