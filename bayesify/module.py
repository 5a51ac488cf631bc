"""``VIModule``: the base class whose outermost instance owns the ``samples`` argument.

Data flow of one sampled forward (all in :meth:`VIModule._sampled_call`):

1. draw ``samples`` weight sets for every site at once, ``(S, *shape)`` per site,
   with their prior / variational log densities ``(S,)`` (outside vmap: one
   vectorised draw per tensor, an optional explicit ``torch.Generator``);
2. run the module's own forward under ``torch.vmap`` over the sample dimension,
   substituting the samples with ``torch.func.functional_call``; parameters that
   are not Bayesian are shared, never copied per sample;
3. return every output tensor with a leading sample dimension and, in training
   mode, ``log_probs`` ``(S, 2)`` (prior, variational) and ``kl_analytic`` attached
   (``log_probs`` None for a model trained by ``bf.optim.IVON``, which applies the prior itself).

Inside the vmapped forward, ``_vmap_rules`` adapts a few operators for that call on this
thread only (attention, torchvision's stochastic depth). Tensors that depend on no sampled
weight stay unbatched, so a frozen prefix (a partial conversion) runs once for all samples.

Where the vmapped call raises, the same draws are evaluated one by one: if that raises too,
the error is the user's and propagates as the loop raised it (as the point model words it);
if it succeeds, the samples are returned with a warning naming vmap's error, which is
remembered for later calls only where vmap names itself as the cause (data-dependent control
flow, a missing batching rule). With ``recompute_samples=True`` step 1 draws only the seeds:
each seeded site is drawn inside step 2 where the forward first reads it, and autograd
keeps a recipe instead of the sample (``_normal.SampleRecompute``).

BatchNorm in training mode: each sample normalises with its own batch
statistics; the running statistics move by the *mean over samples* of the
per-sample updates (identical to the point model's update when the samples agree;
``_vmap_rules.batchnorm_state``).
"""

from __future__ import annotations

import sys
import warnings
import weakref
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import _reuse
from ._batched import PointModelError
from ._normal import _OFFSET_STRIDE, SampleRecompute, begin_draws, draw_seed
from ._state import _active, forward_stream, sampled_call_lock, sampling_active
from ._vmap_rules import BatchNormUpdate, batchnorm_state, vmap_rules
from .sites import Site, analytic_kl, iter_sites

__all__ = ["VIModule", "sampling_active", "vi_attributes", "DEFAULT_SAMPLES"]

DEFAULT_SAMPLES = 10

def check_samples(samples: Any) -> int:
    if isinstance(samples, bool) or not isinstance(samples, int):
        raise ValueError(f"samples must be a positive int, got {samples!r} ({type(samples).__name__})")
    if samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples}")
    return samples


