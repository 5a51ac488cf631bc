"""Layer kernels for per-sample weights under ``torch.vmap``: ``F.linear`` / ``F.conv2d`` rules
that compute all weight samples at once where PyTorch's own vmap rule is slow.

Each public ``Sample*`` Function computes the plain op outside vmap (the per-sample loop)
and has a ``vmap`` staticmethod: given the samples' weights ``(S, ...)``, it calls a
``_Batched*`` Function on the physical tensors, whose forward and backward are written for
all samples at once. Autograd records that inner Function as usual (``loss.backward()``
runs outside vmap), so its backward decides the gradients' layout and algorithm.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from ._normal import drawn_sample, weight_grads_by_rows
from ._rank1 import rank1_factors

__all__ = ["PointModelError", "SampleLinear", "SampleConv2d", "SampleAttention", "SampleBatchNorm",
           "SampleBatchNormTrain",
           "conv2d_by_gemm", "conv2d_gemm",
           "conv2d_kernel", "kernels_apply"]


class SampleLinear(torch.autograd.Function):
    """``F.linear`` whose vmap rule computes all samples at once and returns the weight
    gradient contiguous, in the weight's own ``(S, out, in)`` layout.

    Under vmap with per-sample weights PyTorch's ``F.linear`` produces the weight gradient as
    the transpose of an ``(S, in, out)`` product; the draws' backward then reads every sample
    of it through a strided copy (MiniLM-shaped draws, 10 samples, 2 threads: their backward
    takes 510-640 ms from transposed gradients and 340-380 ms from contiguous ones,
    ``benchmarks/bench.py`` notes). Outside vmap (the per-sample loop) it is ``F.linear``."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, bias = inputs
        # Only what backward reads (F.linear's own rule keeps the weight only for an input gradient).
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gx = g @ weight if ctx.needs_input_grad[0] else None
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, int]:
        x_dim, w_dim, b_dim = in_dims
        _check_linear_shapes(x if x_dim is None else x.select(x_dim, 0),
                             weight if w_dim is None else weight.select(w_dim, 0))
        if w_dim is None or weight.dim() != 3:
            # weights shared by the samples: PyTorch's own rule
            return torch.vmap(F.linear, in_dims=in_dims)(x, weight, bias), 0
        b = bias if bias is None or b_dim is None else bias.movedim(b_dim, 0)
        factors = rank1_factors(weight) if RANK1_FACTORS and w_dim == 0 else None
        if factors is not None and _rank1_rows_pay(x, x_dim, weight.shape[-2], weight.shape[-1]):
            return _rank1_linear(x, x_dim, *factors, b), 0
        w = weight.movedim(w_dim, 0)
        if x_dim is None:  # one input for every sample
            lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        else:
            xs = x.movedim(x_dim, 0)
            lead, x2 = xs.shape[1:-1], xs.reshape(xs.shape[0], -1, xs.shape[-1])
        drawn = drawn_sample(weight) if w_dim == 0 and torch.is_grad_enabled() else None
        if drawn is not None and weight.is_contiguous() and weight.dtype in (torch.float32, torch.float64):
            out = _DrawnLinear.apply(x2, weight, b, drawn.mean, drawn.rho, drawn)
        else:
            out = _BatchedLinear.apply(x2, w, b)
        return out.reshape(w.shape[0], *lead, w.shape[1]), 0


#: Per-sample linear layers of rank-1 sites (``variational="rank1"``) compute ``((x_s * s_s) @ W^T) * r_s``
#: from the factors under vmap, the point model's product on ``S x N`` rows with one shared ``W``
#: (no ``(S, out, in)`` weight gradient). False: through the materialised samples (the A/B partner).
RANK1_FACTORS = True

#: ... where each sample's rows ``M`` satisfy ``M (in + out) <= RANK1_FACTOR_MAX_RATIO * in * out``: the
#: factor path makes passes over the activations (``x * s``, ``* r`` and their gradients), the
#: materialised one over the ``(S, out, in)`` weight gradient. Measured per layer (forward + backward,
#: 10 samples, one thread, AVX-512 Xeon; materialised vs factor): ratio 0.27 (784 -> 1200, M 128)
#: 185 vs 100 ms; 0.83 (384 -> 1536, M 256) 111 vs 87 ms; 1.67 (M 512) 169 vs 171 ms; 2.67
#: (384 -> 384, M 512) 43 vs 46 ms; 3.33 (384 -> 1536, M 1024) 320 vs 414 ms. A whole MiniLM train
#: step (batch 8 x 64 tokens: ratios 1.67-2.67) was 7.4 s with the factor path, 6.4 s without.
RANK1_FACTOR_MAX_RATIO = 1.0


def _rank1_rows_pay(x: Tensor, x_dim: int | None, out_features: int, in_features: int) -> bool:
    """Whether a per-sample linear layer of a rank-1 site runs at the factor level (see
    :data:`RANK1_FACTOR_MAX_RATIO`): ``x`` one sample's rows ``M`` (``x_dim`` its sample dim)."""
    rows = x.numel() // max(1, in_features) // (1 if x_dim is None else max(1, x.shape[x_dim]))
    return rows * (in_features + out_features) <= RANK1_FACTOR_MAX_RATIO * in_features * out_features


def _rank1_linear(x: Tensor, x_dim: int | None, weight: Tensor, r: Tensor, s: Tensor, b: Tensor | None) -> Tensor:
    """``F.linear(x_k, W * outer(r_k, s_k), b_k)`` for every sample ``k`` at the factor level: ``x``
    shared (``x_dim`` None) or batched at ``x_dim``, ``W`` ``(out, in)``, ``r`` ``(S, out)``, ``s``
    ``(S, in)``, ``b`` ``(S, out)``, shared ``(out,)`` or None -> ``(S, *lead, out)``. Autograd
    differentiates through ``W``, ``r``, ``s`` directly."""
    n, (o, i) = r.shape[0], weight.shape
    if x_dim is None:
        lead, xs = x.shape[:-1], x.reshape(1, -1, i)
    else:
        xm = x.movedim(x_dim, 0)
        lead, xs = xm.shape[1:-1], xm.reshape(n, -1, i)
    h = F.linear(xs * s.unsqueeze(1), weight)  # (S, M, out): one GEMM over S x M rows
    rr = r.unsqueeze(1)
    if b is None:
        out = h * rr
    else:
        out = torch.addcmul(b.unsqueeze(1) if b.dim() == 2 else b, h, rr)
    return out.reshape(n, *lead, o)


