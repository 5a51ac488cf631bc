"""The curvature pass's fast route: per-example GGN from one backward per loss-Hessian column.

With ``Lambda_n = sum_k v_nk v_nk^T`` (a square-root factor of the loss Hessian in the outputs
of example ``n``: categorical ``v_nk = sqrt(p_k) (e_k - p)``, one column ``e_y - p`` for the
MC Fisher, ``e_k`` for a normal likelihood), the GGN of a parameter ``w`` is
``sum_{n,k} (J_n^T v_nk) (J_n^T v_nk)^T``. One forward at the means records every site
module's input; backpropagating the columns ``v_k`` (batched, ``autograd.grad(...,
is_grads_batched=True)``) gives each site module's per-example *output* gradients ``g_nk``;
the per-example parameter gradient ``J_n^T v_nk`` then follows from the module's input and
``g_nk`` alone:

- ``Linear``: ``g a^T`` (a 2-d input: the diagonal is ``(sum_k g^2)^T a^2``, one matmul;
  with extra dims: summed over positions per example, then squared); bias ``g``;
- ``Conv1d`` / ``Conv2d`` (zero padding, one group): ``g`` times the unfolded input, per example;
- ``LayerNorm``: ``g * x_hat`` and ``g`` summed over the positions of the example;
- ``Embedding``: ``g`` scattered onto the looked-up rows, per example;
- any other module: its own forward differentiated per example with ``torch.func`` (the
  module alone, not the network), which also serves the ``structure="full"`` sites.

No ``vmap`` over the examples of the whole network (which Hugging Face's mask checks refuse)
and no per-example Jacobian of the network. The result equals the per-example route of
``laplace.py``; ``laplace`` checks that on a few examples of the first batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .loss import first_tensor
from .nn import VIConv1d, VIConv2d, VIEmbedding, VILayerNorm, VILinear
from .sites import Site

__all__ = ["Unsupported", "check_sites", "Captured", "forward_captured", "columns", "batch_curvature"]

#: Elements of the per-example gradients held at once (one chunk of examples).
CHUNK_ELEMENTS = 2 ** 24


class Unsupported(Exception):
    """The fast route does not apply to this model (``laplace`` falls back to the per-example route)."""


def check_sites(root: nn.Module, sites: list[Site]) -> None:
    """Raise :class:`Unsupported` where a site's parameter is registered in more than one module
    (tied), so that its module's forward is not its only use."""
    count: dict[int, int] = {}
    for _, m in root.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None:
                count[id(p)] = count.get(id(p), 0) + 1
    for s in sites:
        if count.get(id(s.mean), 0) != 1:
            raise Unsupported(f"{s.qualname} is tied to another module's parameter")


class Captured:
    """What one forward recorded: per site module, its inputs and its output (a clone handed on,
    so that an in-place operation downstream cannot rewrite the recorded output)."""

    def __init__(self) -> None:
        self.calls: dict[int, list[tuple[tuple, dict, Tensor]]] = {}


def forward_captured(root: nn.Module, sites: list[Site], args: tuple, kwargs: dict, bsz: int
                     ) -> tuple[Tensor, Captured]:
    """The prediction of ``root`` (call inside ``at_means``) with autograd recording from the site
    means on, and each site module's input / output. A module output with batch size 1 (e.g.
    position embeddings) is expanded to ``bsz`` so that its gradient is per example."""
    cap = Captured()
    owners = {id(s.module): s.module for s in sites}

    def hook(mod: nn.Module, a: tuple, kw: dict, out: Any) -> Any:
        if not isinstance(out, Tensor) or out.dim() == 0:
            raise Unsupported(f"{type(mod).__name__} returns {type(out).__name__}, not a tensor")
        if out.shape[0] != bsz:
            if out.shape[0] != 1:
                raise Unsupported(f"{type(mod).__name__}'s output has leading size {out.shape[0]}, not the batch {bsz}")
            out = out.expand(bsz, *out.shape[1:])
            a = tuple(x.expand(bsz, *x.shape[1:]) if isinstance(x, Tensor) and x.dim() and x.shape[0] == 1 else x
                      for x in a)
        cap.calls.setdefault(id(mod), []).append((a, kw, out))
        return out.clone()

    hooks = [m.register_forward_hook(hook, with_kwargs=True) for m in owners.values()]
    flags = [(s.mean, s.mean.requires_grad) for s in sites]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        with torch.enable_grad():
            out = first_tensor(root(*args, **kwargs))
    finally:
        for h in hooks:
            h.remove()
        for p, req in flags:
            p.requires_grad_(req)
    for key, mod in owners.items():
        n = len(cap.calls.get(key, []))
        if n != 1:
            raise Unsupported(f"{type(mod).__name__} ran {n} times in one forward (the fast route needs once)")
    return out, cap


