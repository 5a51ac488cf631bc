"""The weight samples of a rank-1 posterior: ``w_s = W * (r_s s_s^T)`` for every sample at once.

``W`` is a tensor of shape ``(a, b, *k)`` (a linear weight ``(out, in)``, a convolution's
``(out, in / groups, *kernel)``); ``r`` is ``(n, a)`` and ``s`` is ``(n, b)``, one factor pair per
sample. :class:`Rank1Product` keeps only ``W``, ``r`` and ``s`` for backward (autograd's own chain
would keep the ``(n, a, b)`` outer product, as large as the samples themselves for a linear
layer), and registers each sample with ``recompute_samples=True``'s hooks so that no sample
is kept between forward and backward there either.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._normal import SampleRecompute

__all__ = ["rank1_product", "rank1_factors"]


def _product(weight: Tensor, r: Tensor, s: Tensor) -> Tensor:
    n, (a, b) = r.shape[0], weight.shape[:2]
    outer = (r.unsqueeze(2) * s.unsqueeze(1)).reshape(n, a, b, *([1] * (weight.dim() - 2)))
    return weight.unsqueeze(0) * outer


class Rank1Product(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight: Tensor, r: Tensor, s: Tensor) -> Tensor:
        w = _product(weight, r, s)
        ctx.save_for_backward(weight, r, s)
        rec = SampleRecompute.active()
        if rec is not None:
            wd, rd, sd = weight.detach(), r.detach(), s.detach()
            rec.register(w, lambda: _product(wd, rd, sd), (weight, r, s))
        return w

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        weight, r, s = ctx.saved_tensors
        n, (a, b) = r.shape[0], weight.shape[:2]
        g3 = g.reshape(n, a, b, -1)
        wk = weight.reshape(a, b, -1)
        g_w = g_r = g_s = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gw = (g3 * wk).sum(-1)  # (n, a, b): the gradient of the outer product
            if ctx.needs_input_grad[1]:
                g_r = torch.bmm(gw, s.unsqueeze(2)).squeeze(2)
            if ctx.needs_input_grad[2]:
                g_s = torch.bmm(r.unsqueeze(1), gw).squeeze(1)
        if ctx.needs_input_grad[0]:
            outer = r.unsqueeze(2) * s.unsqueeze(1)  # (n, a, b)
            # sum over the samples of g_s * outer_s: one matrix product per (a, b) block
            g_w = torch.einsum("np,npk->pk", outer.reshape(n, a * b), g3.reshape(n, a * b, -1)).reshape(weight.shape)
        return g_w, g_r, g_s


def rank1_product(weight: Tensor, r: Tensor, s: Tensor) -> Tensor:
    """``(n, *weight.shape)`` samples ``weight * r[:, :, None, ...] * s[:, None, :, ...]``.

    A linear weight's samples carry their factors (:func:`rank1_factors`): a per-sample linear
    layer under vmap then computes ``((x_s * s_s) @ W^T) * r_s`` from them (``bayesify._batched``),
    and no gradient flows through the materialised samples."""
    w = Rank1Product.apply(weight, r, s)
    if weight.dim() == 2:
        w._bayesify_rank1 = (weight, r, s, w._version)
    return w


def rank1_factors(w: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(W, r, s)`` of samples ``w`` drawn by :func:`rank1_product` from a 2-D weight, as long
    as ``w`` has not been modified in place since; else None."""
    f = getattr(w, "_bayesify_rank1", None)
    if f is None or f[3] != w._version:
        return None
    return f[0], f[1], f[2]
