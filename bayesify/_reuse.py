"""Weight draws kept across the sampled calls of one ``bf.predict`` (draw once, evaluate every batch).

``bf.predict`` rewinds its generator before each batch, so every batch asks for the *same*
weight samples: without this, each batch re-draws them (the noise draw is about half of an
eval forward on CPU). While :func:`reusing_draws` is active for a model on this thread, its
``VIModule._draws`` looks its request up here first.

A request is answered from the cache only when it is the same request: the same number of
samples and offset, the same generator *state*, the same seeds already taken and no
log densities (eval). A hit returns the kept samples and moves the generator (and the seeds)
to where the fresh draw would have left them, so the call goes on exactly as it would have:
results are bit for bit those of drawing afresh. A kept sample that was modified in place
(its version moved) is dropped and drawn again.

Only up to ``max_bytes`` of samples are kept; past that, requests are drawn afresh as before
(still exact: a miss draws from the generator's current state).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

__all__ = ["REUSE_MAX_BYTES", "reusing_draws"]

#: ``bf.predict`` keeps up to this many bytes of weight samples for its later batches (an unchunked
#: call holds them during each forward anyway); beyond, each batch draws them again (the same
#: values, at the cost of one noise pass per batch).
REUSE_MAX_BYTES = 4 << 30

_LOCAL = threading.local()

#: What ``VIModule._draws`` returns: (weights by name, log-density terms, zeros (n,), analytic KL).
_Drawn = tuple[dict[str, Tensor], list[Any], Tensor, Tensor]


class _Entry:
    def __init__(self, n: int, offset: int, state: Tensor, seeds_in: dict[str, int], drawn: _Drawn,
                 state_out: Tensor, seeds_out: dict[str, int]) -> None:
        self.n, self.offset, self.state, self.seeds_in = n, offset, state, seeds_in
        self.drawn, self.state_out, self.seeds_out = drawn, state_out, seeds_out
        self.versions = [w._version for w in drawn[0].values()]

    def matches(self, n: int, offset: int, state: Tensor, seeds: dict[str, int]) -> bool:
        return (self.n == n and self.offset == offset and self.seeds_in == seeds
                and self.state.shape == state.shape and torch.equal(self.state, state))

    def intact(self) -> bool:
        return [w._version for w in self.drawn[0].values()] == self.versions


class DrawCache:
    """The draws of one model kept for the span of one ``reusing_draws`` block."""

    def __init__(self, model: Any, max_bytes: int) -> None:
        self.model, self.max_bytes = model, max_bytes
        self.entries: list[_Entry] = []
        self.bytes = 0
        self.hits = self.misses = 0

    def fetch(self, n: int, generator: torch.Generator, seeds: dict[str, int], offset: int,
              draw: Callable[[], _Drawn]) -> _Drawn:
        """``draw()`` (which takes its seeds into ``seeds`` and advances ``generator``), or the kept
        result of the same request, with ``generator`` and ``seeds`` moved as ``draw()`` moves them."""
        state = generator.get_state()
        for i, e in enumerate(self.entries):
            if e.matches(n, offset, state, seeds):
                if not e.intact():  # modified in place since: not the draw any more
                    self.bytes -= _nbytes(e.drawn)
                    del self.entries[i]
                    break
                self.hits += 1
                generator.set_state(e.state_out)
                seeds.update(e.seeds_out)
                weights, terms, zeros, kl = e.drawn
                return dict(weights), list(terms), zeros, kl
        self.misses += 1
        seeds_in = dict(seeds)
        drawn = draw()
        size = _nbytes(drawn)
        if self.bytes + size <= self.max_bytes:
            self.bytes += size
            self.entries.append(_Entry(n, offset, state, seeds_in, drawn, generator.get_state(), dict(seeds)))
        return drawn


def _nbytes(drawn: _Drawn) -> int:
    return sum(w.numel() * w.element_size() for w in drawn[0].values())


def active(model: Any) -> DrawCache | None:
    """The cache of ``model`` on this thread, if a :func:`reusing_draws` block for it is open."""
    cache = getattr(_LOCAL, "cache", None)
    return cache if cache is not None and cache.model is model else None


@contextmanager
def reusing_draws(model: Any, max_bytes: int) -> Iterator[DrawCache]:
    """Within the block, repeated identical eval draws of ``model`` on this thread (the same
    generator state) return the kept samples, up to ``max_bytes`` of them; freed at exit."""
    prev = getattr(_LOCAL, "cache", None)
    cache = _LOCAL.cache = DrawCache(model, max_bytes)
    try:
        yield cache
    finally:
        _LOCAL.cache = prev
        cache.entries.clear()