class PointModelError(RuntimeError):
    """The error the point model raises for one sample's inputs (raised inside the vmapped call,
    where PyTorch's batched op would word it for the samples' shapes): the user's error, so the
    sampler neither retries the call sample by sample nor blames vmap."""


def _check_linear_shapes(x: Tensor, weight: Tensor) -> None:
    """PyTorch's own error for ``F.linear(x, weight)`` of one sample's shapes, where they do not fit:
    the batched product would say "Expected size for first two dimensions of batch2 tensor ..."
    with the samples' shapes, where the point model says "mat1 and mat2 shapes cannot be
    multiplied (5x7 and 4x3)". Checked on zero-stride stand-ins: nothing is computed."""
    if x.dim() == 0 or weight.dim() == 0 or x.shape[-1] != weight.shape[-1]:
        try:
            F.linear(x.new_empty(()).expand(x.shape), weight.new_empty(()).expand(weight.shape))
        except RuntimeError as exc:
            raise PointModelError(str(exc)) from None


def _linear_forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """The forward of :class:`_BatchedLinear` and :class:`_DrawnLinear`: the products and the bias
    addition PyTorch's own rule computes (the same values, bit for bit, as the compiled path, which
    keeps F.linear). Records on ``ctx`` whether ``x`` is shared and the bias's dimensions."""
    out = torch.matmul(x, w.transpose(1, 2))  # (S, N, out); a shared x is broadcast
    if out._base is not None:  # never a view of an internal tensor (callers modify it in place)
        out = out.clone()
    if b is not None:
        out.add_(b.unsqueeze(-2))
    ctx.shared = x.dim() == 2
    ctx.bias_dim = None if b is None else b.dim()
    return out


def _shared_rows(g: Tensor) -> Tensor:
    """The output gradient ``g`` ``(S, N, out)`` of a shared ``x`` as ``(N, S * out)``."""
    return g.transpose(0, 1).reshape(g.shape[1], g.shape[0] * g.shape[2])


def _input_bias_grads(ctx: Any, g: Tensor, w: Tensor | None, gp: Tensor | None
                      ) -> tuple[Tensor | None, Tensor | None]:
    """``x``'s and the bias's gradients of a per-sample linear layer (:func:`_linear_forward`'s
    ``ctx``), ``g`` ``(S, N, out)``, ``w`` ``(S, out, in)`` (None where ``x`` needs no gradient).
    ``gp``: :func:`_shared_rows` of ``g`` where the caller made it (a shared ``x``), else None. The
    bias gradient sums ``gp`` over its rows where given, else ``g`` over its ``N``: the two sums
    can differ in the last bits, and each class keeps the one it has always computed."""
    s, o = g.shape[0], g.shape[2]
    gx = gb = None
    if ctx.needs_input_grad[0]:
        if ctx.shared:
            gx = (_shared_rows(g) if gp is None else gp) @ w.reshape(s * o, w.shape[2])
        else:
            gx = torch.bmm(g, w)
    if ctx.bias_dim is not None and ctx.needs_input_grad[2]:
        gb = g.sum(1) if gp is None else gp.sum(0).view(s, o)
        if ctx.bias_dim == 1:  # a bias shared by the samples
            gb = gb.sum(0)
    return gx, gb