def columns(out: Tensor, kind: str, curv: str, y: Tensor | None) -> tuple[int, Any]:
    """``(K, make)``: the number of loss-Hessian columns per example and ``make(lo, hi)``, the
    columns ``lo:hi`` as output gradients ``(hi - lo, *out.shape)``."""
    bsz = out.shape[0]
    if kind == "normal":
        k = out[0].numel()

        def make_normal(lo: int, hi: int) -> Tensor:
            eye = torch.eye(k, dtype=out.dtype, device=out.device)[lo:hi]
            return eye.reshape(hi - lo, 1, *out.shape[1:]).expand(hi - lo, *out.shape).contiguous()
        return k, make_normal
    c = out.shape[-1]
    logits = out.detach().reshape(bsz, -1, c)
    p = torch.softmax(logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits, -1)
    if curv == "mc":
        v = (F.one_hot(y.reshape(bsz, -1), c).to(p.dtype) - p).to(out.dtype)
        return 1, lambda lo, hi: v.reshape(1, *out.shape)
    positions = logits.shape[1]
    # M[b, l, c, :] = sqrt(p_blc) (e_c - p_bl): column (l, c) lives at position l only.
    m = (p.sqrt().unsqueeze(-1) * (torch.eye(c, dtype=p.dtype, device=p.device) - p.unsqueeze(-2))).to(out.dtype)

    def make_cat(lo: int, hi: int) -> Tensor:
        k = torch.arange(lo, hi, device=out.device)
        pos, cls = k // c, k % c
        v = torch.zeros(hi - lo, bsz, positions, c, dtype=out.dtype, device=out.device)
        v[torch.arange(hi - lo, device=out.device), :, pos] = m[:, pos, cls].transpose(0, 1)
        return v.reshape(hi - lo, *out.shape)
    return positions * c, make_cat


def _output_grads(out: Tensor, outs: list[Tensor], cols: Tensor) -> list[Tensor | None]:
    if cols.shape[0] == 1:  # one column (MC Fisher): a plain backward, no batching
        return [None if g is None else g.unsqueeze(0)
                for g in torch.autograd.grad(out, outs, cols[0], retain_graph=True, allow_unused=True)]
    try:
        return list(torch.autograd.grad(out, outs, cols, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True))
    except (RuntimeError, NotImplementedError):  # no batching rule for a backward op: column by column
        per = [torch.autograd.grad(out, outs, v, retain_graph=True, allow_unused=True) for v in cols]
        return [None if per[0][i] is None else torch.stack([p[i] for p in per]) for i in range(len(outs))]


