"""``VIModule``: the base class whose outermost instance owns the ``samples`` argument.

Data flow of one sampled forward (all in :meth:`VIModule._sampled_call`):

1. draw ``samples`` weight sets for every site at once, ``(S, *shape)`` per site,
   with their prior / variational log densities ``(S,)`` (outside vmap: one
   vectorised draw per tensor, an optional explicit ``torch.Generator``);
2. run the module's own forward under ``torch.vmap`` over the sample dimension,
   substituting the samples with ``torch.func.functional_call``; parameters that
   are not Bayesian are shared, never copied per sample;
3. return every output tensor with a leading sample dimension and, in training
   mode, ``log_probs`` ``(S, 2)`` (prior, variational) and ``kl_analytic`` attached.

Where vmap cannot run the model, the same draws are evaluated one by one with a
warning naming the cause.

BatchNorm in training mode: each sample normalises with its own batch
statistics; the running statistics move by the *mean over samples* of the
per-sample updates (identical to the point model's update when the samples agree).
"""

from __future__ import annotations

import sys
import threading
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._normal import draw_seed
from .sites import Site, analytic_kl, iter_sites

__all__ = ["VIModule", "sampling_active", "vi_attributes", "DEFAULT_SAMPLES"]

DEFAULT_SAMPLES = 10

_STATE = threading.local()


def sampling_active() -> bool:
    """True while an outer :class:`VIModule` is evaluating its samples."""
    return getattr(_STATE, "active", False)