class _BatchedLinear(torch.autograd.Function):
    """``S`` linear maps at once: ``x`` ``(S, N, in)`` or shared ``(N, in)``, ``w`` ``(S, out, in)``,
    bias ``(S, out)``, shared ``(out,)`` or None -> ``(S, N, out)``. Backward returns ``w``'s
    gradient contiguous ``(S, out, in)``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        out = _linear_forward(ctx, x, w, b)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w if ctx.needs_input_grad[0] else None)
        ctx.shape = w.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, w = ctx.saved_tensors
        s, o, i = ctx.shape
        gp = _shared_rows(g) if ctx.shared else None  # x (N, in), g (S, N, out)
        gx, gb = _input_bias_grads(ctx, g, w, gp)
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (gp.T @ x).view(s, o, i) if gp is not None else torch.bmm(g.transpose(1, 2), x)
        return gx, gw, gb


class _DrawnLinear(torch.autograd.Function):
    """:class:`_BatchedLinear` for a weight that is a training draw of mean-field samples
    (``_normal.drawn_sample``): the same forward, but backward returns the gradients of the draw's
    ``mean`` and ``rho`` (given as inputs) instead of the ``(S, out, in)`` weight gradient, whose
    blocks of rows it makes one GEMM at a time while the draw's sums over samples are in cache
    (:func:`bayesify._normal.weight_grads_by_rows`). The per-sample gradient is never held: for the
    MLP benchmark's 1200 x 1200 layer (10 samples x 128, one thread) its weight gradient and the
    draw's sums took 66 ms as ``bmm`` into fresh memory + the draw's backward, 36 ms here. The
    weight itself gets no gradient from this node (the draw's log-density terms still reach it)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, mean: Tensor, rho: Tensor, drawn: Any) -> Tensor:
        out = _linear_forward(ctx, x, w, b)  # as _BatchedLinear: the same values, bit for bit
        params = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        # Only for the parameters' gradients, w as a detached alias: the memory the draw keeps for its own
        # backward anyway, not the sample tensor itself (as _BatchedLinear, which keeps it for gx only)
        keep = w if ctx.needs_input_grad[0] else w.detach() if params else None
        ctx.save_for_backward(x if params else None, keep)
        ctx.drawn = drawn
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        gx, gb = _input_bias_grads(ctx, g, w, None)
        g_mean = g_rho = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            shared = ctx.shared

            def rows_grad(k: int, rows: slice, out: Tensor) -> Tensor:
                return torch.mm(g[k, :, rows].T, x if shared else x[k], out=out)

            g_mean, g_rho = weight_grads_by_rows(ctx.drawn, w, rows_grad)
            g_mean = g_mean if ctx.needs_input_grad[3] else None
            g_rho = g_rho if ctx.needs_input_grad[4] else None
        return gx, None, gb, g_mean, g_rho, None


#: The fixed rule, used while :data:`bayesify.backends.autotune` is off: per-sample convolutions
#: with at most this many output positions (``Ho * Wo``) run as one batched GEMM over unfolded
#: inputs. Tuned on one CPU (ResNet-18's 3x3 512-channel convolutions on 1x1 / 2x2 maps, a 32x32
#: input, 10 samples x batch 32, 2 threads: the weight gradient of the grouped convolution vmap
#: runs took 680 ms, the GEMM 92-99 ms), and there only: on another 2-core AMD EPYC with the same
#: torch the point model with these GEMMs was 1.42x slower (issue 18). Hence the measurement.
GEMM_MAX_POSITIONS = 4

#: With autotune on, convolutions with at most this many output positions are candidates for the
#: GEMM (timed against PyTorch's own rule on first use); larger maps always get PyTorch's rule.
TUNE_MAX_POSITIONS = 64

#: ... and only where the unfolded inputs of all samples take at most this many bytes (the
#: GEMM's extra memory: ``S x C kh kw x N Ho Wo`` elements).
TUNE_MAX_COLUMN_BYTES = 256 * 2**20

#: The kernels autotune times for a small-map per-sample ``conv2d``: ``"conv"`` (PyTorch's vmap
#: rule, a grouped convolution), ``"gemm"`` (one batched GEMM over the unfolded inputs), ``"loop"``
#: (one plain ``F.conv2d`` per sample; per-sample weights only). ``"conv"`` always stays in.
CONV2D_CANDIDATES = ("conv", "gemm", "loop")


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def conv2d_by_gemm(x: Tensor, weight_shape: tuple[int, ...], stride: Any, padding: Any, dilation: Any,
                   groups: int, max_positions: int | None = None) -> bool:
    """Whether a per-sample ``conv2d`` of ``x`` (one sample's input) may run as a GEMM: with at most
    ``max_positions`` output positions (default: :data:`TUNE_MAX_POSITIONS` while autotune is on,
    where the vmap rule then times both kernels, else :data:`GEMM_MAX_POSITIONS`)."""
    if groups != 1 or isinstance(padding, str) or x.dim() not in (3, 4):
        return False
    if max_positions is None:
        max_positions = TUNE_MAX_POSITIONS if backends.autotune else GEMM_MAX_POSITIONS
    ho, wo = _output_size(x.shape[-2:], weight_shape[-2:], _pair(stride), _pair(padding), _pair(dilation))
    return ho * wo <= max_positions


def _output_size(hw: Any, kernel: Any, stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int]) -> tuple[int, int]:
    """``(Ho, Wo)`` of a convolution of an ``hw`` map."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // st + 1  # type: ignore[return-value]
                 for n, k, st, p, d in zip(hw, kernel, stride, padding, dilation))


def conv2d_gemm(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Any, padding: Any, dilation: Any) -> Tensor:
    """``F.conv2d(x, weight, bias, ...)`` (``x`` ``(N, C, H, W)``, ``groups=1``) as one GEMM over
    the unfolded input: what the vmap rule below runs for one weight over every sample's batch
    (and ``benchmarks/bench.py``'s point-model reference with the same kernels)."""
    return _gemm_function().apply(x, weight[None], bias, _pair(stride), _pair(padding), _pair(dilation))[0]


def kernels_apply(x: Tensor) -> bool:
    """Whether this module's kernels may replace PyTorch's rules for ``x``: not while compiling
    (Dynamo traces PyTorch's own rules) and not under autocast (inside a custom Function's vmap
    rule autocast's casts are lost: a following convolution then saw bfloat16 inputs with
    float32 weights)."""
    return not torch.compiler.is_compiling() and not torch.is_autocast_enabled(x.device.type)


class SampleConv2d(torch.autograd.Function):
    """``F.conv2d`` (``groups=1``) whose vmap rule computes convolutions with few output
    positions as one (batched) GEMM over unfolded inputs (see :data:`GEMM_MAX_POSITIONS`):
    per-sample weights, or one weight over every sample's batch (local reparameterisation);
    other convolutions get PyTorch's own rule. Outside vmap it is ``F.conv2d``."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Any, padding: Any, dilation: Any
                ) -> Tensor:
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, bias, stride, padding, dilation = inputs
        ctx.save_for_backward(x, weight)
        ctx.args = (None if bias is None else [bias.shape[0]], _pair(stride), _pair(padding), _pair(dilation))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        bias_sizes, stride, padding, dilation = ctx.args
        unbatched = x.dim() == 3
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g.unsqueeze(0) if unbatched else g, x.unsqueeze(0) if unbatched else x, weight, bias_sizes,
            stride, padding, dilation, False, [0, 0], 1,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias_sizes is not None and ctx.needs_input_grad[2]])
        if gx is not None and unbatched:
            gx = gx.squeeze(0)
        return gx, gw, gb, None, None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: Tensor, weight: Tensor, bias: Tensor | None, stride: Any,
             padding: Any, dilation: Any) -> tuple[Tensor, int]:
        x_dim, w_dim, b_dim = in_dims[:3]
        one = x if x_dim is None else x.select(x_dim, 0)  # one sample's input
        w1 = weight if w_dim is None else weight.select(w_dim, 0)
        geometry = (_pair(stride), _pair(padding), _pair(dilation))

        def conv(a: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            return F.conv2d(a, w, b, *geometry)

        if not conv2d_by_gemm(one, w1.shape, stride, padding, dilation, 1) or (w_dim is None and (
                x_dim is None or b_dim is not None)):
            return torch.vmap(conv, in_dims=in_dims[:3])(x, weight, bias), 0
        xs = x if x_dim is None else x.movedim(x_dim, 0)
        # (the tensor itself where its samples come first: a training draw is recognised by identity)
        w = weight if w_dim in (None, 0) else weight.movedim(w_dim, 0)
        b = bias if bias is None or b_dim is None else bias.movedim(b_dim, 0)
        if TRIM_PADDING_TAPS:
            w, geometry = trim_padding_taps(one.shape[-2:], w, geometry)
        kernel = conv2d_kernel(xs, x_dim is None, w, w_dim is None, b, b_dim is None, geometry, info.batch_size)
        if kernel == "loop":
            return _conv2d_loop_over_samples(xs, w, b, x_dim is None, b_dim is None, geometry), 0
        if kernel != "gemm":
            dims = tuple(None if d is None else 0 for d in (x_dim, w_dim, b_dim))
            return torch.vmap(lambda p, q, r: F.conv2d(p, q, r, *geometry), in_dims=dims)(xs, w, b), 0
        return _conv2d_gemm_over_samples(xs, w, b, w_dim is None, one.dim() == 3, geometry), 0


#: Whether the small-map per-sample kernels drop the kernel taps that only ever meet the zero
#: padding (:func:`trim_padding_taps`): a 3x3 convolution of a 1x1 map (padding 1) is its centre tap.
TRIM_PADDING_TAPS = True

#: ... where that keeps at most 1 / this of the taps: the trimmed weight is a strided view that
#: the kernels copy, reading every drawn tap's cache line. Measured on an AVX-512 Xeon, one thread,
#: ResNet-18 eval, 10 samples x 32: 3x3 -> 1x1 (512 channels, 1x1 map) 35 -> 18 ms a layer with
#: the copy; 3x3 -> 2x2 (256 -> 512, stride 2 on a 2x2 map) 14 -> 52 ms (the copy 49 ms).
TRIM_MAX_KEPT_INVERSE = 4


def _used_taps(n: int, k: int, stride: int, padding: int, dilation: int) -> tuple[int, int] | None:
    """First and last tap (of ``k``) of a convolution along one dim of size ``n`` that meets real
    input (not padding) at some output position, or None where the trim would change the geometry."""
    out = (n + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    used = [t for t in range(k) if any(0 <= i * stride - padding + t * dilation < n for i in range(out))]
    if not used:
        return None
    lo, hi = used[0], used[-1]
    pad = padding - lo * dilation
    if pad < 0 or (n + 2 * pad - dilation * (hi - lo) - 1) // stride + 1 != out:
        return None
    return lo, hi


def trim_padding_taps(hw: Any, w: Tensor, geometry: tuple) -> tuple[Tensor, tuple]:
    """``(w, geometry)`` of a convolution of an ``hw`` map without the kernel taps that meet only the
    zero padding (where at most 1 / :data:`TRIM_MAX_KEPT_INVERSE` of the taps remain, else unchanged): ``w[..., r0:r1, c0:c1]`` (a view; its gradient is 0 at the dropped taps, as the
    full kernel's is) with the padding reduced to match. The same outputs up to the order of
    summation; unchanged where nothing can be dropped."""
    stride, padding, dilation = geometry
    spans = [_used_taps(n, k, st, p, d) for n, k, st, p, d in zip(hw, w.shape[-2:], stride, padding, dilation)]
    spans = [(0, k - 1) if span is None else span for span, k in zip(spans, w.shape[-2:])]
    kept = (spans[0][1] - spans[0][0] + 1) * (spans[1][1] - spans[1][0] + 1)
    if kept * TRIM_MAX_KEPT_INVERSE > w.shape[-2] * w.shape[-1]:
        return w, geometry
    padding = tuple(p - lo * d for p, (lo, _), d in zip(padding, spans, dilation))
    if not TRIM_BY_FUNCTION:  # the previous path: a strided view, autograd's two slice backwards
        (r0, r1), (c0, c1) = spans
        return w[..., r0:r1 + 1, c0:c1 + 1], (stride, padding, dilation)
    drawn = drawn_sample(w) if DRAWN_KEPT_TAPS and torch.is_grad_enabled() else None
    if drawn is not None and w.is_contiguous() and w.dtype in (torch.float32, torch.float64):
        return _DrawnKeptTaps.apply(w, drawn.mean, drawn.rho, drawn, tuple(spans)), (stride, padding, dilation)
    return _KeptTaps.apply(w, tuple(spans)), (stride, padding, dilation)


#: Whether :func:`trim_padding_taps` takes the kept taps by :class:`_KeptTaps` (one contiguous copy;
#: backward writes their gradient into one zeroed full-kernel gradient) or, as before, as the view
#: ``w[..., r0:r1, c0:c1]`` (autograd's slice backward: a zeroed full-size tensor per sliced dim,
#: each copied into, and every kernel call reading the strided view again). The A/B switch.
TRIM_BY_FUNCTION = True


class _KeptTaps(torch.autograd.Function):
    """``w[..., r0:r1 + 1, c0:c1 + 1]`` of a kernel ``w`` ``(..., kh, kw)`` as a contiguous tensor
    (``spans`` ``((r0, r1), (c0, c1))``); its backward writes the incoming gradient into one zeroed
    full-kernel gradient (``F.pad``: one allocation, zeros and values written in one pass). Autograd's
    slices made two full-size zeroed tensors for the two sliced dims and copied twice, and the kernels
    read the strided view once per use (forward and backward, per sample): ResNet-18's three 3x3
    512-channel convolutions on 1x1 maps, 10 samples, 32x32 inputs: see docs/performance.md."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, spans: tuple) -> Tensor:
        (r0, r1), (c0, c1) = spans
        kh, kw = w.shape[-2:]
        ctx.pad = (c0, kw - 1 - c1, r0, kh - 1 - r1)
        return w[..., r0:r1 + 1, c0:c1 + 1].clone(memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        return F.pad(g, ctx.pad), None


#: Where the trimmed kernel is a training draw of mean-field samples (``_normal.drawn_sample``), its
#: kept taps come from :class:`_DrawnKeptTaps`, whose backward hands the draw's ``mean`` and ``rho`` their
#: gradients for the kept taps directly (as :class:`_DrawnLinear` does for linear layers): the dropped
#: taps' weight gradient is zero, so neither the ``(S, *kernel)`` zero-filled gradient nor the draw's
#: per-sample passes over the dropped taps are made; their log-density terms stay with the draw's own
#: backward (closed form). False: :class:`_KeptTaps` and the draw's backward over every tap (the A/B partner).
DRAWN_KEPT_TAPS = True


class _DrawnKeptTaps(torch.autograd.Function):
    """:class:`_KeptTaps` of a kernel ``w`` that is a training draw (recorded as ``drawn``, with its
    ``mean`` and ``rho`` as inputs): the same forward (a contiguous copy of the kept taps), but backward
    returns the gradients of ``mean`` and ``rho`` from the kept taps' per-sample gradient ``g``:
    ``dL/dmean = sum_s g_s`` and ``dL/drho = sum_s g_s eps_s * sigmoid(rho)`` at the kept taps, with
    ``eps_s = (w_s - mean) / std`` recovered from the kept taps of the sample (this node's own output,
    kept: the layer keeps it anyway; nothing of ``w`` is held, also with ``recompute_samples``), zero at
    the dropped ones. ``w`` itself gets no gradient from this node (the draw's log-density terms still
    reach the draw's backward, which then makes no pass over the samples)."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, mean: Tensor, rho: Tensor, drawn: Any, spans: tuple) -> Tensor:
        (r0, r1), (c0, c1) = spans
        kh, kw = w.shape[-2:]
        out = w[..., r0:r1 + 1, c0:c1 + 1].clone(memory_format=torch.contiguous_format)
        ctx.crop = (Ellipsis, slice(r0, r1 + 1), slice(c0, c1 + 1))
        ctx.pad = (c0, kw - 1 - c1, r0, kh - 1 - r1)  # as _KeptTaps: the kept taps' gradient padded back
        ctx.drawn = drawn
        ctx.save_for_backward(out if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] else None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        (wk,) = ctx.saved_tensors
        if wk is None:
            return None, None, None, None, None
        d, crop = ctx.drawn, ctx.crop
        mean, rho = d.mean.detach(), d.rho.detach()
        # contiguous copies: softplus / sigmoid of a strided tensor take the scalar path, whose last bits
        # differ from the vectorised one the draw computed std with (recompute_samples: no kept std)
        m, r = mean[crop].contiguous(), rho[crop].contiguous()
        sd = F.softplus(r) if d.kept is None else d.kept.view(mean.shape)[crop]
        # gm = sum_s g_s, acc = sum_s g_s w_s in sample order (as the draw's backward sums them)
        gm = g[0].clone(memory_format=torch.contiguous_format)
        acc = torch.mul(g[0], wk[0])
        for s in range(1, g.shape[0]):
            gm.add_(g[s])
            acc.addcmul_(g[s], wk[s])
        # sum_s g_s eps_s = (acc - mean * gm) / std; dL/drho = that * sigmoid(rho)
        acc.addcmul_(gm, m, value=-1).div_(sd).mul_(torch.sigmoid(r))
        g_mean = F.pad(gm, ctx.pad) if ctx.needs_input_grad[1] else None
        g_rho = F.pad(acc, ctx.pad) if ctx.needs_input_grad[2] else None
        return None, g_mean, g_rho, None, None


def _conv2d_loop_over_samples(xs: Tensor, w: Tensor, b: Tensor | None, x_shared: bool, b_shared: bool,
                              geometry: tuple) -> Tensor:
    """The loop kernel on physical tensors, samples first (per-sample ``w`` ``(S, O, C, kh, kw)``
    only): PyTorch's plain ``F.conv2d`` once per sample, on that sample's input batch (or the shared
    input) with that sample's weight, stacked -> ``(S, [N,] O, Ho, Wo)``. Each call is the point
    model's own kernel at batch ``N``; differentiable by plain autograd (``unbind`` / ``stack``)."""
    s = w.shape[0]
    inputs = [xs] * s if x_shared else xs.unbind(0)
    biases = [None] * s if b is None else [b] * s if b_shared else b.unbind(0)
    return torch.stack([F.conv2d(a, q, r, *geometry) for a, q, r in zip(inputs, w.unbind(0), biases)])


def _conv2d_gemm_over_samples(xs: Tensor, w: Tensor, b: Tensor | None, w_shared: bool, unbatched: bool,
                              geometry: tuple) -> Tensor:
    """The GEMM kernel on physical tensors, samples first: ``xs`` ``(S, [N,] C, H, W)`` (or one
    sample's ``([N,] C, H, W)`` shared by all, with per-sample ``w`` only), ``w`` ``(S, O, C, kh, kw)``
    or ``w_shared`` ``(O, C, kh, kw)`` -> ``(S, [N,] O, Ho, Wo)``."""
    if w_shared:  # one weight for every sample (local reparameterisation): samples x batch
        n = xs.shape[0] if unbatched else xs.shape[0] * xs.shape[1]
        out = conv2d_gemm(xs.reshape(n, *xs.shape[-3:]), w, b, *geometry)
        return out.view(*xs.shape[:-3], *out.shape[1:])
    if unbatched:
        xs = xs.unsqueeze(-4)
    out = _gemm_function().apply(xs, w, b, *geometry)
    return out.squeeze(1) if unbatched else out


def conv2d_kernel(xs: Tensor, x_shared: bool, w: Tensor, w_shared: bool, b: Tensor | None, b_shared: bool,
                  geometry: tuple, samples: int) -> str:
    """``"gemm"``, ``"conv"`` (PyTorch's own vmap rule: a grouped convolution) or ``"loop"`` (per-sample
    weights only: one plain convolution per sample, :func:`_conv2d_loop_over_samples`) for a per-sample
    ``conv2d`` of these physical tensors (samples first, as in :func:`_conv2d_gemm_over_samples`):
    the fixed rule while autotune is off, else the fastest candidate, timed once per process for
    these shapes, dtype, device and the gradients needed (:mod:`bayesify.backends`)."""
    unbatched = xs.dim() - (not x_shared) == 3
    one_shape = xs.shape[-3:]
    ho, wo = _output_size(one_shape[-2:], w.shape[-2:], *geometry)
    fixed = "gemm" if ho * wo <= GEMM_MAX_POSITIONS else "conv"
    key = _conv2d_key(xs, x_shared, w, w_shared, b, b_shared, geometry, samples)
    if not backends.autotune:
        return backends.choose(key, {}, fixed, xs.device)  # the fixed rule (logged once per key)
    if torch._C._current_autograd_node() is not None:
        # in a backward (recompute_samples): no trial there (a CUDA backward would wait on it)
        return backends.cached(key, fixed)
    rows = xs.numel() // max(1, one_shape.numel()) * (1 if not x_shared else samples)
    if (w.shape[-3] * w.shape[-2] * w.shape[-1]) * rows * ho * wo * xs.element_size() > TUNE_MAX_COLUMN_BYTES:
        return "conv"  # the unfolded inputs would take too much memory
    grads = key[-1]
    x_dim, w_dim = None if x_shared else 0, None if w_shared else 0
    b_dim = None if b is None or b_shared else 0
    shapes, dtype, device = (tuple(xs.shape), tuple(w.shape), None if b is None else tuple(b.shape)), xs.dtype, xs.device

    def trial(kernel: Callable[[Tensor, Tensor, Tensor | None], Tensor]) -> Callable[[], Callable[[], Any]]:
        def make() -> Callable[[], Any]:
            g = torch.Generator(device).manual_seed(0)
            leaves = [None if s is None else torch.randn(s, dtype=dtype, device=device, generator=g)
                      .requires_grad_(need) for s, need in zip(shapes, grads)]
            wanted = [t for t, need in zip(leaves, grads) if t is not None and need]

            def run() -> None:
                with torch.set_grad_enabled(bool(wanted)):
                    out = kernel(*leaves)
                    if wanted:
                        torch.autograd.grad(out, wanted, torch.ones_like(out))

            return run

        return make

    candidates = {
        "conv": trial(lambda a, ww, bb: torch.vmap(lambda p, q, r: F.conv2d(p, q, r, *geometry),
                                                   in_dims=(x_dim, w_dim, b_dim))(a, ww, bb)),
        "gemm": trial(lambda a, ww, bb: _conv2d_gemm_over_samples(a, ww, bb, w_shared, unbatched, geometry)),
    }
    if "gemm" not in CONV2D_CANDIDATES:
        del candidates["gemm"]
    if not w_shared and "loop" in CONV2D_CANDIDATES:  # a shared weight: PyTorch's rule is one plain convolution
        candidates["loop"] = trial(lambda a, ww, bb: _conv2d_loop_over_samples(a, ww, bb, x_shared, b_shared,
                                                                               geometry))
    return backends.choose(key, candidates, fixed, device)


def _conv2d_key(xs: Tensor, x_shared: bool, w: Tensor, w_shared: bool, b: Tensor | None, b_shared: bool,
                geometry: tuple, samples: int) -> tuple:
    """What a conv2d kernel choice is cached under: shapes and layout, geometry, sample count,
    dtype, device and which of input, weight, bias need a gradient (none under ``no_grad``)."""
    grad = torch.is_grad_enabled()
    grads = tuple(t is not None and grad and t.requires_grad for t in (xs, w, b))
    bias = None if b is None else ("shared" if b_shared else "per sample")
    return ("conv2d", f"x{tuple(xs.shape)}{' shared' if x_shared else ''}",
            f"w{tuple(w.shape)}{' shared' if w_shared else ''}", f"bias {bias}", f"stride {geometry[0]}",
            f"padding {geometry[1]}", f"dilation {geometry[2]}", f"S={samples}", str(xs.dtype), str(xs.device),
            grads)


class _BatchedConv2dGemm(torch.autograd.Function):
    """``S`` convolutions as GEMMs: ``x`` ``(S, N, C, H, W)`` or shared ``(N, C, H, W)``, ``w``
    ``(S, O, C, kh, kw)``, bias ``(S, O)``, shared ``(O,)`` or None -> ``(S, N, O, Ho, Wo)``.
    Keeps ``x`` (not its unfolded columns) for backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
        s, o = w.shape[:2]
        shared = x.dim() == 4
        n, hw = x.shape[-4], x.shape[-2:]
        cols, (ho, wo) = _columns(x, w.shape, stride, padding, dilation)  # (K, N L) or (S, K, N L)
        if shared:
            out = (w.reshape(s * o, -1) @ cols).view(s, o, n, ho * wo)
        else:
            out = torch.bmm(w.reshape(s, o, -1), cols).view(s, o, n, ho * wo)
        out = out.transpose(1, 2).reshape(s, n, o, ho, wo)
        # A fresh tensor, never a view of the product (callers modify it in place: ReLU(inplace=True))
        out = out.clone() if b is None else out + (b[:, None, :, None, None] if b.dim() == 2 else b[:, None, None])
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w if ctx.needs_input_grad[0] else None)
        ctx.geometry = (tuple(x.shape), tuple(w.shape), stride, padding, dilation, shared, n, tuple(hw))
        ctx.bias_dim = None if b is None else b.dim()
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        x_shape, w_shape, stride, padding, dilation, shared, n, hw = ctx.geometry
        s, o, c, kh, kw = w_shape
        gg = g.reshape(s, n, o, -1).transpose(1, 2).reshape(s, o, -1)  # (S, O, N L)
        gx = gw = gb = None
        if ctx.needs_input_grad[1]:
            cols, _ = _columns(x, w_shape, stride, padding, dilation)
            if shared:
                gw = (gg.reshape(s * o, -1) @ cols.T).view(w_shape)
            else:
                gw = torch.bmm(gg, cols.transpose(1, 2)).view(w_shape)
        if ctx.needs_input_grad[0]:
            k = c * kh * kw
            if shared:
                dcols = (w.reshape(s * o, k).T @ gg.reshape(s * o, -1)).view(k, n, -1).transpose(0, 1)
            else:
                dcols = torch.bmm(w.reshape(s, o, k).transpose(1, 2), gg).view(s, k, n, -1).transpose(1, 2)
            gx = F.fold(dcols.reshape(-1, k, dcols.shape[-1]), hw, (kh, kw), dilation=dilation, padding=padding,
                        stride=stride).view(x_shape)
        if ctx.bias_dim is not None and ctx.needs_input_grad[2]:
            gb = gg.sum(2)
            if ctx.bias_dim == 1:
                gb = gb.sum(0)
        return gx, gw, gb, None, None, None


#: Whether the GEMM kernel unfolds its inputs as rows ``(S, N Ho Wo, C kh kw)`` (one strided copy of
#: the padded input; :class:`_BatchedConv2dGemmRows`) or, as before, as columns ``(S, C kh kw, N Ho Wo)``
#: (``F.unfold`` per image, then a transposing copy; :class:`_BatchedConv2dGemm`). The A/B switch.
GEMM_ROWS = True


def _gemm_function() -> type[torch.autograd.Function]:
    return _BatchedConv2dGemmRows if GEMM_ROWS else _BatchedConv2dGemm


def _taps(hw: Any, kernel: Any, stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
          out: tuple[int, int]) -> list[tuple[int, int, slice, slice, slice, slice]]:
    """For each kernel tap ``(i, j)`` that meets real input somewhere: the output positions where it
    does (row and column slices of the ``(Ho, Wo)`` map) and the input positions it meets there."""
    spans = []
    for n, k, st, p, d, o in zip(hw, kernel, stride, padding, dilation, out):
        per_tap = []
        for t in range(k):
            hits = [a for a in range(o) if 0 <= a * st - p + t * d < n]
            if hits:
                first = hits[0] * st - p + t * d
                per_tap.append((t, slice(hits[0], hits[-1] + 1), slice(first, first + (hits[-1] - hits[0]) * st + 1, st)))
        spans.append(per_tap)
    return [(i, j, oi, oj, xi, xj) for i, oi, xi in spans[0] for j, oj, xj in spans[1]]


def _rows(x: Tensor, w_shape: tuple[int, ...], stride: tuple[int, int], padding: tuple[int, int],
          dilation: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """The unfolded input as GEMM rows: ``(N L, K)`` for a shared ``x`` ``(N, C, H, W)``, else
    ``(S, N L, K)`` (``K = C kh kw`` in ``(c, i, j)`` order, as the weight's ``(O, K)`` view; ``L = Ho Wo``),
    and ``(Ho, Wo)``, for ``x`` in any memory layout. Without padding a strided view of ``x`` (one copy,
    or none); with padding zeros and one copy per kernel tap of the input it meets. ``F.unfold`` loops
    per image and channel and its ``(N, K, L)`` output needs a transposing copy; padding the input
    first costs a copy of the padded map (ResNet-18's 256-channel 2x2 maps, 10 x 32 images, one
    thread: unfold + transpose 15.6 ms, pad + strided view 9.5 ms, per tap 3.7 ms)."""
    c, kh, kw = w_shape[-3:]
    h, wd = x.shape[-2:]
    ho, wo = _output_size((h, wd), (kh, kw), stride, padding, dilation)
    n_rows = ho * wo * x.shape[-4]
    if not any(padding):
        *lead, sc, sh, sw = x.stride()
        view = x.as_strided((*x.shape[:-3], ho, wo, c, kh, kw),
                            (*lead, sh * stride[0], sw * stride[1], sc, sh * dilation[0], sw * dilation[1]),
                            x.storage_offset())
    else:
        view = x.new_zeros(*x.shape[:-3], ho, wo, c, kh, kw)
        xt = x.movedim(-3, -1)  # (..., H, W, C)
        for i, j, oi, oj, xi, xj in _taps((h, wd), (kh, kw), stride, padding, dilation, (ho, wo)):
            view[..., oi, oj, :, i, j] = xt[..., xi, xj, :]
    return view.reshape(n_rows, c * kh * kw) if x.dim() == 4 else view.reshape(x.shape[0], n_rows, -1), (ho, wo)


def _fold_rows(drows: Tensor, x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride: tuple[int, int],
               padding: tuple[int, int], dilation: tuple[int, int], out: tuple[int, int]) -> Tensor:
    """The adjoint of :func:`_rows`: the rows' gradient ``drows`` summed back onto the input
    ``x_shape``, one strided add per kernel tap (``F.fold``: col2im per image after a transposing
    copy; ResNet-18's 2x2 maps 11.5 ms against 2.9 ms)."""
    c, kh, kw = w_shape[-3:]
    d = drows.view(*x_shape[:-3], *out, c, kh, kw)
    gx = drows.new_zeros(x_shape)
    gt = gx.movedim(-3, -1)
    for i, j, oi, oj, xi, xj in _taps(x_shape[-2:], (kh, kw), stride, padding, dilation, out):
        gt[..., xi, xj, :] += d[..., oi, oj, :, i, j]
    return gx


class _BatchedConv2dGemmRows(torch.autograd.Function):
    """:class:`_BatchedConv2dGemm` over the unfolded input as rows (:func:`_rows`): the products
    ``rows @ w^T`` (forward), ``g^T @ rows`` (weight gradient) and ``g @ w`` (the rows' gradient, folded
    back by :func:`_fold_rows`) with ``g`` ``(S, N L, O)``. Keeps the unfolded rows (not ``x``) for backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
        s, o = w.shape[:2]
        shared = x.dim() == 4
        n, hw = x.shape[-4], x.shape[-2:]
        rows, (ho, wo) = _rows(x, w.shape, stride, padding, dilation)  # (N L, K) or (S, N L, K)
        if shared:
            out = (rows @ w.reshape(s * o, -1).T).view(n, ho, wo, s, o).permute(3, 0, 4, 1, 2)
        else:
            out = torch.bmm(rows, w.reshape(s, o, -1).transpose(1, 2)).view(s, n, ho, wo, o).permute(0, 1, 4, 2, 3)
        # A fresh contiguous tensor, never a view of the product (callers modify it in place)
        out = out.contiguous()
        if out._base is not None:  # already contiguous (one output position): still the product's view
            out = out.clone()
        if b is not None:
            out.add_(b[:, None, :, None, None] if b.dim() == 2 else b[:, None, None])
        # The rows, not x, for the weight gradient: unfolding again in backward cost as much as the
        # forward's copy, for memory of at most kh kw Ho Wo / (H W) times x's (these maps are small)
        ctx.save_for_backward(rows if ctx.needs_input_grad[1] else None, w if ctx.needs_input_grad[0] else None)
        ctx.geometry = (tuple(x.shape), tuple(w.shape), stride, padding, dilation, shared, n, tuple(hw), (ho, wo))
        ctx.bias_dim = None if b is None else b.dim()
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        rows, w = ctx.saved_tensors
        x_shape, w_shape, stride, padding, dilation, shared, n, hw, (ho, wo) = ctx.geometry
        s, o, c, kh, kw = w_shape
        k, L = c * kh * kw, ho * wo
        gr = g.view(s, n, o, L).transpose(2, 3).reshape(s, n * L, o)  # (S, N L, O)
        gx = gw = gb = None
        if ctx.needs_input_grad[1]:
            if shared:  # (S O, N L) @ (N L, K)
                gw = (gr.transpose(0, 1).reshape(n * L, s * o).T @ rows).view(w_shape)
            else:
                gw = torch.bmm(gr.transpose(1, 2), rows).view(w_shape)
        if ctx.needs_input_grad[0]:
            if shared:  # (N L, S O) @ (S O, K)
                drows = gr.transpose(0, 1).reshape(n * L, s * o) @ w.reshape(s * o, k)
            else:
                drows = torch.bmm(gr, w.reshape(s, o, k))  # (S, N L, K)
            gx = _fold_rows(drows, x_shape, w_shape, stride, padding, dilation, (ho, wo))
        if ctx.bias_dim is not None and ctx.needs_input_grad[2]:
            gb = gr.sum(1)
            if ctx.bias_dim == 1:
                gb = gb.sum(0)
        return gx, gw, gb, None, None, None


def _columns(x: Tensor, w_shape: tuple[int, ...], stride: tuple[int, int], padding: tuple[int, int],
             dilation: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """The unfolded input as GEMM operand: ``(K, N L)`` for a shared ``x``, else ``(S, K, N L)``
    (``K = C kh kw``, ``L = Ho Wo``), and the output size ``(Ho, Wo)``."""
    c, kh, kw = w_shape[-3:]
    h, wd = x.shape[-2:]
    ho, wo = _output_size((h, wd), (kh, kw), stride, padding, dilation)
    cols = F.unfold(x.reshape(-1, c, h, wd), (kh, kw), dilation=dilation, padding=padding, stride=stride)
    k, L = cols.shape[1:]
    if x.dim() == 4:
        return cols.transpose(0, 1).reshape(k, -1), (ho, wo)
    return cols.view(x.shape[0], x.shape[1], k, L).transpose(1, 2).reshape(x.shape[0], k, -1), (ho, wo)


#: ``F.scaled_dot_product_attention`` (bayesify intercepts it for its vmapped call only, on the
#: calling thread: ``bayesify._vmap_rules``).
SDPA = F.scaled_dot_product_attention


class SampleAttention(torch.autograd.Function):
    """``F.scaled_dot_product_attention`` whose vmap rule folds the samples into the batch:
    PyTorch has no batching rule for the CPU flash-attention kernel and runs it sample by
    sample through its slow fallback (with a "performance drop" warning). MiniLM-shaped
    attention, 10 samples x batch 8, forward + backward, 2 threads: 127 ms through the
    fallback, 77 ms for the point model's single call on the 80 inputs. Only called inside
    vmap with an input batched over the samples (see ``bayesify._vmap_rules``); ``options`` are
    SDPA's keyword arguments as pairs."""

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, options: tuple) -> Tensor:
        raise RuntimeError("bayesify's folded attention runs only inside torch.vmap")

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: tuple, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, options: tuple
             ) -> tuple[Tensor, int]:
        kw = dict(options)
        dims = in_dims[:4]
        one_q = q if dims[0] is None else q.select(dims[0], 0)
        ranks = {t.dim() - (d is not None) for t, d in zip((q, k, v), dims[:3])}
        if (len(ranks) > 1 or one_q.dim() < 3 or (kw.get("dropout_p", 0.0) > 0 and info.randomness != "different")):
            def attend(a: Tensor, b: Tensor, c: Tensor, m: Tensor | None) -> Tensor:
                return SDPA(a, b, c, attn_mask=m, **kw)

            return torch.vmap(attend, in_dims=dims, randomness=info.randomness)(q, k, v, mask), 0
        s = info.batch_size

        def fold(t: Tensor, d: int | None, rank: int) -> Tensor:
            """``t`` (one sample's rank ``rank``) as ``(S * lead, ...)``: samples first, folded
            into its leading dim (expanded where ``t`` is not batched or broadcasts there)."""
            t = t.unsqueeze(0) if d is None else t.movedim(d, 0)
            while t.dim() < rank + 1:  # a mask of lower rank broadcasts from the right
                t = t.unsqueeze(1)
            lead = max(t.shape[1], one_q.shape[0])
            t = t.expand(s, lead, *t.shape[2:])
            return t.reshape(s * lead, *t.shape[2:])

        rank = one_q.dim()
        out = SDPA(fold(q, dims[0], rank), fold(k, dims[1], rank), fold(v, dims[2], rank),
                   attn_mask=None if mask is None else fold(mask, dims[3], rank), **kw)
        return out.view(s, one_q.shape[0], *out.shape[1:]), 0


class SampleBatchNorm(torch.autograd.Function):
    """``torch.batch_norm`` in eval mode (running statistics) whose vmap rule folds the samples
    into the batch: one call, as the point model's on ``S x B`` inputs. PyTorch's batching rule
    normalises without the affine and then multiplies and adds it in two more passes: a
    ResNet-18 stem's BatchNorm (10 samples x 32 x 64 x 16 x 16, one thread) 14.5 ms against
    2.5 ms folded. Only called inside vmap with the input batched and the parameters and
    statistics shared (see ``bayesify._vmap_rules``)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float,
                cudnn: bool) -> Tensor:
        raise RuntimeError("bayesify's folded batch norm runs only inside torch.vmap")

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
             var: Tensor, eps: float, cudnn: bool) -> tuple[Tensor, int]:
        xs = x.movedim(in_dims[0], 0)
        out = torch.batch_norm(xs.flatten(0, 1), weight, bias, mean, var, False, 0.0, eps, cudnn)
        return out.reshape(xs.shape), 0


class SampleBatchNormTrain(torch.autograd.Function):
    """``torch.batch_norm`` in training mode (each sample normalises by its own batch statistics and
    updates its own copy of the running statistics, :func:`bayesify._vmap_rules.batchnorm_state`)
    whose vmap rule is one call of the point model's kernel over ``S x C`` channels: the input as
    ``(N, S C, ...)`` (a view where it is already laid out samples-inside-batch, as PyTorch's grouped
    convolution leaves it), the affine repeated per sample (or per-sample already), the running
    statistics' ``(S, C)`` copies as flat views the kernel updates in place. The output stays in that
    layout (batched at dim 1). PyTorch's batching rule normalises without the affine, applies it in
    further passes in another layout, and its in-place follow-ups (ReLU) cost a ``CopySlices`` in
    backward: ResNet-18's stem BatchNorm (10 samples x 32 x 64 x 16 x 16, forward + backward, one
    thread) 58 ms against 31 ms folded. Only called inside vmap with the input batched (see
    ``bayesify._vmap_rules``); anything else goes through PyTorch's rule."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor | None, var: Tensor | None,
                momentum: float, eps: float, cudnn: bool) -> Tensor:
        raise RuntimeError("bayesify's folded training batch norm runs only inside torch.vmap")

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: Tensor, weight: Tensor | None, bias: Tensor | None,
             mean: Tensor | None, var: Tensor | None, momentum: float, eps: float, cudnn: bool
             ) -> tuple[Tensor, int]:
        s = info.batch_size
        x_dim, w_dim, b_dim, m_dim, v_dim = in_dims[:5]
        stats = []
        for t, d in ((mean, m_dim), (var, v_dim)):
            flat = None if t is None or d is None else t.movedim(d, 0)
            stats.append(flat.view(-1) if flat is not None and flat.is_contiguous() else None)
        if x_dim is None or any(t is not None and f is None for t, f in zip((mean, var), stats)):
            def plain(a: Tensor, q: Tensor | None, r: Tensor | None, m: Tensor | None, v: Tensor | None) -> Tensor:
                return torch.batch_norm(a, q, r, m, v, True, momentum, eps, cudnn)

            return torch.vmap(plain, in_dims=in_dims[:5], randomness=info.randomness)(x, weight, bias, mean, var), 0

        def per_channel(t: Tensor | None, d: int | None) -> Tensor | None:
            if t is None:
                return None
            return t.repeat(s) if d is None else t.movedim(d, 0).reshape(-1)

        xs = x.movedim(x_dim, 1)  # (N, S, C, ...)
        n, c = xs.shape[0], xs.shape[2]
        # a view where the samples already sit inside the batch (PyTorch's grouped convolution leaves
        # them so), else a copy (samples first, as the GEMM kernels leave them; a channels-last copy,
        # faster in the kernel on small maps, measured no gain in the whole ResNet-18 step)
        out = torch.batch_norm(xs.reshape(n, s * c, *xs.shape[3:]), per_channel(weight, w_dim),
                               per_channel(bias, b_dim), stats[0], stats[1], True, momentum, eps, cudnn)
        return out.view(xs.shape), 1