def batch_curvature(sums: dict[str, Tensor], sites: list[Site], out: Tensor, cap: Captured, kind: str,
                    curv: str, y: Tensor | None, full: set[str], cols: Tensor | None = None) -> None:
    """Add this batch's GGN (diagonal, or the full block of the sites in ``full``) to ``sums``;
    ``cols`` ``(K, *out.shape)``: these columns instead of the likelihood's."""
    if not out.requires_grad:  # no selected site reaches the prediction: no curvature
        return
    n_cols, make = (columns(out, kind, curv, y) if cols is None
                    else (cols.shape[0], lambda lo, hi: cols[lo:hi]))
    by_mod: dict[int, list[Site]] = {}
    for s in sites:
        by_mod.setdefault(id(s.module), []).append(s)
    keys = list(by_mod)
    outs = [cap.calls[k][0][2] for k in keys]
    per_col = sum(o.numel() for o in outs)
    step = max(1, min(n_cols, CHUNK_ELEMENTS // max(1, per_col)))
    for lo in range(0, n_cols, step):
        hi = min(n_cols, lo + step)
        grads = _output_grads(out, outs, make(lo, hi))
        for key, g in zip(keys, grads):
            if g is None:
                continue
            a, kw, _ = cap.calls[key][0]
            for name, add in _site_curvature(by_mod[key][0].module, by_mod[key], a, kw, g.detach(), full).items():
                sums[name] = add if name not in sums else sums[name] + add


# -- per module -----------------------------------------------------------------------------------------
# Each returns, from the module's input ``x`` and its output gradients ``g`` ``(K, B, *out)``, either the
# summed squared per-example gradients per parameter (``var is None``; the GGN diagonal), or, given the
# parameters' posterior variances ``var``, the per-example output covariance ``(B, K, K)``
# ``sum_w var_w (J^T v_k)_w (J^T v_l)_w`` under the key ``COV``.
COV = "__output_covariance__"


def _chunks(bsz: int, per_example: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(1, per_example))
    return [(lo, min(bsz, lo + step)) for lo in range(0, bsz, step)]


def _reduce(per: Tensor, qualname: str, full: set[str], shape: torch.Size) -> Tensor:
    """``per`` ``(n, *shape)`` per-example gradients -> summed squares (diag) or outer products (full)."""
    if qualname in full:
        r = per.reshape(per.shape[0], -1)
        return r.T @ r
    return per.square().sum(0).reshape(shape)


def _cov(per: Tensor, var: Tensor) -> Tensor:
    """``per`` ``(b, K, *shape)`` -> ``(b, K, K)`` = ``per diag(var) per^T`` per example."""
    r = per.reshape(per.shape[0], per.shape[1], -1)
    return torch.bmm(r * var.reshape(1, 1, -1).to(r.dtype), r.transpose(1, 2))


def _fast_kind(mod: nn.Module, names: set[str], x: Any) -> Any:
    fwd = type(mod).forward
    if not isinstance(x, Tensor):
        return None
    if fwd in (nn.Linear.forward, VILinear.forward) and names <= {"weight", "bias"}:
        return _linear
    if (fwd in (nn.Conv1d.forward, nn.Conv2d.forward, VIConv1d.forward, VIConv2d.forward) and mod.groups == 1
            and mod.padding_mode == "zeros" and not isinstance(mod.padding, str) and names <= {"weight", "bias"}):
        return _conv
    if fwd in (nn.LayerNorm.forward, VILayerNorm.forward) and names <= {"weight", "bias"}:
        return _layer_norm
    if (fwd in (nn.Embedding.forward, VIEmbedding.forward) and names == {"weight"} and mod.max_norm is None
            and not mod.scale_grad_by_freq and x.dtype in (torch.int64, torch.int32)):
        return _embedding
    return None


def _site_curvature(mod: nn.Module, sites: list[Site], a: tuple, kw: dict, g: Tensor, full: set[str],
                    var: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    names = {s.name: s.qualname for s in sites}
    fast = None
    if not (set(names.values()) & full) and not kw and len(a) == 1:
        fast = _fast_kind(mod, set(names), a[0])
    if fast is not None:
        v = None if var is None else {n: var[q] for n, q in names.items()}
        res = fast(mod, a[0].detach(), g, v)
        return res if var is not None else {names[n]: t for n, t in res.items() if n in names}
    return _generic(mod, names, a, kw, g, full, var)


def _patches(x: Tensor, kernel: tuple, dilation: tuple, padding: tuple, stride: tuple) -> Tensor:
    """``F.unfold`` by a strided view and one copy (about twice as fast on CPU): ``(B, C*kh*kw, positions)``."""
    b, c = x.shape[:2]
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    p = xp.unfold(2, dilation[0] * (kernel[0] - 1) + 1, stride[0]).unfold(3, dilation[1] * (kernel[1] - 1) + 1,
                                                                      stride[1])
    p = p[..., ::dilation[0], ::dilation[1]]  # (B, C, Ho, Wo, kh, kw)
    return p.permute(0, 1, 4, 5, 2, 3).reshape(b, c * kernel[0] * kernel[1], -1)


def _linear(mod: nn.Linear, x: Tensor, g: Tensor, var: dict[str, Tensor] | None) -> dict[str, Tensor]:
    x = x.to(g.dtype)
    if x.dim() == 2:  # (K, B, O), (B, I): no per-example gradient is formed
        if var is None:
            gs = g.square().sum(0)
            return {"weight": gs.T @ x.square(), "bias": gs.sum(0)}
        v = x.square() @ var["weight"].to(g.dtype).T if "weight" in var else 0
        v = v + var["bias"].to(g.dtype) if "bias" in var else v
        return {COV: torch.einsum("kbo,lbo,bo->bkl", g, g, v * torch.ones_like(g[0]))}
    k, bsz = g.shape[:2]
    gf = g.reshape(k, bsz, -1, g.shape[-1])
    xf = x.reshape(bsz, -1, x.shape[-1])
    gb = gf.sum(2)
    if var is None:
        w = torch.zeros(mod.weight.shape, dtype=g.dtype, device=g.device)
        for lo, hi in _chunks(bsz, k * w.numel()):
            w += torch.einsum("kbto,bti->kboi", gf[:, lo:hi], xf[lo:hi]).square().sum((0, 1))
        return {"weight": w, "bias": gb.square().sum((0, 1))}
    cov = torch.zeros(bsz, k, k, dtype=g.dtype, device=g.device)
    if "weight" in var:
        for lo, hi in _chunks(bsz, k * mod.weight.numel()):
            cov[lo:hi] += _cov(torch.einsum("kbto,bti->bkoi", gf[:, lo:hi], xf[lo:hi]), var["weight"])
    if "bias" in var:
        cov += _cov(gb.transpose(0, 1), var["bias"])
    return {COV: cov}


def _conv(mod: nn.Module, x: Tensor, g: Tensor, var: dict[str, Tensor] | None) -> dict[str, Tensor]:
    one_d = isinstance(mod, nn.Conv1d)
    x = x.to(g.dtype)
    if one_d:
        x, g = x.unsqueeze(-2), g.unsqueeze(-2)
    pair = (lambda v, one=1: (one, v[0])) if one_d else (lambda v, one=1: tuple(v))
    k, bsz, co = g.shape[:3]
    gf = g.reshape(k, bsz, co, -1)
    gb = gf.sum(-1)  # (K, B, O)
    per = k * mod.weight.numel()
    w = torch.zeros(mod.weight.shape, dtype=g.dtype, device=g.device).reshape(co, -1)
    cov = None if var is None else torch.zeros(bsz, k, k, dtype=g.dtype, device=g.device)
    if var is None or "weight" in var:
        for lo, hi in _chunks(bsz, per):
            u = _patches(x[lo:hi], pair(mod.kernel_size), pair(mod.dilation), pair(mod.padding, 0), pair(mod.stride))
            gc = gf[:, lo:hi].transpose(0, 1).reshape(hi - lo, k * co, -1)  # (b, K*O, positions)
            pw = torch.bmm(gc, u.transpose(1, 2))  # per-example gradients (b, K*O, C*kh*kw)
            if cov is None:
                w += pw.square_().reshape(hi - lo, k, co, -1).sum((0, 1))
            else:
                cov[lo:hi] += _cov(pw.reshape(hi - lo, k, -1), var["weight"])
    if cov is not None:
        if "bias" in var:
            cov += _cov(gb.transpose(0, 1), var["bias"])
        return {COV: cov}
    return {"weight": w.reshape(mod.weight.shape), "bias": gb.square().sum((0, 1))}


def _layer_norm(mod: nn.LayerNorm, x: Tensor, g: Tensor, var: dict[str, Tensor] | None) -> dict[str, Tensor]:
    xhat = F.layer_norm(x, mod.normalized_shape, None, None, mod.eps).to(g.dtype)
    k, bsz = g.shape[:2]
    shape = tuple(mod.normalized_shape)
    gf = g.reshape(k, bsz, -1, *shape)
    per = {"weight": (gf * xhat.reshape(bsz, -1, *shape)).sum(2), "bias": gf.sum(2)}  # (K, B, *shape)
    if var is None:
        return {n: t.square().sum((0, 1)) for n, t in per.items()}
    return {COV: sum(_cov(per[n].transpose(0, 1), v) for n, v in var.items())}


def _embedding(mod: nn.Embedding, x: Tensor, g: Tensor, var: dict[str, Tensor] | None) -> dict[str, Tensor]:
    k, bsz, d = g.shape[0], g.shape[1], g.shape[-1]
    idx = x.reshape(bsz, -1).long()
    gf = g.reshape(k, bsz, -1, d)
    if mod.padding_idx is not None:  # F.embedding's rule: no gradient for the padding row
        gf = gf * (idx != mod.padding_idx).unsqueeze(-1).to(gf.dtype)
    n = mod.weight.shape[0]
    key = (torch.arange(bsz, device=idx.device).unsqueeze(1) * n + idx).reshape(-1)
    uniq, inv = torch.unique(key, return_inverse=True)  # (example, row) pairs
    rows = torch.zeros(k, uniq.numel(), d, dtype=g.dtype, device=g.device)
    rows.index_add_(1, inv, gf.reshape(k, -1, d))  # per-example gradient of each looked-up row
    if var is None:
        w = torch.zeros(mod.weight.shape, dtype=g.dtype, device=g.device)
        w.index_add_(0, uniq % n, rows.square().sum(0))
        return {"weight": w}
    per_row = torch.einsum("kud,lud,ud->ukl", rows, rows, var["weight"].to(g.dtype)[uniq % n])
    cov = torch.zeros(bsz, k, k, dtype=g.dtype, device=g.device)
    return {COV: cov.index_add_(0, uniq // n, per_row)}


def _generic(mod: nn.Module, names: dict[str, str], a: tuple, kw: dict, g: Tensor, full: set[str],
             var: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Any module: its forward differentiated per example (``torch.func``, the module alone)."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    k, bsz = g.shape[:2]
    leaves, spec = tree_flatten((a, kw))
    batched = [isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == bsz for v in leaves]
    params = {n: mod._parameters[n].detach() for n in names}

    def one(p: dict[str, Tensor], ex: list[Any], gn: Tensor) -> dict[str, Tensor]:
        one_leaves = [v.unsqueeze(0) if b else v for v, b in zip(ex, batched)]
        args, kwargs = tree_unflatten(one_leaves, spec)
        _, vjp = torch.func.vjp(lambda q: torch.func.functional_call(mod, q, args, kwargs, strict=False), p)
        return torch.vmap(vjp)(gn.unsqueeze(1))[0]

    numel = sum(p.numel() for p in params.values())
    leaves = [v.detach() if isinstance(v, Tensor) else v for v in leaves]
    in_dims = ([0 if b else None for b in batched],)
    try:
        per = torch.vmap(one, in_dims=(None, *in_dims, 1), chunk_size=max(1, CHUNK_ELEMENTS // max(1, k * numel))
                         )(params, leaves, g)  # {name: (B, K, *shape)}
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
        raise Unsupported(f"{type(mod).__name__}: per-example gradients of the module failed ({exc})") from None
    if var is not None:
        return {COV: sum(_cov(per[n], var[q]) for n, q in names.items())}
    return {names[n]: _reduce(v.reshape(-1, *v.shape[2:]), names[n], full, params[n].shape) for n, v in per.items()}


# -- the output covariance of the linearised predictive ---------------------------------------------------
#: Largest number of outputs per example for which :func:`output_covariance` forms ``(B, K, K)``.
MAX_COV_OUTPUTS = 64


def output_covariance(root: nn.Module, groups: dict[str, list[Site]], var: dict[str, Tensor], args: tuple,
                      kwargs: dict, bsz: int) -> tuple[Tensor, dict[str, Tensor]]:
    """``(f(x, mean), {group: J diag(var) J^T})``: the outputs at the means ``(B, *out)`` and, per group of
    sites, the per-example covariance ``(B, K, K)`` of the linearised outputs ``f + J delta`` for
    ``delta ~ N(0, diag(var))`` (``K`` outputs per example); one forward and one batched backward of
    the ``K`` output directions. Call inside ``at_means``."""
    sites = [s for ss in groups.values() for s in ss]
    out, cap = forward_captured(root, sites, args, kwargs, bsz)
    k = out[0].numel()
    if k > MAX_COV_OUTPUTS:
        raise Unsupported(f"{k} outputs per example (more than MAX_COV_OUTPUTS={MAX_COV_OUTPUTS})")
    covs = {g: torch.zeros(bsz, k, k, dtype=out.dtype, device=out.device) for g in groups}
    if not out.requires_grad or not sites:
        return out.detach(), covs
    _, make = columns(out, "normal", "ggn", None)
    mods: dict[int, nn.Module] = {id(s.module): s.module for s in sites}
    keys = list(mods)
    grads = _output_grads(out, [cap.calls[key][0][2] for key in keys], make(0, k))
    for key, g in zip(keys, grads):
        if g is None:
            continue
        a, kw, _ = cap.calls[key][0]
        for name, ss in groups.items():
            mine = [s for s in ss if id(s.module) == key]
            if mine:
                covs[name] += _site_curvature(mods[key], mine, a, kw, g.detach(), set(), var)[COV].to(out.dtype)
    return out.detach(), covs


def autograd_output_covariance(root: nn.Module, sites: list[Site], var: dict[str, Tensor], args: tuple,
                               kwargs: dict, v: Tensor) -> float:
    """The reference for :func:`output_covariance` on one example (batch of one), along the output
    direction ``v``: ``v^T J diag(var) J^T v = sum_w var_w (d (v . f) / d w)^2`` from plain autograd
    (the whole network, every use of every parameter). Call inside ``at_means``."""
    means = [s.mean for s in sites]
    flags = [p.requires_grad for p in means]
    try:
        for p in means:
            p.requires_grad_(True)
        with torch.enable_grad():
            o = first_tensor(root(*args, **kwargs)).reshape(-1)
            if o.numel() != v.numel():
                raise Unsupported(f"the model's output for one example has {o.numel()} elements, not {v.numel()}")
            gs = torch.autograd.grad(o, means, v.to(o.dtype), allow_unused=True)
    finally:
        for p, req in zip(means, flags):
            p.requires_grad_(req)
    return sum(float((var[s.qualname].double() * g.detach().double().square()).sum())
               for s, g in zip(sites, gs) if g is not None)
