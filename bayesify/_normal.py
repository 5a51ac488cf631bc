"""Standard-normal noise for weight samples on CPU: block-seeded, threaded, regenerable.

``torch.randn`` on CPU runs on one thread and, for the ``(samples, *shape)`` noise of
a whole network, writes hundreds of MB of freshly allocated (page-faulting) memory.
Here the noise of one tensor is cut into fixed blocks; block ``b`` is drawn by its own
``torch.Generator`` seeded ``seed + b``. So

- blocks are drawn in parallel on ``torch.get_num_threads()`` threads (``normal_``
  releases the GIL), with the same result for any thread count;
- the noise is never kept for backward: it is recovered from the reparameterised sample
  ``w = mean + std * eps`` or regenerated block by block from the seeds, so ``w`` is the
  only sample-sized tensor a training step keeps.

Other devices (CUDA, ...) draw the noise of one tensor with one ``normal_`` call on a generator
of that device seeded from the tensor's seed and sample offset (:func:`device_noise`): the same
request gives the same noise (``recompute_samples`` reads a weight again, the same samples), but
a chunk of samples is not a slice of the unchunked draw there (``chunk_size`` gives other, equally
distributed, samples than without it; on CPU the same). Under
``torch.compile`` these functions run eagerly (a graph break), so a compiled model
draws exactly the noise the eager one does.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BLOCK", "Drawn", "Layout", "SampleRecompute", "blocks", "device_noise", "draw_seed", "fill", "meanfield_draw",
           "regenerate", "run_parallel", "scratch", "softplus_scratch", "standard_normal",
           "drawn_sample", "weight_grads_by_rows"]

#: Elements per block: large enough that Python overhead is negligible, small enough to
#: stay in cache for the fused work done on each block.
BLOCK = 1 << 18
_MASK = (1 << 32) - 1
#: Backward recovers eps = (w - mean) / std instead of regenerating it where std >= this * |mean|.
RECOVER_RATIO = 1e-4

_POOL: dict[str, Any] = {"pid": None, "pool": None, "size": 0}
_LOCAL = threading.local()


def draw_seed(generator: torch.Generator | None) -> int:
    """One seed from ``generator`` (or the global RNG): the only draw the caller's RNG sees."""
    return int(torch.randint(0, 1 << 62, (1,), generator=generator,
                             device=generator.device if generator is not None else "cpu"))


def _threads() -> int:
    return max(1, torch.get_num_threads())


def run_parallel(tasks: list[Callable[[], Any]]) -> list[Any]:
    """Run ``tasks`` on a thread pool of ``torch.get_num_threads()`` workers (inline for one)."""
    size = _threads()
    if size == 1 or len(tasks) <= 1:
        return [t() for t in tasks]
    if _POOL["pid"] != os.getpid() or _POOL["size"] != size:  # a fork or a new thread count
        _POOL.update(pid=os.getpid(), size=size, pool=_new_pool(size))
    grad = torch.is_grad_enabled()  # grad mode is per thread: carry the caller's over

    def call(t: Callable[[], Any]) -> Any:
        with torch.set_grad_enabled(grad):
            return t()

    return list(_POOL["pool"].map(call, tasks))


def _new_pool(size: int) -> ThreadPoolExecutor:
    """``size`` workers whose own torch ops run single-threaded.

    A worker's ops would otherwise each open an OpenMP team of ``torch.get_num_threads()``
    threads: ``size`` x that many busy threads on ``size`` cores (the draws of a MiniLM
    step ran ~25 % slower). ``torch.set_num_threads`` in a worker sets that thread's
    OpenMP / MKL thread counts, and also the process-wide default that new threads start
    from; once every worker has started, the caller's count is set again for that default."""
    caller = torch.get_num_threads()
    started = threading.Barrier(size + 1)

    def init() -> None:
        torch.get_num_threads()  # ATen's lazy per-thread init first, or it later resets the count
        torch.set_num_threads(1)
        started.wait(60)

    pool = ThreadPoolExecutor(size, thread_name_prefix="bayesify", initializer=init)
    for _ in range(size):  # start every worker now (an executor starts them on demand)
        pool.submit(lambda: None)
    started.wait(60)
    torch.set_num_threads(caller)
    return pool


def _generator() -> torch.Generator:
    g = getattr(_LOCAL, "gen", None)
    if g is None:
        g = _LOCAL.gen = torch.Generator()
    return g


def blocks(numel: int) -> list[slice]:
    """``[0, numel)`` cut into slices of ``BLOCK`` elements (one empty slice for ``numel == 0``)."""
    return [slice(i, min(i + BLOCK, numel)) for i in range(0, max(numel, 1), BLOCK)]


def scratch(numel: int, dtype: torch.dtype, slot: int = 0) -> Tensor:
    """A per-thread reusable buffer of at least ``numel`` elements (fresh memory page-faults on CPU)."""
    key = (slot, dtype)
    bufs = getattr(_LOCAL, "bufs", None)
    if bufs is None:
        bufs = _LOCAL.bufs = {}
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(max(numel, BLOCK), dtype=dtype)
    return buf[:numel]