@contextmanager
def _active() -> Iterator[None]:
    prev = sampling_active()
    _STATE.active = True
    try:
        yield
    finally:
        _STATE.active = prev


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
    ``generator=`` and ``chunk_size=`` on top of its forward's own arguments;
    inner ones just run their forward.

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
                 chunk_size: int | None = None, **kwargs: Any) -> Any:
        if sampling_active():
            if samples is not None:
                raise ValueError(
                    "samples= is owned by the outermost VIModule; do not pass it to an inner module"
                )
            return super().__call__(*args, **kwargs)
        if self._means_outside_sampling and samples is None and generator is None and chunk_size is None:
            return super().__call__(*args, **kwargs)  # the parameters hold the posterior means
        n = DEFAULT_SAMPLES if samples is None else check_samples(samples)
        check_optional_positive_int("chunk_size", chunk_size)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        with _fsdp_gathered(self):
            return self._sampled_call(args, kwargs, n, generator, chunk_size)

    # -- sites -----------------------------------------------------------------------------
    def bayesian_sites(self) -> list[Site]:
        """Every Bayesian tensor of this model (tied parameters once)."""
        return list(iter_sites(self))

    def kl_divergence(self) -> Tensor:
        """Closed-form KL(q || prior) summed over all sites (``ValueError`` where none exists)."""
        kls = [analytic_kl(s) for s in iter_sites(self)]
        return torch.stack(kls).sum() if kls else torch.zeros(())

    # -- sampling --------------------------------------------------------------------------
    # Eager under torch.compile: one draw per tensor through the threaded noise kernel; tracing
    # it would only recompile per tensor shape. The model's own forward is what compiles.
    @torch.compiler.disable
    def _draw(self, n: int, generator: torch.Generator | None, with_logp: bool,
              seeds: dict[str, int] | None = None, offset: int = 0
              ) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        """Weight samples by qualified name, and log prior / log q ``(n,)`` and analytic KL.

        ``seeds`` (filled on first use, one draw from ``generator`` per sampled tensor) and
        ``offset`` select samples ``offset .. offset + n`` of one call's noise, for families
        that draw block-seeded noise (``chunked_draws``); others draw afresh from ``generator``.
        """
        seeds = {} if seeds is None else seeds
        weights: dict[str, Tensor] = {}
        log_p = log_q = kl = None
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
                    lp = spec.prior.log_prob(mean, site.pbuffers()).sum().expand(n)
                    log_p = lp if log_p is None else log_p + lp
                continue
            extra = {}
            if spec.variational.chunked_draws:
                if site.qualname not in seeds:
                    seeds[site.qualname] = draw_seed(generator)
                extra = {"seed": seeds[site.qualname], "offset": offset}
            w, lp, lq = spec.variational.sample_with_prior(mean, site.vparams(), spec.prior, site.pbuffers(),
                                                           n, generator, with_logp, **extra)
            weights[site.qualname] = w
            if with_logp:
                log_p = lp if log_p is None else log_p + lp
                log_q = lq if log_q is None else log_q + lq
        ref = next(iter(self.parameters()), torch.zeros(()))
        zeros = torch.zeros(n, dtype=torch.float32 if not ref.is_floating_point() else ref.dtype,
                            device=ref.device)
        return (weights, zeros if log_p is None else log_p, zeros if log_q is None else log_q,
                zeros.new_zeros(()) if kl is None else kl)

    def _batchnorm_state(self, n: int) -> tuple[dict[str, Tensor], list[tuple[nn.Module, str, Tensor, str]]]:
        """Per-sample copies of BatchNorm running statistics updated in this forward."""
        batched: dict[str, Tensor] = {}
        writeback: list[tuple[nn.Module, str, Tensor, str]] = []
        for prefix, mod in self.named_modules():
            if isinstance(mod, _BatchNorm) and mod.training and mod.track_running_stats:
                for key in ("running_mean", "running_var", "num_batches_tracked"):
                    buf = mod._buffers.get(key)
                    if buf is None:
                        continue
                    copy = buf.unsqueeze(0).repeat(n, *([1] * buf.dim()))
                    batched[f"{prefix}.{key}" if prefix else key] = copy
                    writeback.append((mod, key, copy, f"{prefix}.{key}" if prefix else key))
        return batched, writeback

    def _locations(self, weights: dict[str, Tensor], writeback: list[tuple[nn.Module, str, Tensor, str]]
                   ) -> list[tuple[dict, str, str]]:
        """Every (tensor store, attribute, sample key) to substitute: tied parameters and modules
        registered under several names are each swapped exactly once."""
        key_of = {id(self.get_parameter(k)): k for k in weights}
        locs: list[tuple[dict, str, str]] = []
        if key_of:
            for mod in self.modules():
                for attr, p in mod._parameters.items():
                    if p is not None and id(p) in key_of:
                        locs.append((mod._parameters, attr, key_of[id(p)]))
        locs += [(mod._buffers, key, qual) for mod, key, _, qual in writeback]
        return locs

    def _sampled_call(self, args: tuple, kwargs: dict, n: int, generator: torch.Generator | None,
                      chunk_size: int | None) -> Any:
        with_logp = self.training
        seeds: dict[str, int] = {}
        structure: dict[str, Any] = {}
        # chunk_size: the weights are drawn chunk by chunk too, so memory holds at most
        # chunk_size weight samples (where nothing keeps them for backward). On CPU the
        # block-seeded noise makes a chunked call draw exactly the unchunked call's weights.
        step = n if chunk_size is None else min(chunk_size, n)
        # The weights' seeds come off the generator before the in-forward seed (so `_draw(n, g)`
        # alone reproduces a call's weights): draw the first chunk first.
        drawn = self._draw(step, generator, with_logp, seeds, 0)
        # In-forward randomness (dropout, local reparameterisation) follows the explicit
        # generator when one is given, and the global RNG otherwise.
        rng = nullcontext()
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            rng = _seeded(seed)
        parts: list[list[Tensor]] = []
        lps: list[Tensor] = []
        lqs: list[Tensor] = []
        kl: Tensor | None = None
        # BatchNorm running stats: each chunk starts from the same stored stats; the update
        # is the mean over all samples (num_batches_tracked: the same in every sample).
        bn_sum: dict[tuple[int, str], tuple[nn.Module, str, Tensor]] = {}
        with _active(), rng:
            for start in range(0, n, step):
                k = min(step, n - start)
                if drawn is None:
                    drawn = self._draw(k, generator, with_logp, seeds, start)
                weights, log_p, log_q, chunk_kl = drawn
                kl = chunk_kl if kl is None else kl  # the closed-form part does not depend on the draws
                lps.append(log_p)
                lqs.append(log_q)
                tensors, writeback = self._evaluate(args, kwargs, k, weights, structure)
                del weights
                drawn = None  # the next chunk draws its own; this one's samples can go
                parts.append(tensors)
                for mod, key, copy, _ in writeback:
                    part = copy[0] if key == "num_batches_tracked" else copy.detach().sum(0)
                    if (id(mod), key) in bn_sum and key != "num_batches_tracked":
                        part = bn_sum[(id(mod), key)][2] + part
                    bn_sum[(id(mod), key)] = (mod, key, part)
        for mod, key, total in bn_sum.values():
            with torch.no_grad():
                mod._buffers[key].copy_(total if key == "num_batches_tracked" else total / n)
        tensors = parts[0] if len(parts) == 1 else [torch.cat(col) for col in zip(*parts)]
        leaves: list[Any] = list(tensors)
        for i, x in structure["static"]:
            leaves.insert(i, x)
        if with_logp:
            lp = torch.stack([torch.cat(lps), torch.cat(lqs)], dim=1)
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

    def _evaluate(self, args: tuple, kwargs: dict, n: int, weights: dict[str, Tensor], structure: dict[str, Any]
                  ) -> tuple[list[Tensor], list[tuple[nn.Module, str, Tensor, str]]]:
        """The forward for ``n`` drawn weight sets: one vmap call, or a loop where vmap cannot run."""
        bn_batched, writeback = self._batchnorm_state(n)
        batched = {**weights, **bn_batched}
        locations = self._locations(weights, writeback)

        def one(sample_tensors: dict[str, Tensor], _index: Tensor | None = None) -> list[Tensor]:
            with _swapped(locations, sample_tensors):
                out = self(*args, **kwargs)
            leaves, spec = tree_flatten(out)
            structure["spec"] = spec
            structure["static"] = [(i, x) for i, x in enumerate(leaves) if not isinstance(x, Tensor)]
            return [x for x in leaves if isinstance(x, Tensor)]

        if self._vmap_failure is None:
            try:
                # The sample index gives vmap a batched input even when no weight is sampled.
                return torch.vmap(one, randomness="different")(batched, torch.arange(n)), writeback
            except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
                reason = _vmap_reason(exc)
                if reason is None:
                    raise
                self._vmap_failure = reason
                bn_batched, writeback = self._batchnorm_state(n)  # discard partial updates
                batched = {**weights, **bn_batched}
                locations = self._locations(weights, writeback)
        warnings.warn(
            f"{type(self).__name__}: torch.vmap cannot run this model ({self._vmap_failure}); "
            f"evaluating the {n} samples one by one (slower, same result)",
            RuntimeWarning, stacklevel=4,
        )
        per = [one({k: v[i] for k, v in batched.items()}) for i in range(n)]
        return [torch.stack(col) for col in zip(*per)], writeback


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
    if lp is not None:
        return lp, getattr(t, "kl_analytic", 0.0), getattr(t, "kl_closed_form", None)
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


_VMAP_MARKERS = (
    "vmap",
    "batching rule",
    "data-dependent control flow",
    "Batched tensor",
    "BatchedTensor",
    "functorch",
    "item()",
    "is not implemented for",
)


def _vmap_reason(exc: BaseException) -> str | None:
    """A short cause when ``exc`` comes from vmap's limits; None for genuine model errors."""
    text = str(exc)
    if any(m.lower() in text.lower() for m in _VMAP_MARKERS):
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return f"{type(exc).__name__}: {first[:200]}"
    return None
