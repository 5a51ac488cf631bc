"""Which kernel a per-sample layer runs, decided by measurement (like ``torch.backends.cudnn.benchmark``).

Where bayesify has more than one way to compute a layer for all weight samples at once (today:
a ``conv2d`` on a small map, as PyTorch's own vmap rule, a grouped convolution, as one GEMM
over the unfolded inputs, or as one plain convolution per sample; see :mod:`bayesify._batched`), the fastest one depends on the CPU,
the BLAS / oneDNN build and the thread count: a threshold tuned on one machine was 5x faster
there and 1.4x slower on another of the same kind. So on first use of a layer shape (with its
sample count, dtype, device and whether gradients are needed) every candidate is timed once on
fresh dummy tensors of the same shapes, in a helper thread (outside the caller's vmap, autograd
graph, autocast and compile state), and the fastest is kept for the process::

    import bayesify as bf
    bf.backends.autotune = True         # or BAYESIFY_AUTOTUNE=1 (off by default, see below)
    logging.getLogger("bayesify").setLevel(logging.DEBUG)   # each choice, with its timings

With ``autotune`` off each layer gets the fixed rule (``GEMM_MAX_POSITIONS`` in
:mod:`bayesify._batched`: the GEMM for at most 4 output positions). The trials run only in
eager mode: under ``torch.compile`` and autocast the per-sample kernels are off anyway.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Any, Callable, Hashable

import torch

__all__ = ["autotune", "choices", "clear", "trial_count", "REPEATS"]

_log = logging.getLogger("bayesify")

#: Whether kernel choices are measured or made by the fixed rule (the default, for now: on the one
#: machine measured so far the two tie, 2.96x vs 3.08x of the point step, and a measured choice can
#: differ between processes, so results would differ in the last bits from run to run). Read at
#: each choice, so setting it takes effect at once; ``BAYESIFY_AUTOTUNE=1`` turns it on for a process.
autotune: bool = os.environ.get("BAYESIFY_AUTOTUNE", "0").strip().lower() not in ("0", "false", "no", "off", "")

#: Timed runs of each candidate after one warm-up run (the minimum is kept); candidates alternate
#: run by run, so load from other processes hits them alike.
REPEATS = 3

_lock = threading.Lock()
_choices: dict[Hashable, str] = {}
_timings: dict[Hashable, dict[str, float]] = {}
_fixed_logged: set[Hashable] = set()
_trials = 0


def choices() -> dict[Hashable, tuple[str, dict[str, float]]]:
    """The choices made by measurement in this process: key -> (kernel, seconds per candidate)."""
    with _lock:
        return {k: (v, dict(_timings.get(k, {}))) for k, v in _choices.items()}


def trial_count() -> int:
    """How many measurements (one per key: every candidate timed) this process has run."""
    return _trials


def cached(key: Hashable, default: str) -> str:
    """The choice measured for ``key``, else ``default`` (measures nothing)."""
    return _choices.get(key, default)


def clear() -> None:
    """Forget every choice (the next use of each shape measures again)."""
    with _lock:
        _choices.clear()
        _timings.clear()
        _fixed_logged.clear()


def choose(key: Hashable, candidates: dict[str, Callable[[], Callable[[], Any]]], fixed: str,
           device: torch.device) -> str:
    """The kernel for ``key``: ``fixed`` (the fixed rule's pick) while :data:`autotune` is off, else
    the candidate whose run took least time: ``candidates[name]()`` makes its dummy inputs and
    returns the run (one forward, or forward and backward, on them), which is timed, measured once per process and key. A candidate whose
    trial raises is out (``fixed`` where all do)."""
    if not autotune:
        if key not in _fixed_logged:
            _fixed_logged.add(key)
            _log.debug("bayesify kernel for %s: %s (fixed rule, autotune off)", _describe(key), fixed)
        return fixed
    choice = _choices.get(key)
    if choice is not None:
        return choice
    with _lock:  # one measurement at a time: trials of other threads would disturb the timings
        choice = _choices.get(key)
        if choice is None:
            times = _measure(candidates, device)
            global _trials
            _trials += 1
            ok = {n: t for n, t in times.items() if math.isfinite(t)}
            # ties go to the fixed rule's pick
            choice = min(ok, key=lambda n: (ok[n], n != fixed)) if ok else fixed
            _timings[key] = times
            _choices[key] = choice
            _log.debug("bayesify kernel for %s: %s (measured: %s)", _describe(key), choice,
                       ", ".join(f"{n} {t * 1e3:.3f} ms" for n, t in times.items()))
    return choice


def _describe(key: Hashable) -> str:
    return " ".join(map(str, key)) if isinstance(key, tuple) else str(key)


def _measure(candidates: dict[str, Callable[[], Callable[[], Any]]], device: torch.device) -> dict[str, float]:
    """Seconds per run of each candidate (min over :data:`REPEATS`, after one warm-up), measured in
    a helper thread: its vmap, autograd, autocast and compile state are fresh, whatever the
    calling thread is inside of (a vmapped forward, an autograd graph being recorded)."""
    times = {name: math.inf for name in candidates}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    threads = torch.get_num_threads()

    def run() -> None:
        torch.set_num_threads(threads)
        live = {}
        for name, make in candidates.items():  # each candidate's own dummy inputs, made before any timing
            try:
                live[name] = make()
            except Exception as exc:  # noqa: BLE001
                _log.debug("bayesify kernel %s cannot be set up for its trial: %s", name, exc)
        for rep in range(REPEATS + 1):
            for name, fn in list(live.items()):
                try:
                    sync()
                    start = time.perf_counter()
                    fn()
                    sync()
                    took = time.perf_counter() - start
                except Exception as exc:  # noqa: BLE001 - a kernel that cannot run here is out
                    _log.debug("bayesify kernel %s fails its trial: %s", name, exc)
                    times[name] = math.inf
                    del live[name]
                    continue
                if rep:  # the first run is the warm-up
                    times[name] = min(times[name], took)

    thread = threading.Thread(target=run, name="bayesify-autotune", daemon=True)
    thread.start()
    thread.join()
    return times