def check_optional_positive_int(name: str, value: Any) -> int | None:
    """``value`` if it is None or a positive int, else a ValueError naming ``name``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


class VIModule(nn.Module):
    """Base class for Bayesian models.

    The outermost ``VIModule`` of a model accepts ``samples=`` (default 10),
    ``generator=``, ``chunk_size=``, ``recompute_samples=`` and ``log_probs=`` on top of its
    forward's own arguments; inner ones just run their forward. ``recompute_samples=True``
    keeps no weight sample for backward (each is drawn where the forward first reads it and
    drawn again, bit for bit, in backward): less memory for one more noise pass per weight.
    ``log_probs=False`` (training mode) computes no Monte Carlo log densities: the outputs
    carry ``log_probs`` None and the closed-form KL, for ``ELBOLoss(kl="analytic")`` (per
    weight sample a pass less in the draw and in backward).

    Example::

        >>> class Net(bf.VIModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = bf.nn.VILinear(3, 2)
        ...     def forward(self, x):
        ...         return self.fc(x)
        >>> Net()(torch.randn(4, 3), samples=5).shape
        torch.Size([5, 4, 2])
    """

    #: Why vmap failed on this model (then samples are evaluated one by one).
    _vmap_failure: str | None = None
    #: Set on the layers inside a converted model (see ``BayesianModel``): called on its own,
    #: without ``samples=``/``generator=``/``chunk_size=``, such a module computes with the
    #: posterior means instead of sampling, so ``bnn.model(x)`` is the mean prediction.
    _means_outside_sampling: bool = False

    def __call__(self, *args: Any, samples: int | None = None, generator: torch.Generator | None = None,
                 chunk_size: int | None = None, recompute_samples: bool = False, log_probs: bool = True,
                 **kwargs: Any) -> Any:
        if sampling_active():
            if samples is not None or recompute_samples is not False or log_probs is not True:
                raise ValueError(
                    "samples=, recompute_samples= and log_probs= are owned by the outermost VIModule; "
                    "do not pass them to an inner module"
                )
            return super().__call__(*args, **kwargs)
        if (self._means_outside_sampling and samples is None and generator is None and chunk_size is None
                and recompute_samples is False and log_probs is True):
            return super().__call__(*args, **kwargs)  # the parameters hold the posterior means
        n = DEFAULT_SAMPLES if samples is None else check_samples(samples)
        check_optional_positive_int("chunk_size", chunk_size)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if not isinstance(recompute_samples, bool):
            raise TypeError(f"recompute_samples must be True or False, got {recompute_samples!r}")
        if not isinstance(log_probs, bool):
            raise TypeError(f"log_probs must be True or False, got {log_probs!r}")
        # recompute_samples: no weight sample is kept for backward; backward draws it again.
        rec = SampleRecompute() if recompute_samples and torch.is_grad_enabled() else None
        # The samples are substituted into this model's parameter slots: one thread at a time.
        turn = nullcontext() if torch.compiler.is_compiling() else sampled_call_lock(self)
        try:
            with turn, _fsdp_gathered(self), (nullcontext() if rec is None else rec.hooks()):
                if rec is not None:  # eager even under torch.compile: Dynamo would read the means, not the draws
                    return self._sampled_call_eager(args, kwargs, n, generator, chunk_size, rec, log_probs)
                return self._sampled_call(args, kwargs, n, generator, chunk_size, None, log_probs)
        except RuntimeError as exc:
            if "setup_context" in str(exc) and torch._C._are_functorch_transforms_active():
                raise RuntimeError(
                    f"{type(self).__name__}: a sampled call cannot run inside a torch.func transform (grad, "
                    "jacrev, jvp, or a torch.vmap over the model): its draws are autograd Functions that "
                    "functorch cannot transform. Take gradients with torch.autograd.grad / .backward(), or "
                    "use bf.predict(..., linearized=True) for the Jacobian-based predictive") from exc
            raise

    # -- sites -----------------------------------------------------------------------------
    def bayesian_sites(self) -> list[Site]:
        """Every Bayesian tensor of this model (tied parameters once)."""
        return list(iter_sites(self))

    def kl_divergence(self) -> Tensor:
        """Closed-form KL(q || prior) summed over all sites (``ValueError`` where none exists)."""
        kls = [analytic_kl(s) for s in iter_sites(self)]
        return torch.stack(kls).sum() if kls else torch.zeros(())

    # -- sampling --------------------------------------------------------------------------
    def _draw(self, n: int, generator: torch.Generator | None, with_logp: bool,
              seeds: dict[str, int] | None = None, offset: int = 0) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        """Weight samples by qualified name, and log prior / log q ``(n,)`` and analytic KL.

        ``seeds`` (filled on first use, one draw from ``generator`` per sampled tensor) and
        ``offset`` select samples ``offset .. offset + n`` of one call's noise, for families
        that draw block-seeded noise (``chunked_draws``); others draw afresh from ``generator``.
        """
        weights, terms, zeros, kl = self._draws(n, generator, with_logp, seeds, offset)
        return (weights, *_fold(terms, {}, zeros), kl)

    # Eager under torch.compile: one draw per tensor through the threaded noise kernel; tracing
    # it would only recompile per tensor shape. The model's own forward is what compiles.
    @torch.compiler.disable
    def _draws(self, n: int, generator: torch.Generator | None, with_logp: bool,
               seeds: dict[str, int] | None = None, offset: int = 0,
               defer: dict[str, Callable[[], tuple[Tensor, Any, Any]]] | None = None
               ) -> tuple[dict[str, Tensor], list[Any], Tensor, Tensor]:
        """What :meth:`_draw` draws, with the log densities still per site (``terms``, for
        :func:`_fold`), and ``zeros`` ``(n,)``. ``defer`` (a dict): seeded sites are not drawn
        but left there as callables, to be drawn where the forward first reads them
        (``recompute_samples``); their terms are their names. Inside ``bf.predict`` a repeated
        identical eval request returns the kept samples (``_reuse``: bit for bit the same)."""
        seeds = {} if seeds is None else seeds
        reuse = _reuse.active(self)
        if reuse is not None and generator is not None and not with_logp and defer is None:
            fresh = partial(self._fresh_draws, n, generator, False, seeds, offset)
            return reuse.fetch(n, generator, seeds, offset, fresh)
        return self._fresh_draws(n, generator, with_logp, seeds, offset, defer)

    def _fresh_draws(self, n: int, generator: torch.Generator | None, with_logp: bool, seeds: dict[str, int],
                     offset: int = 0, defer: dict[str, Callable[[], tuple[Tensor, Any, Any]]] | None = None
                     ) -> tuple[dict[str, Tensor], list[Any], Tensor, Tensor]:
        begin_draws()
        weights: dict[str, Tensor] = {}
        terms: list[Any] = []  # per site, in site order: (log p, log q or None), or a deferred site's name
        kl = None
        tied = _tied_ids(self)
        for site in iter_sites(self):
            spec, mean = site.spec, site.mean
            if site.sampled_in_layer(id(mean) in tied) and not spec.variational.deterministic:
                # Sampled inside the layer (local / Flipout, embedding rows): closed-form KL.
                if with_logp:
                    k = spec.variational.kl_to(spec.prior, mean, site.vparams(), site.pbuffers())
                    k = analytic_kl(site) if k is None else k
                    kl = k if kl is None else kl + k
                continue
            if spec.variational.deterministic:
                if with_logp:
                    terms.append((spec.prior.log_prob(mean, site.pbuffers()).sum().expand(n), None))
                continue
            extra = {}
            if spec.variational.chunked_draws:
                if site.qualname not in seeds:
                    seeds[site.qualname] = draw_seed(generator)
                extra = {"seed": seeds[site.qualname], "offset": offset}
            sample = partial(spec.variational.sample_with_prior, mean, site.vparams(), spec.prior,
                             site.pbuffers(), n, generator, with_logp, **extra)
            if defer is not None and spec.variational.chunked_draws:
                defer[site.qualname] = sample  # seeded: drawn at first use, the same samples
                if with_logp:
                    terms.append(site.qualname)
                continue
            w, lp, lq = sample()
            weights[site.qualname] = w
            if with_logp:
                terms.append((lp, lq))
        ref = next(iter(self.parameters()), torch.zeros(()))
        zeros = torch.zeros(n, dtype=torch.float32 if not ref.is_floating_point() else ref.dtype,
                            device=ref.device)
        return weights, terms, zeros, zeros.new_zeros(()) if kl is None else kl

    def _locations(self, weights: dict[str, Tensor], writeback: list[tuple[nn.Module, str, Tensor, str]]
                   ) -> list[tuple[dict, str, str]]:
        """Every (tensor store, attribute, sample key) to substitute: tied parameters and modules
        registered under several names are each swapped exactly once."""
        locs: list[tuple[dict, str, str]] = [(mod._parameters, attr, key) for mod, attr, key in self._slots(weights)]
        locs += [(mod._buffers, key, qual) for mod, key, _, qual in writeback]
        return locs

    def _slots(self, keys: Iterable[str]) -> list[tuple[nn.Module, str, str]]:
        """Every (module, parameter attribute, key) holding the parameters named ``keys``."""
        key_of = {id(self.get_parameter(k)): k for k in keys}
        if not key_of:
            return []
        return [(mod, attr, key_of[id(p)]) for mod in self.modules() for attr, p in mod._parameters.items()
                if p is not None and id(p) in key_of]

    def _sampled_call(self, args: tuple, kwargs: dict, n: int, generator: torch.Generator | None,
                      chunk_size: int | None, recompute: SampleRecompute | None = None,
                      log_probs: bool = True) -> Any:
        with_logp = self.training
        # A model whose prior an optimiser applies (bf.optim.IVON sets _prior_in_optimizer): no loss
        # reads the log densities (ELBOLoss refuses a KL term, NLLLoss has none), so none are
        # computed (per weight, a pass and a dot product in the draw and three passes in backward);
        # the outputs still carry the KL information, with log_probs None.
        # log_probs=False (the caller's loss takes the closed-form KL, ELBOLoss(kl="analytic")): the
        # same, on request; the outputs carry the closed form and log_probs None.
        drawn_logp = with_logp and log_probs and not self.__dict__.get("_prior_in_optimizer")
        seeds: dict[str, int] = {}
        structure: dict[str, Any] = {}
        # chunk_size: the weights are drawn chunk by chunk too, so memory holds at most
        # chunk_size weight samples (where nothing keeps them for backward). On CPU the
        # block-seeded noise makes a chunked call draw exactly the unchunked call's weights.
        step = n if chunk_size is None else min(chunk_size, n)
        # The weights' seeds come off the generator before the in-forward seed (so `_draw(n, g)`
        # alone reproduces a call's weights): draw the first chunk first.
        # recompute_samples: seeded sites are drawn where the forward first reads them (see
        # _evaluate), so no sample outlives its use; ``defer`` holds their draws, per chunk.
        defer = None if recompute is None else {}
        drawn = self._draws(step, generator, drawn_logp, seeds, 0, defer)
        # In-forward randomness (dropout, local reparameterisation) follows the explicit
        # generator when one is given, and the global RNG otherwise.
        rng = nullcontext()
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            stream = forward_stream()  # bf.predict(dropout=True): one stream per batch (_state)
            if stream:
                seed = (seed + stream * _OFFSET_STRIDE) % 2**62
            rng = _seeded(seed)
        parts: list[list[Tensor]] = []
        lps: list[Tensor] = []
        lqs: list[Tensor] = []
        kl: Tensor | None = None
        bn_update = BatchNormUpdate()  # each chunk starts from the same stored statistics
        with _active(), rng:
            for start in range(0, n, step):
                k = min(step, n - start)
                if drawn is None:
                    defer = None if recompute is None else {}
                    drawn = self._draws(k, generator, drawn_logp, seeds, start, defer)
                weights, terms, zeros, chunk_kl = drawn
                kl = chunk_kl if kl is None else kl  # the closed-form part does not depend on the draws
                sink: dict[str, tuple[Any, Any]] = {}  # (log p, log q) of each deferred site drawn
                tensors, writeback = self._evaluate(args, kwargs, k, weights, structure, defer, sink)
                for q in terms:
                    if isinstance(q, str) and q not in sink:  # not read by this forward: drawn for its densities
                        sink[q] = defer[q]()[1:]
                log_p, log_q = _fold(terms, sink, zeros)
                if recompute is not None:
                    recompute.release()  # views saved of this chunk's samples keep their recipes
                lps.append(log_p)
                lqs.append(log_q)
                del weights
                drawn = None  # the next chunk draws its own; this one's samples can go
                parts.append(tensors)
                bn_update.add(writeback)
        bn_update.commit(n)
        tensors = parts[0] if len(parts) == 1 else [torch.cat(col) for col in zip(*parts)]
        leaves: list[Any] = list(tensors)
        for i, x in structure["static"]:
            leaves.insert(i, x)
        if with_logp:
            lp = torch.stack([torch.cat(lps), torch.cat(lqs)], dim=1) if drawn_logp else None
            for t in tensors:
                t.log_probs = lp
                t.kl_analytic = kl
                t.kl_closed_form = self.kl_divergence
                if t.grad_fn is not None:
                    # Wrappers that replace the output tensors drop these Python attributes
                    # (DistributedDataParallel with find_unused_parameters=True or
                    # static_graph=True); the autograd node keeps them: see vi_attributes().
                    t.grad_fn.metadata[_VI_KEY] = (lp, kl, self.kl_divergence)
        return tree_unflatten(leaves, structure["spec"])

    _sampled_call_eager = torch.compiler.disable(_sampled_call)

    def _evaluate(self, args: tuple, kwargs: dict, n: int, weights: dict[str, Tensor], structure: dict[str, Any],
                  defer: dict[str, Callable[[], tuple[Tensor, Any, Any]]] | None = None,
                  sink: dict[str, tuple[Any, Any]] | None = None,
                  ) -> tuple[list[Tensor], list[tuple[nn.Module, str, Tensor, str]]]:
        """The forward for ``n`` drawn weight sets: one vmap call, or a loop where vmap cannot run.

        ``defer``: sites drawn at their first use inside the vmapped forward (their log densities
        go to ``sink``); the loop fallback draws them all first.

        Where the vmapped call raises, the same call runs sample by sample: if that raises too,
        its error is the user's (it reads as the point model's) and propagates, and nothing is
        remembered; if it succeeds, vmap's error was vmap's limit: the samples are returned with a
        warning, and a cause that vmap names as its own (data-dependent control flow, a missing
        batching rule) is remembered, so later calls go straight to the loop.
        """
        bn_batched, writeback = batchnorm_state(self, n)
        batched = {**weights, **bn_batched}
        locations = self._locations(weights, writeback)
        lazy_slots = self._slots(defer) if defer else []

        def one(sample_tensors: dict[str, Tensor], _index: Tensor | None = None) -> list[Tensor]:
            lazy = nullcontext() if not lazy_slots else _drawn_at_use(lazy_slots, _index, defer, sink)
            with _swapped(locations, sample_tensors), lazy, vmap_rules(_index):
                out = self(*args, **kwargs)
            leaves, spec = tree_flatten(out)
            structure["spec"] = spec
            structure["static"] = [(i, x) for i, x in enumerate(leaves) if not isinstance(x, Tensor)]
            return [x for x in leaves if isinstance(x, Tensor)]

        failure = self._vmap_failure
        if failure is None:
            try:
                # The sample index gives vmap a batched input even when no weight is sampled.
                return torch.vmap(one, randomness="different")(batched, torch.arange(n)), writeback
            except (PointModelError, torch.OutOfMemoryError):
                raise  # the user's error as the point model words it; memory: chunk_size= bounds it
            except Exception as exc:  # decided below: the loop either runs or raises the user's error
                failure, known = _vmap_cause(exc)
            bn_batched, writeback = batchnorm_state(self, n)  # discard partial updates
        else:
            known = True
        if lazy_slots:  # the loop needs every sample up front (the same seeds: the same samples)
            assert defer is not None and sink is not None
            weights = dict(weights)
            for q, draw in defer.items():
                weights[q], *logp = draw()
                sink[q] = tuple(logp)
            lazy_slots = []
        batched = {**weights, **bn_batched}
        locations = self._locations(weights, writeback)
        per = [one({k: v[i] for k, v in batched.items()}) for i in range(n)]  # a user error raises here
        if known:
            self._vmap_failure = failure
        warnings.warn(
            f"{type(self).__name__}: torch.vmap cannot run this model ({failure}); "
            f"evaluating the {n} samples one by one (slower, same result)",
            RuntimeWarning, stacklevel=4,
        )
        return [torch.stack(col) for col in zip(*per)], writeback


def _fold(terms: list[Any], drawn: dict[str, tuple[Any, Any]], zeros: Tensor) -> tuple[Tensor, Tensor]:
    """``(log p, log q)`` summed over the sites' terms in site order (a deferred site's name is
    looked up in ``drawn``); ``zeros`` where there is none."""
    log_p = log_q = None
    for t in terms:
        lp, lq = drawn[t] if isinstance(t, str) else t
        log_p = lp if log_p is None else log_p + lp
        if lq is not None:
            log_q = lq if log_q is None else log_q + lq
    return zeros if log_p is None else log_p, zeros if log_q is None else log_q


class _LazyParameters(dict):
    """A module's ``_parameters`` for one vmapped forward: reading a deferred site (``module.weight``
    goes through ``__getitem__``) draws its samples then, as a tensor batched over the samples.
    Iteration still sees the means (``next(module.parameters()).dtype`` and the like)."""

    def __init__(self, base: dict, getters: dict[str, Callable[[], Tensor]]) -> None:
        super().__init__(base)
        self._getters = getters

    def __getitem__(self, key: str) -> Any:
        get = self._getters.get(key)
        return get() if get is not None else dict.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default


class _UseDraw(torch.autograd.Function):
    """Draws one site's samples inside ``torch.vmap``: its vmap rule runs ``draw()`` on the
    unbatched parameters (one vectorised, seeded draw of all samples, recorded by autograd as
    usual) and hands the ``(S, *shape)`` result back to vmap as a batched tensor."""

    @staticmethod
    def forward(index: Tensor, draw: Callable[[], Tensor]) -> Tensor:
        raise RuntimeError("bayesify draws a deferred weight sample only inside torch.vmap")

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: tuple, index: Tensor, draw: Callable[[], Tensor]) -> tuple[Tensor, int]:
        return draw(), 0


@contextmanager
def _drawn_at_use(slots: list[tuple[nn.Module, str, str]], index: Tensor | None,
                  defer: dict[str, Callable[[], tuple[Tensor, Any, Any]]] | None,
                  sink: dict[str, tuple[Any, Any]] | None) -> Iterator[None]:
    """Deferred sites are drawn when the forward reads them. A sample is reused while something
    still holds it (a weight read twice in one forward); once dropped it is not kept (that is
    the point), and a later read draws it again: the same seeds give the same samples, and
    autograd sums both reads' gradients. The log densities are the latest draw's: a read that
    only looks at metadata (T5's ``self.weight.dtype`` checks) leaves a draw nothing uses, and
    the weight's whole gradient, data and density terms, then goes through one draw as without
    recompute (bit for bit), not in parts."""
    assert index is not None and defer is not None and sink is not None
    held: dict[str, weakref.ref] = {}

    def getter(key: str) -> Callable[[], Tensor]:
        def draw() -> Tensor:  # runs outside vmap's batching: plain tensors
            w, *logp = defer[key]()
            sink[key] = tuple(logp)  # the latest draw's: an earlier, dropped one is unused
            return w

        def get() -> Tensor:
            w = held[key]() if key in held else None
            if w is None:
                w = _UseDraw.apply(index, draw)  # (operands are pytree-mapped: no dict among them)
                held[key] = weakref.ref(w)
            return w
        return get

    by_module: dict[int, tuple[nn.Module, dict[str, Callable[[], Tensor]]]] = {}
    for mod, attr, key in slots:
        by_module.setdefault(id(mod), (mod, {}))[1][attr] = getter(key)
    swapped = []
    try:
        for mod, getters in by_module.values():
            swapped.append((mod, mod.__dict__["_parameters"]))
            mod.__dict__["_parameters"] = _LazyParameters(mod._parameters, getters)
        yield
    finally:
        for mod, params in reversed(swapped):
            mod.__dict__["_parameters"] = params


_VI_KEY = "bayesify.vi"


def _tied_ids(root: nn.Module) -> set[int]:
    """ids of parameters registered in more than one module slot (tied weights)."""
    seen: set[int] = set()
    tied: set[int] = set()
    for mod in root.modules():
        for p in mod._parameters.values():
            if p is not None:
                (tied if id(p) in seen else seen).add(id(p))
    return tied


@contextmanager
def _fsdp_gathered(root: nn.Module) -> Iterator[None]:
    """Keep every parameter sharded by FSDP2 (``fully_shard``) whole for one sampled call.

    The weight samples are drawn before the forward (and its FSDP pre-forward hooks)
    runs, so every mean must be gathered first; and no module may reshard in between
    (after a chunk of samples, or one sample of the loop fallback), because FSDP's next
    all-gather would put the means back in place of the substituted samples. FSDP
    reshards after backward as usual; a call without gradients reshards at its end.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can be sharded
    cls = getattr(fsdp, "FSDPModule", None)
    mods = [m for m in root.modules() if isinstance(m, cls)] if cls is not None else []
    if not mods:
        yield
        return
    held = []
    for mod in mods:
        mod.unshard()  # a no-op where already unsharded
        for group in getattr(mod._get_fsdp_state(), "_fsdp_param_groups", ()):
            if hasattr(group, "post_forward_mesh_info"):
                held.append((group, group.post_forward_mesh_info))
                group.post_forward_mesh_info = None  # i.e. reshard_after_forward=False
    try:
        yield
    finally:
        for group, info in held:
            group.post_forward_mesh_info = info
        if not torch.is_grad_enabled():
            for mod in mods:
                mod.reshard()


def vi_attributes(t: Tensor) -> tuple[Tensor, Any, Callable[[], Tensor] | None] | None:
    """``(log_probs, kl_analytic, kl_closed_form)`` of a sampled training-mode output, else None.

    Read from the tensor's attributes, or, where a wrapper replaced the tensor (the
    ``_DDPSink`` of ``DistributedDataParallel(find_unused_parameters=True)`` or
    ``static_graph=True``), from the autograd node of the original output.
    """
    lp = getattr(t, "log_probs", None)
    fn = getattr(t, "kl_closed_form", None)
    if lp is not None or fn is not None:  # log_probs None: a model whose prior its optimiser applies
        return lp, getattr(t, "kl_analytic", 0.0), fn
    node = t.grad_fn
    if node is None:
        return None
    candidates = [node]
    if node.name() == "_DDPSinkBackward":
        candidates += [nxt for nxt, _ in node.next_functions if nxt is not None]
    for cand in candidates:
        info = cand.metadata.get(_VI_KEY)
        if info is not None:
            return info
    return None


@contextmanager
def _swapped(locations: list[tuple[dict, str, str]], tensors: dict[str, Tensor]) -> Iterator[None]:
    """Substitute sampled tensors into the model for one forward (as functional_call does,
    but each storage slot exactly once, so aliased modules are restored correctly)."""
    saved = []
    try:
        for store, attr, key in locations:
            saved.append((store, attr, store[attr]))
            store[attr] = tensors[key]
        yield
    finally:
        for store, attr, old in reversed(saved):
            store[attr] = old


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


#: Phrases of the errors torch.vmap raises about itself (its own limits, not the model's).
_VMAP_MARKERS = ("vmap", "batching rule", "batchedtensor", "batched tensor", "functorch")


def _vmap_cause(exc: BaseException) -> tuple[str, bool]:
    """A short cause for ``exc``, raised by the vmapped call, and whether vmap names it as its
    own limit (then it does not depend on the inputs: remembered once the loop confirms it)."""
    text = str(exc).strip()
    first = text.splitlines()[0][:200] if text else ""
    known = any(m in text.lower() for m in _VMAP_MARKERS)
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__, known
