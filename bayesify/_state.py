"""Whether a sampled call runs on this thread.

The outermost :class:`~bayesify.module.VIModule` marks its sampled call here; layers read
:func:`sampling_active` to decide whether to sample (inner ``VIModule`` s just run their
forward). The flag is per thread: another thread calling the same code meanwhile sees False.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

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