class Layout:
    """How the noise of samples ``offset .. offset + n`` of a tensor (``numel`` elements each)
    is cut into blocks.

    Each sample is cut into ``chunks`` column ranges of ``columns`` elements, a whole
    number of the tensor's rows (``row`` elements: all but its first dim) so a block is
    also a slice ``[r0:r1]`` of the tensor whatever its strides. Block ``(s, c)`` of
    global sample ``s`` has index ``s * chunks + c``: it does not depend on how many
    samples are drawn at once, so drawing samples in chunks gives the same noise.
    Parallel tasks are column ranges (times sample groups where a tensor has fewer column
    ranges than threads: see :func:`sample_groups`); a reduction over samples never has two
    tasks writing the same columns of one buffer.
    """

    def __init__(self, n: int, numel: int, row: int = 1, offset: int = 0) -> None:
        self.n, self.numel, self.row, self.offset = n, numel, max(1, row), offset
        self.columns = min(max(numel, 1), self.row * max(1, BLOCK // self.row))
        self.chunks = max(1, math.ceil(numel / self.columns))

    @staticmethod
    def of(n: int, shape: tuple[int, ...], offset: int = 0) -> "Layout":
        numel = math.prod(shape)
        return Layout(n, numel, numel // shape[0] if shape and shape[0] else 1, offset)

    def rows(self, c: int) -> slice:
        """Block column range ``c`` as a slice of the tensor's first dim."""
        cols = self.cols(c)
        return slice(cols.start // self.row, cols.stop // self.row)

    def cols(self, c: int) -> slice:
        return slice(c * self.columns, min((c + 1) * self.columns, self.numel))

    def index(self, s: int, c: int) -> int:
        """Seed offset of block ``(s, c)``, ``s`` counted from this draw's first sample."""
        return (self.offset + s) * self.chunks + c


#: A block's noise is drawn in pieces of this many elements, one generator stream continued from
#: piece to piece: the same values bit for bit as one ``normal_`` over the block (PyTorch's CPU
#: ``normal_`` draws all uniforms of a call, then transforms them 16 at a time; the pieces are
#: multiples of 16 and the last takes the rest), but the uniforms stay in cache. 24 M float32 normals
#: on one thread (this machine's Xeon): 71 ms in blocks of 2^18, 62 ms in pieces of 2^16.
FILL_PIECE = 1 << 16


def _fill(out: Tensor, seed: int) -> Tensor:
    g = _generator()
    g.manual_seed(seed & _MASK)
    n = out.numel()
    if n < 2 * FILL_PIECE or out.device.type != "cpu" or not out.is_contiguous():
        return out.normal_(generator=g)
    flat = out.view(-1)
    last = (n // FILL_PIECE - 1) * FILL_PIECE  # the last piece: FILL_PIECE .. 2 FILL_PIECE - 1 elements
    for i in range(0, last, FILL_PIECE):
        flat[i:i + FILL_PIECE].normal_(generator=g)
    flat[last:].normal_(generator=g)
    return out


def fill(flat: Tensor, seed: int, per_block: Callable[..., Any] | None = None,
         lay: Layout | None = None, grouped: bool = False) -> list[list[Any]]:
    """Fill ``flat`` ``(n, numel)`` (contiguous) with N(0, 1) noise, block by block, in parallel.

    ``per_block(cols, block)`` runs on each filled block (the view ``flat[s, cols]``) while
    it is hot in cache; its results come back per column chunk, in sample order. ``grouped``:
    ``per_block(cols, block, i, first)`` with ``i`` the index of the task's sample group
    (:func:`sample_groups`: tasks of different groups may run at once on the same columns) and
    ``first`` whether ``s`` is that group's first sample.
    """
    lay = Layout(*flat.shape) if lay is None else lay

    def task(c: int, i: int, samples: range) -> list[Any]:
        cols = lay.cols(c)
        res = []
        for s in samples:
            block = flat[s, cols]
            _fill(block, seed + lay.index(s, c))
            if per_block is not None:
                res.append(per_block(cols, block, i, s == samples.start) if grouped else per_block(cols, block))
        return res

    groups = sample_groups(lay)
    parts = run_parallel([lambda c=c, i=i, g=g: task(c, i, g) for c in range(lay.chunks)
                          for i, g in enumerate(groups)])
    k = len(groups)
    return [[r for part in parts[c * k:(c + 1) * k] for r in part] for c in range(lay.chunks)]


def sample_groups(lay: Layout) -> list[range]:
    """Sample ranges that, with the column chunks, give every worker a task (a tensor of one
    chunk, say 384 x 384, is otherwise drawn on one thread)."""
    k = max(1, min(lay.n, -(-_threads() // lay.chunks)))
    step = -(-lay.n // k)
    return [range(i, min(i + step, lay.n)) for i in range(0, lay.n, step)]


def reduce_sample_groups(lay: Layout, g_mean: Tensor, g_rho: Tensor,
                         accumulate: Callable[[int, range, Tensor, Tensor], Any],
                         finish: Callable[[int, Any], None],
                         spread: Callable[[int], Any] = lambda c: None) -> None:
    """The schedule of a reduction over samples into ``g_mean`` / ``g_rho`` (flat, ``lay.numel``):
    ``accumulate(c, samples, gm_buf, acc_buf)`` sums block column ``c`` over ``samples`` into the
    buffers, ``finish(c, r)`` then turns column ``c`` of ``g_mean`` / ``g_rho`` into the gradients.
    With one sample group (:func:`sample_groups`) one task per block column does both, ``r`` the
    value ``accumulate`` returned; with several, each group sums into its own buffers (the first
    into ``g_mean`` / ``g_rho``), the buffers are added in group order, and ``r`` is ``spread(c)``."""
    groups = sample_groups(lay)
    if len(groups) == 1:  # one task per block column, each reducing over all samples
        run_parallel([lambda c=c: finish(c, accumulate(c, groups[0], g_mean, g_rho)) for c in range(lay.chunks)])
        return
    # few block columns: sample groups reduce into their own buffers, summed after
    bufs = [(g_mean, g_rho)] + [(torch.empty_like(g_mean), torch.empty_like(g_rho)) for _ in groups[1:]]
    run_parallel([lambda c=c, i=i: accumulate(c, groups[i], *bufs[i])
                  for c in range(lay.chunks) for i in range(len(groups))])
    for gm_i, acc_i in bufs[1:]:
        g_mean.add_(gm_i)
        g_rho.add_(acc_i)
    run_parallel([lambda c=c: finish(c, spread(c)) for c in range(lay.chunks)])


def regenerate(lay: Layout, seed: int, s: int, c: int, out: Tensor) -> Tensor:
    """The noise of block ``(s, c)`` again, bit for bit."""
    return _fill(out, seed + lay.index(s, c))


def seeded_on_device(device: torch.device) -> bool:
    """Whether a seeded draw off the CPU fast path uses its own seeded generator (a real device)."""
    return device.type not in ("cpu", "meta")


#: Spreads the sample offset over the seed space (seeds of sites are 62-bit random draws).
_OFFSET_STRIDE = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def device_noise(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator | None, seed: int | None, offset: int) -> Tensor:
    """``shape`` N(0, 1) noise off the CPU fast path: with a ``seed`` on a device (CUDA, ...), from a
    generator of that device seeded by ``(seed, offset)``, so the same request draws the same noise
    with one kernel; else from ``generator``."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if seed is None or not seeded_on_device(out.device) or isinstance(out, torch._subclasses.FakeTensor):
        return out.normal_(generator=generator)
    try:
        g = torch.Generator(device=out.device)
    except RuntimeError:  # a device without its own generators: the caller's
        return out.normal_(generator=generator)
    g.manual_seed((seed + offset * _OFFSET_STRIDE) & _MASK64)
    return out.normal_(generator=g)


def fast_path(t: Tensor) -> bool:
    """True where the block-seeded threaded noise applies (CPU, eager, floating point)."""
    if t.device.type != "cpu" or not t.is_floating_point():
        return False
    return not isinstance(t, torch._subclasses.FakeTensor) and t.layout == torch.strided


@torch.compiler.disable  # eager under torch.compile too: the same noise as without it
def standard_normal(shape: Iterable[int], dtype: torch.dtype, device: torch.device,
                    generator: torch.Generator | None, seed: int | None = None, offset: int = 0) -> Tensor:
    """``(n, *shape)`` N(0, 1) noise, reproducible from ``generator`` (one seed drawn from it),
    or samples ``offset .. offset + n`` of the noise of ``seed``."""
    shape = tuple(shape)
    out = torch.empty(shape, dtype=dtype, device=device)
    if fast_path(out) and out.numel():
        seed = draw_seed(generator) if seed is None else seed
        fill(out.view(shape[0], -1), seed, lay=Layout.of(shape[0], shape[1:], offset))
        return out
    return device_noise(shape, dtype, out.device, generator, seed, offset)


# --- w = mean + std * eps with the Normal prior's statistics, eps regenerated in backward ---------


@torch.compiler.disable  # eager under torch.compile too: the same noise as without it
def meanfield_draw(mean: Tensor, rho: Tensor, loc: Tensor | float | None, n: int,
                   generator: torch.Generator | None, seed: int | None = None, offset: int = 0
                   ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """``n`` samples ``w = mean + softplus(rho) * eps`` with, when ``loc`` is given, per-sample
    ``quad = sum((w - loc)**2)``, ``sq = sum(eps**2)`` (the Normal log densities' data terms)
    and ``log_std = sum(log softplus(rho))``.

    On the fast path the noise is block-seeded (see the module docstring) and never kept:
    backward recovers or regenerates it block by block, and recomputes ``std`` from ``rho``
    (so nothing but ``w`` and the parameters is held for backward). Elsewhere plain tensor ops.
    """
    if not fast_path(mean) or mean.numel() == 0:
        std = F.softplus(rho)
        eps = device_noise((n, *mean.shape), mean.dtype, mean.device, generator, seed, offset)
        w = torch.addcmul(mean, std, eps)  # as affine_ does on the CPU fast path
        if loc is None:
            return w, None, None, None
        dims = tuple(range(1, w.dim()))
        return w, (w - loc).square().sum(dims), eps.square().sum(dims), std.log().sum()
    seed = draw_seed(generator) if seed is None else seed
    lay = Layout.of(n, tuple(mean.shape), offset)
    grad = torch.is_grad_enabled() and (mean.requires_grad or rho.requires_grad)
    if not grad and loc is None:
        return _draw_values(mean, rho, lay, seed, pooled=True), None, None, None
    if not POOL_TRAINING_DRAWS:
        _LOCAL.pool = None  # a training draw: the eval samples' memory goes back
    w, quad, sq, log_std = _MeanFieldDraw.apply(mean, rho, loc, lay, seed, grad and CLOSED_FORM_QUAD)
    return (w, None, None, None) if loc is None else (w, quad, sq, log_std)


#: A per-sample layer whose weight is a fresh training draw (recoverable noise) computes the weight
#: gradient block by block into the mean's and rho's gradients (:func:`weight_grads_by_rows`), never
#: materialising the ``(S, *shape)`` gradient. False: through the draw's own backward (the A/B partner).
FUSED_WEIGHT_GRADS = True


class Drawn(NamedTuple):
    """What a training draw ``w`` of :class:`_MeanFieldDraw` records (:func:`drawn_sample`) for a
    layer that reads it: its parameters, layout, the optimiser's kept spread, and ``w``'s version."""

    mean: Tensor
    rho: Tensor
    lay: Layout
    kept: Tensor | None
    version: int


def _drawn_registry() -> Any:
    """This thread's training draws (the sampled forward reads them on the thread that drew them),
    weakly: an entry goes with its tensor."""
    reg = getattr(_LOCAL, "drawn", None)
    if reg is None:
        from torch.utils.weak import WeakIdKeyDictionary

        reg = _LOCAL.drawn = WeakIdKeyDictionary()
    return reg


def drawn_sample(w: Tensor) -> Drawn | None:
    """The record of ``w`` where it is, unmodified, the whole sample tensor of a training draw whose
    noise is recovered from it (else None: a view, a copy, a detached or modified tensor)."""
    d = _drawn_registry().get(w) if FUSED_WEIGHT_GRADS else None
    if d is None or w._version != d.version or w.grad_fn is None:
        return None
    return d


def weight_grads_by_rows(d: Drawn, w: Tensor, rows_grad: Callable[[int, slice, Tensor], Tensor]
                         ) -> tuple[Tensor, Tensor]:
    """``(dL/dmean, dL/drho)`` of a draw ``w`` (``(n, rows, ...)``, recorded as ``d``) from its
    per-sample gradient, given block by block: ``rows_grad(s, rows, out)`` writes ``dL/dw_s[rows]``
    into ``out`` (a scratch buffer of that block's size, in ``w``'s shape) and returns it.

    The same arithmetic as the draw's backward over a kept sample (``gm = sum_s t_s``, ``acc =
    sum_s t_s w_s``, then ``eps`` recovered from the sums), but the ``(n, *shape)`` gradient is
    never held: each block of it is made (a GEMM for a linear layer) while the sums are hot in
    cache. The log-density terms (``quad``, ``log_std``) stay with the draw's own backward."""
    lay, m = d.lay, d.mean.detach().reshape(-1)
    rho = d.rho.detach().reshape(-1)
    flat = w.detach().view(lay.n, -1)
    g_mean, g_rho = m.new_empty(lay.numel), m.new_empty(lay.numel)
    row_shape = tuple(w.shape[2:])

    def accumulate(c: int, samples: range, gm_buf: Tensor, acc_buf: Tensor) -> None:
        rows, cols = lay.rows(c), lay.cols(c)
        size = cols.stop - cols.start
        gm, acc = gm_buf[cols], acc_buf[cols]
        out = scratch(size, m.dtype, 6).view(rows.stop - rows.start, *row_shape)
        for k, s in enumerate(samples):
            t = rows_grad(s, rows, out).reshape(-1)
            if k == 0:
                gm.copy_(t)
                torch.mul(t, flat[s, cols], out=acc)
            else:
                gm.add_(t)
                acc.addcmul_(t, flat[s, cols])
        if not samples:
            gm.zero_()
            acc.zero_()

    def finish(c: int, _: None) -> None:
        cols = lay.cols(c)
        sd_c = softplus_scratch(rho[cols], 3) if d.kept is None else d.kept[cols]
        acc = g_rho[cols]
        acc.addcmul_(g_mean[cols], m[cols], value=-1).div_(sd_c)
        acc.mul_(torch.sigmoid(rho[cols], out=scratch(sd_c.numel(), m.dtype, 0)))

    reduce_sample_groups(lay, g_mean, g_rho, accumulate, finish)
    return g_mean.view(d.mean.shape), g_rho.view(d.rho.shape)


def affine_(eps: Tensor, std: Tensor, mean: Tensor) -> Tensor:
    """``eps`` turned into ``mean + std * eps`` in place: one pass (``addcmul``; on CPUs with FMA the
    product is not rounded before the sum). Every path that makes or remakes a sample uses it, so
    a regenerated sample equals the drawn one bit for bit. One pass instead of ``mul_`` + ``add_``:
    the draws of the MLP benchmark (10 samples, 2.4 M weights, one thread) 154 ms instead of 162."""
    return torch.addcmul(mean, eps, std, out=eps)


#: Draws on this thread keep the memory of their samples, up to this many bytes, for the next draw
#: of the same shapes once nothing else holds it: fresh memory page-faults on CPU (an eval forward
#: of ResNet-18 with 10 samples writes 450 MB of samples; freshly allocated, that costs ~145 ms CPU
#: more than rewriting kept memory). Training draws too (:data:`POOL_TRAINING_DRAWS`): a training
#: draw that finds no memory of its shape lets the kept memory of other shapes go; 0 turns the pool off.
SAMPLE_POOL_BYTES = 512 << 20


def _unshared(t: Tensor) -> bool:
    """Whether only the pool refers to ``t`` and its memory (no view, no other holder), called on
    an item of a pool list while iterating it (the references counted as :data:`_POOL_REFS`)."""
    return (sys.getrefcount(t) <= _POOL_REFS and t._use_count() == 1
            and torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2)


def _pool_refs() -> int:
    """Python references to a tensor held by nothing but a list being iterated, seen one call down
    (as :func:`_unshared` sees a pool item): the list, the loop variable, the argument."""
    for t in [torch.empty(0)]:
        return _refs(t)
    return 0


def _refs(t: Tensor) -> int:
    return sys.getrefcount(t)


_POOL_REFS = _pool_refs()


def _pooled_empty(shape: tuple[int, ...], dtype: torch.dtype, training: bool = False) -> Tensor:
    """``torch.empty(shape, dtype)``, in memory an earlier draw of this thread let go where there is
    some (see :data:`SAMPLE_POOL_BYTES`). ``training``: a new tensor on that memory, never the pool's
    own (autograd records the sample; the pool must not keep its graph alive); kept memory that
    nothing holds goes back first where its sample count differs, and on a miss all of other shapes."""
    pool = getattr(_LOCAL, "pool", None)
    if pool is None:
        pool = _LOCAL.pool = {"bytes": 0, "free": {}}
    key = (shape, dtype)
    if training:  # kept memory of another sample count (bf.predict's 100 samples) goes back
        _let_go_others(pool, key, lambda k: k[0][:1] != shape[:1])
    kept = pool["free"].setdefault(key, [])
    for t in kept:
        if _unshared(t):
            return _alias(t) if training else t
    if training:
        _let_go_others(pool, key)
    out = torch.empty(shape, dtype=dtype)
    size = out.numel() * out.element_size()
    if pool["bytes"] + size <= SAMPLE_POOL_BYTES:
        pool["bytes"] += size
        kept.append(out)
        return _alias(out) if training else out
    return out


def _alias(t: Tensor) -> Tensor:
    """A new tensor on ``t``'s memory, same shape (not a view: no ``_base``)."""
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, t.shape)


def _let_go_others(pool: dict[str, Any], key: tuple, which: Callable[[tuple], bool] | None = None) -> None:
    """Drop the pool's memory of shapes other than ``key`` (those ``which`` selects) that nothing holds."""
    for k, kept in pool["free"].items():
        if k == key or (which is not None and not which(k)):
            continue
        keep = []
        for t in kept:
            if _unshared(t):
                pool["bytes"] -= t.numel() * t.element_size()
            else:
                keep.append(t)
        kept[:] = keep


#: Training draws take their samples' memory from the same pool (False: fresh memory each draw, and
#: a training draw lets the pool go, as before; the A/B partner): a layer's samples take more than
#: glibc's largest heap block (32 MB), so each step otherwise maps them afresh and page-faults every
#: page (the MLP benchmark's 96 MB of samples per step: ~25 ms of one core). Training and eval draws
#: of one model share it (the same shapes).
POOL_TRAINING_DRAWS = True


def _draw_values(mean: Tensor, rho: Tensor, lay: Layout, seed: int, pooled: bool = False) -> Tensor:
    """The samples alone, without autograd: bit for bit those :class:`_MeanFieldDraw` returns.
    ``pooled``: in memory kept from an earlier eval draw (:func:`_pooled_empty`)."""
    shape = (lay.n, *mean.shape)
    w = _pooled_empty(shape, mean.dtype) if pooled else torch.empty(shape, dtype=mean.dtype)
    m, sd = mean.detach().reshape(-1), _spread(rho, 5)
    fill(w.view(lay.n, -1), seed, lambda cols, b: affine_(b, sd[cols], m[cols]), lay)
    return w


class _Kept(NamedTuple):
    t: Tensor
    version: int


class _Recipe(NamedTuple):
    owner: "SampleRecompute"
    rid: int
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class SampleRecompute:
    """Saved-tensor hooks that keep no weight sample for backward (``recompute_samples=True``).

    While active (``with rec.hooks():``), every sample drawn by :func:`meanfield_draw` is
    registered with its recipe (parameters, layout, seed). Where autograd saves such a
    sample, or any view of it (the vmapped ``F.linear`` keeps the weight for the input
    gradient; the draw keeps it to recover its noise), the hook stores the view's geometry
    instead. In backward the first unpack regenerates the sample, bit for bit, with one
    noise pass; the other views of it unpacked later (the draw's own backward runs last)
    share that tensor, which is dropped once every saved view has been unpacked.

    So a training step holds no weight sample between forward and backward (for MiniLM
    with 10 samples, ~440 MB), for one extra noise pass per weight.
    """

    def __init__(self) -> None:
        # storage address -> (the sample, weakly: a freed sample's address may be reused, recipe id)
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self._recipes: dict[int, tuple[Callable[[], Tensor], tuple[Tensor, ...], tuple[int, ...]]] = {}
        self._cache: dict[int, Tensor] = {}
        self._pending: dict[int, int] = {}

    @staticmethod
    def active() -> "SampleRecompute | None":
        return getattr(_LOCAL, "recompute", None)

    def register(self, w: Tensor, make: Callable[[], Tensor], params: tuple[Tensor, ...]) -> None:
        """``w`` can be rebuilt by ``make()`` as long as ``params`` are not modified in place."""
        rid = len(self._recipes)
        self._recipes[rid] = (make, params, tuple(p._version for p in params))
        self._live[w.untyped_storage().data_ptr()] = (weakref.ref(w), rid)

    def release(self) -> None:
        """Forget the samples drawn so far (views saved of them keep their recipes): the next
        draws may reuse their memory."""
        self._live.clear()

    def _pack(self, t: Tensor) -> Any:
        entry = None
        if self._live and t.layout == torch.strided and t.device.type == "cpu":
            try:
                entry = self._live.get(t.untyped_storage().data_ptr())
            except (RuntimeError, NotImplementedError):  # wrapper subclasses without a storage
                pass
        w = None if entry is None else entry[0]()
        if w is None or w.dtype != t.dtype:
            # Autograd skips its in-place check for tensors that went through hooks: keep it.
            return _Kept(t, t._version)
        rid = entry[1]
        self._pending[rid] = self._pending.get(rid, 0) + 1
        return _Recipe(self, rid, t.size(), t.stride(), t.storage_offset())

    @staticmethod
    def _unpack(packed: Any) -> Tensor:
        if isinstance(packed, _Kept):
            if packed.t._version != packed.version:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: a tensor of shape {tuple(packed.t.shape)} is at version {packed.t._version}; "
                    f"expected version {packed.version} instead"
                )
            return packed.t
        self, rid = packed.owner, packed.rid
        w = self._cache.get(rid)
        if w is None:
            make, params, versions = self._recipes[rid]
            if tuple(p._version for p in params) != versions:
                raise RuntimeError(
                    "a weight sample cannot be recomputed: its variational parameters were modified in "
                    "place between forward and backward (call optimizer.step() after backward())"
                )
            w = self._cache[rid] = make()
        self._pending[rid] -= 1
        if self._pending[rid] <= 0:  # every saved view has had its turn (a retained graph recomputes)
            self._cache.pop(rid, None)
        return w.as_strided(packed.size, packed.stride, packed.offset)

    @contextmanager
    def hooks(self) -> Iterator[None]:
        prev = getattr(_LOCAL, "recompute", None)
        _LOCAL.recompute = self
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            _LOCAL.recompute = prev
            self.release()


def softplus_scratch(x: Tensor, slot: int) -> Tensor:
    """``F.softplus(x)`` (flat) into this thread's scratch buffer ``slot``: no allocation per call
    (per-tensor temporaries in backward fragment the heap while activations are alive); a
    fresh tensor past ``4 * BLOCK`` elements, so no thread keeps a large buffer."""
    if x.numel() > 4 * BLOCK:
        return F.softplus(x)
    return torch._C._nn.softplus(x, 1.0, 20.0, out=scratch(x.numel(), x.dtype, slot))


#: ``rho -> (rho._version, rho.data_ptr(), softplus(rho) flat)``: spreads an optimiser computed once
#: (bf.optim.IVON, after writing ``rho``), read by the draw, its backward and the next step instead
#: of three softplus passes. Valid while ``rho`` is not written (its version counter; a write
#: through ``rho.data`` bypasses it: an IVON-trained ``rho`` is the optimiser's to write).
_KEPT_SPREADS: "WeakIdKeyDictionary" = None  # type: ignore[assignment]


def keep_spread(rho: Tensor, sd: Tensor | None) -> None:
    """Record ``sd`` (flat, contiguous, ``rho``'s dtype) as ``softplus(rho)``, bit for bit what
    :func:`softplus_scratch` gives, until ``rho`` is next written; ``None`` forgets it."""
    global _KEPT_SPREADS
    if _KEPT_SPREADS is None:
        from torch.utils.weak import WeakIdKeyDictionary

        _KEPT_SPREADS = WeakIdKeyDictionary()
    if sd is None:
        _KEPT_SPREADS.pop(rho, None)
    else:
        _KEPT_SPREADS[rho] = (rho._version, rho.data_ptr(), sd)


#: ``rho -> (rho._version, rho.data_ptr(), weakref to softplus(rho) flat, draw generation)``: the spread a
#: training draw computed and keeps for its own backward (:data:`KEEP_SPREAD_FOR_BACKWARD`), lent to
#: the closed-form KL of the same forward (which keeps it for its backward) instead of two more softplus
#: passes (MLP benchmark, ``kl="analytic"``: 34 softplus calls and 12.5 ms per step before, 6 calls
#: after). Read only within the forward that lent it (:func:`begin_draws`): the version counter alone
#: does not prove the values unchanged (FSDP2 refills an unsharded parameter's storage between steps
#: without bumping it). Nothing is kept alive by this table.
_STEP_SPREADS: "WeakIdKeyDictionary" = None  # type: ignore[assignment]
_DRAW_GENERATION = 0


def begin_draws() -> None:
    """A model forward's draws begin: spreads lent by earlier forwards are not read any more (another
    thread's forward starting in between only costs the reuse, never a stale value)."""
    global _DRAW_GENERATION
    _DRAW_GENERATION += 1


def _lend_spread(rho: Tensor, sd: Tensor) -> None:
    global _STEP_SPREADS
    if _STEP_SPREADS is None:
        from torch.utils.weak import WeakIdKeyDictionary

        _STEP_SPREADS = WeakIdKeyDictionary()
    _STEP_SPREADS[rho] = (rho._version, rho.data_ptr(), weakref.ref(sd), _DRAW_GENERATION)


def kept_spread(rho: Tensor) -> Tensor | None:
    """``softplus(rho)`` flat, where :func:`keep_spread` recorded it for this ``rho`` as it is now,
    or a training draw of this forward lent it (read only)."""
    for table, strong in ((_KEPT_SPREADS, True), (_STEP_SPREADS, False)):
        if table is None:
            continue
        entry = table.get(rho)
        if entry is None or entry[0] != rho._version or entry[1] != rho.data_ptr():
            continue
        if not strong and entry[3] != _DRAW_GENERATION:
            continue
        sd = entry[2] if strong else entry[2]()
        if sd is not None and sd.dtype == rho.dtype and sd.numel() == rho.numel():
            return sd
    return None


def _spread(rho: Tensor, slot: int) -> Tensor:
    """``softplus(rho)`` flat: the kept one (read only) or computed into scratch ``slot``."""
    sd = kept_spread(rho)
    return softplus_scratch(rho.detach().reshape(-1), slot) if sd is None else sd


def _recoverable(m: Tensor, sd: Tensor) -> bool:
    """Every ``|m| / sd <= 1 / RECOVER_RATIO``: two reductions decide many tensors; else, block by
    block, one division into a scratch buffer and its ``aminmax``.

    The elementwise test decides most converted tensors (a relative init gives the smallest
    spreads to the smallest weights, so the two global reductions rarely decide): written as
    ``(sd >= RECOVER_RATIO * |m|).all()`` it made three weight-sized temporaries, ~50 ms of a
    ~250 ms draw + backward of ResNet-18's 11.2 M weights on one thread."""
    lo, hi = torch.aminmax(m)
    if float(sd.min()) >= RECOVER_RATIO * max(-float(lo), float(hi)):
        return True
    limit = 1.0 / RECOVER_RATIO

    def part(cols: slice) -> bool:
        q = torch.div(m[cols], sd[cols], out=scratch(cols.stop - cols.start, m.dtype, 1))
        lo, hi = torch.aminmax(q)
        return bool(-float(lo) <= limit and float(hi) <= limit)  # NaN (0 / 0): False

    return all(run_parallel([lambda c=c: part(c) for c in blocks(m.numel())]))


def _flat(t: Tensor | float | None) -> Tensor | float | None:
    return t.reshape(-1) if isinstance(t, Tensor) else t


def _backward_one(g: Tensor, w: Tensor, m: Tensor, rho: Tensor, glog: Tensor | None, lay: Layout,
                  shape: torch.Size, kept: Tensor | None = None) -> tuple[Tensor, Tensor, None, None, None]:
    """The gradients of one kept sample ``w`` (``(numel,)``) with incoming gradient ``g`` (the
    sample's shape), no prior term: ``dL/dmean = g`` (the incoming gradient itself where it is
    contiguous: no pass at all) and ``dL/drho = (g (w - mean) + glog) / std * sigmoid(rho)``, four
    elementwise passes per block besides softplus and sigmoid (the general path makes seven)."""
    g_mean = g.reshape(-1) if g.is_contiguous() else g.contiguous().view(-1)
    g_rho = torch.empty_like(m)

    def part(c: int) -> None:
        cols = lay.cols(c)
        sd_c = softplus_scratch(rho[cols], 3) if kept is None else kept[cols]
        out = torch.sub(w[cols], m[cols], out=g_rho[cols]).mul_(g_mean[cols])  # g * (w - mean) = g * std * eps
        if glog is not None:
            out.add_(glog)
        out.div_(sd_c).mul_(torch.sigmoid(rho[cols], out=scratch(sd_c.numel(), sd_c.dtype, 0)))

    run_parallel([lambda c=c: part(c) for c in range(lay.chunks)])
    return g_mean.view(shape), g_rho.view(shape), None, None, None


#: Training draws with log densities keep, per weight, the sums over samples of ``eps`` and ``eps^2``
#: (two weight-sized tensors, not sample-sized), so the prior term's gradient takes a few passes over
#: the weights instead of four over every sample (see :func:`_quad_grads`). False: the per-sample
#: passes (the A/B partner).
CLOSED_FORM_QUAD = True


def _quad_grads(gm: Tensor, dstd: Tensor, m: Tensor, sd: Tensor, loc: Tensor | float, e1: Tensor, e2: Tensor,
                n: int, c: Tensor) -> None:
    """Add the gradient of ``sum_s gquad_s * sum((w_s - loc)^2)`` with ``2 gquad_s = c`` for every sample,
    ``w_s = m + sd eps_s``, to ``gm`` (dL/dmean) and ``dstd`` (dL/dstd), from ``e1 = sum_s eps_s`` and
    ``e2 = sum_s eps_s^2``: ``c (n (m - loc) + sd e1)`` and ``c ((m - loc) e1 + sd e2)``. The same
    derivative as through each sample, without its rounding of ``w_s`` before ``- loc``."""
    d = torch.sub(m, loc, out=scratch(m.numel(), m.dtype, 4))  # m - loc
    t = torch.mul(sd, e2, out=scratch(m.numel(), m.dtype, 7)).addcmul_(d, e1)  # (m - loc) e1 + sd e2
    dstd.add_(t.mul_(c))
    gm.add_(torch.addcmul(d.mul_(n), sd, e1, out=t).mul_(c))


#: Training draws keep ``softplus(rho)`` (one weight-sized tensor) for backward instead of computing it
#: again there (not with ``recompute_samples``). False: recomputed (the A/B partner).
KEEP_SPREAD_FOR_BACKWARD = True


def _log_sum(sd: Tensor) -> Tensor:
    """``sd.log().sum()`` of a flat ``sd`` block by block through scratch (no weight-sized temporary)."""
    return torch.stack([torch.log(sd[c], out=scratch(c.stop - c.start, sd.dtype, 1)).sum()
                        for c in blocks(sd.numel())]).sum()


class _MeanFieldDraw(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, mean: Tensor, rho: Tensor, loc: Tensor | float | None, lay: Layout, seed: int,
                keep_sums: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n = lay.n
        shape = (n, *mean.shape)
        w = _pooled_empty(shape, mean.dtype, training=True) if POOL_TRAINING_DRAWS else torch.empty(shape, dtype=mean.dtype)
        m = mean.reshape(-1)
        # Kept for backward (the draw's and a fused layer's: two softplus passes fewer, ~12 ms of the MLP
        # benchmark's step) unless recompute_samples asks for memory: then backward recomputes it
        # from rho per block. An optimiser may keep it already (kept_spread).
        kept = kept_spread(rho)
        rec = SampleRecompute.active()
        if kept is None and rec is None and KEEP_SPREAD_FOR_BACKWARD:
            kept = F.softplus(rho.detach().reshape(-1))
            _lend_spread(rho, kept)
        sd = softplus_scratch(rho.reshape(-1), 5) if kept is None else kept
        lc = _flat(loc)

        # With the log densities and gradients: per weight, the sums over samples of eps and eps^2
        # (per sample group, summed after), from which backward computes the quad term's gradient
        # in closed form (see _quad_grads) instead of a pass over every sample.
        sums = None
        if lc is not None and keep_sums:
            sums = m.new_empty((len(sample_groups(lay)), 2, lay.numel))

        def per_block(cols: slice, b: Tensor, i: int, first: bool) -> Tensor | None:
            """``(sum(eps^2), sum((w - loc)^2))`` of one block (with a ``loc``), turning its eps into
            w in place."""
            if lc is None:  # no log densities: nothing to sum (a dot product per block saved)
                affine_(b, sd[cols], m[cols])
                return None
            sq = torch.dot(b, b)
            if sums is not None:
                e1, e2 = sums[i, 0, cols], sums[i, 1, cols]
                if first:
                    e1.copy_(b)
                    torch.mul(b, b, out=e2)
                else:
                    e1.add_(b)
                    e2.addcmul_(b, b)
            affine_(b, sd[cols], m[cols])
            d = torch.sub(b, lc[cols] if isinstance(lc, Tensor) else lc, out=scratch(b.numel(), b.dtype, 1))
            return torch.stack([sq, torch.dot(d, d)])

        per_chunk = fill(w.view(n, -1), seed, per_block, lay, grouped=True)
        if sums is not None and sums.shape[0] > 1:
            sums = sums.sum(0, keepdim=True)
        ctx.sums = None if sums is None else sums[0]
        # Backward needs eps again. Where every std is at least RECOVER_RATIO * |mean| (float32 /
        # float64), eps = (w - mean) / std is recovered to ~6e-8 * |w| / std <= 6e-4 relative
        # (in float32; the subtraction is exact); else the blocks are regenerated from their seeds.
        recover = mean.dtype in (torch.float32, torch.float64) and _recoverable(m, sd)
        if lc is None:  # nobody reads them (meanfield_draw returns None for these)
            sq = quad = log_std = w.new_zeros(())
        else:
            sq, quad = torch.stack([torch.stack(r) for r in per_chunk]).sum(0).unbind(1)
            log_std = _log_sum(sd)  # (the same sum with and without recompute_samples)
        if rec is not None and recover:
            rec.register(w, lambda: _draw_values(mean, rho, lay, seed), (mean, rho))
        if recover and FUSED_WEIGHT_GRADS:
            # A per-sample linear layer reading w may compute its weight gradient into mean's and
            # rho's directly (drawn_sample; bayesify._batched): eps is recovered from w as here.
            _drawn_registry()[w] = Drawn(mean, rho, lay, kept, w._version)
        ctx.save_for_backward(w if recover else None, loc if isinstance(loc, Tensor) else None, mean, rho)
        ctx.loc, ctx.seed, ctx.shape, ctx.lay = (None if isinstance(loc, Tensor) else loc), seed, mean.shape, lay
        ctx.kept = kept  # rho is saved: a write to it before backward raises there, so kept stays valid
        ctx.mark_non_differentiable(sq)
        ctx.set_materialize_grads(False)  # an unused quad / log_std: None, not a zero to add per weight
        return w, quad, sq, log_std

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, gw: Tensor | None, gquad: Tensor | None, _gsq: Tensor | None, glog: Tensor | None
                 ) -> tuple[Tensor | None, Tensor | None, None, None, None, None]:
        w, loc_t, mean_t, rho_t = ctx.saved_tensors
        m, rho = mean_t.reshape(-1), rho_t.reshape(-1)
        loc = _flat(loc_t) if loc_t is not None else ctx.loc
        lay = ctx.lay
        n = lay.n
        flat = None if w is None else w.view(n, -1)
        dtype = mean_t.dtype
        # The incoming gradient may be strided (F.linear's weight gradient under vmap is a
        # transpose): blocks read it as row slices, never through a full-size copy.
        g = gw if gw is None or gw.dim() > 1 else gw.view(n, 1)  # a 0-d tensor's samples
        gq2 = None if gquad is None or loc is None else 2 * gquad
        closed = None  # 2 gquad where it is the same for every sample and the forward kept the sums
        if gq2 is not None and ctx.sums is not None and bool((gq2 == gq2[0]).all()):
            closed, gq2 = gq2[0], None
        if flat is not None and n == 1 and gq2 is None and g is not None and closed is None:
            return (*_backward_one(g[0], flat[0], m, rho, glog, lay, ctx.shape, ctx.kept), None)
        g_mean = mean_t.new_empty(lay.numel)
        g_rho = mean_t.new_empty(lay.numel)

        # No per-sample term (the layer took the weight gradient, the prior term is closed-form):
        # no pass over the samples at all.
        none = g is None and gq2 is None

        def accumulate(c: int, samples: range, gm_buf: Tensor, acc_buf: Tensor) -> Tensor:
            """Over ``samples`` of block column ``c``: gm = sum_s t_s, acc = sum_s t_s w_s (kept
            sample) or sum_s t_s eps_s (regenerated), t_s = dL/dw_s. Returns std of the block."""
            cols = lay.cols(c)
            size = cols.stop - cols.start
            gm, acc = gm_buf[cols], acc_buf[cols]
            first = True  # the first sample writes gm and acc (no zeroing pass before an add)
            sd_c = softplus_scratch(rho[cols], 3) if ctx.kept is None else ctx.kept[cols]
            if none:
                samples = range(0)
            loc_c = loc[cols] if isinstance(loc, Tensor) else loc
            for s in samples:
                # gb: dL/dw_s of this block as a view of the incoming gradient, in its shape
                # (the vmapped F.linear's weight gradient arrives as a transpose; no copy).
                gb = None if g is None else g[s, lay.rows(c)]
                shape = (size,) if gb is None else gb.shape
                if flat is None:  # regenerate eps (and, for the prior term, the sample bit for bit)
                    x = regenerate(lay, ctx.seed, s, c, scratch(size, dtype, 0))
                    wb = torch.addcmul(m[cols], x, sd_c, out=scratch(size, dtype, 2)) if gq2 is not None else None
                else:  # the kept sample; eps is recovered from the sums (finish)
                    x = wb = flat[s, cols]
                if gq2 is not None:  # t = gb + 2 gquad_s (w_s - loc)
                    t = torch.sub(wb, loc_c, out=scratch(size, dtype, 1)).mul_(gq2[s]).view(shape)
                    if gb is not None:
                        t.add_(gb)
                elif gb is not None:  # strided (a transpose): read it once into a contiguous block
                    t = gb if gb.is_contiguous() else scratch(size, dtype, 1).view(shape).copy_(gb)
                else:
                    continue
                if first:  # bit for bit 0 + t and 0 + t * x (one rounding, as addcmul_)
                    gm.view(shape).copy_(t)
                    torch.mul(t, x.view(shape), out=acc.view(shape))
                    first = False
                else:
                    gm.view(shape).add_(t)
                    acc.view(shape).addcmul_(t, x.view(shape))
            if first:  # no sample contributed
                gm.zero_()
                acc.zero_()
            return sd_c

        def finish(c: int, sd_c: Tensor) -> None:
            cols = lay.cols(c)
            gm, acc = g_mean[cols], g_rho[cols]
            if flat is not None and not none:
                # acc = sum_s t_s w_s; sum_s t_s eps_s = (acc - mean * sum_s t_s) / std, accurate to
                # ~6e-8 |mean| / std relative to sum_s |t_s| in float32 (std >= RECOVER_RATIO |mean|)
                acc.addcmul_(gm, m[cols], value=-1).div_(sd_c)
            if closed is not None:
                _quad_grads(gm, acc, m[cols], sd_c, loc[cols] if isinstance(loc, Tensor) else loc,
                            ctx.sums[0, cols], ctx.sums[1, cols], n, closed)
            # acc is dL/dstd; dL/drho = (dL/dstd + glog / std) * sigmoid(rho)
            if glog is not None:
                acc.add_(torch.reciprocal(sd_c, out=scratch(sd_c.numel(), dtype, 2)).mul_(glog))
            acc.mul_(torch.sigmoid(rho[cols], out=scratch(sd_c.numel(), dtype, 0)))

        reduce_sample_groups(lay, g_mean, g_rho, accumulate, finish,
                             lambda c: softplus_scratch(rho[lay.cols(c)], 3) if ctx.kept is None
                             else ctx.kept[lay.cols(c)])
        return g_mean.view(ctx.shape), g_rho.view(ctx.shape), None, None, None, None
