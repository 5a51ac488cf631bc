"""Whether a sampled call runs on this thread.

The outermost :class:`~bayesify.module.VIModule` marks its sampled call here; layers read
:func:`sampling_active` to decide whether to sample (inner ``VIModule`` s just run their
forward). The flag is per thread: another thread calling the same code meanwhile sees False.

A sampled call substitutes its weight samples into the model's parameter slots for the
duration of the forward, so two threads sampling the *same* model object at once would read
each other's samples: :func:`sampled_call_lock` makes such calls take turns (threads sampling
different models run in parallel).
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["sampling_active"]

_STATE = threading.local()


def sampling_active() -> bool:
    """True while an outer :class:`~bayesify.module.VIModule` is evaluating its samples on this thread."""
    return getattr(_STATE, "active", False)


@contextmanager
def _active() -> Iterator[None]:
    prev = sampling_active()
    _STATE.active = True
    try:
        yield
    finally:
        _STATE.active = prev


_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def sampled_call_lock(model: Any) -> threading.RLock:
    """The lock a sampled call of ``model`` holds (one per model object, kept while it lives;
    not stored on the model, which stays picklable and deep-copyable)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def forward_stream() -> int:
    """Which stream of in-forward randomness (dropout masks, per-input noise) a sampled call with
    an explicit generator draws on this thread: 0 (the default) or the index set by
    :func:`in_forward_stream`."""
    return getattr(_STATE, "stream", 0)


@contextmanager
def in_forward_stream(index: int) -> Iterator[None]:
    """Sampled calls in the block derive their in-forward seed from the generator *and* ``index``:
    ``bf.predict(..., dropout=True)`` rewinds the generator before each batch (the same weight
    samples for every batch) but gives batch ``b`` stream ``b``, so the batches' dropout masks are
    independent rather than repeated."""
    prev = forward_stream()
    _STATE.stream = index
    try:
        yield
    finally:
        _STATE.stream = prev
