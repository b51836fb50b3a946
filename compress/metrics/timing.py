"""Wall-clock latency of a callable and the process's peak resident memory."""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def _sync() -> None:
    # CUDA kernels run asynchronously: without a sync the timer would stop at launch time.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def best_seconds(fn: Callable[[], Any], repeats: int = 3) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` after one untimed call (for choosing
    between two implementations at run time, where the minimum is the least noisy)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def best_seconds_alternated(fns: list[Callable[[], Any]], rounds: int = 3,
                            repeats: int = 3) -> list[float]:
    """:func:`best_seconds` of each of ``fns``, in ``rounds`` alternated rounds, the best of
    all: the first calls of a run are slow, and one load spike then decides nothing."""
    best = [math.inf] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], best_seconds(fn, repeats))
    return best


def latency_ms_per_step(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds.

    Args:
        fn: a no-argument callable doing one unit of work (one denoising step).
        repeats: timed calls; the median resists one-off hiccups from other processes.
        warmup: untimed calls first, so lazy initialisation and caches don't count.

    Returns:
        The median of ``repeats`` timings in ms.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(max(warmup, 0)):
        fn()
    _sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB; NaN where it cannot be read.

    ``ru_maxrss`` is in KiB on Linux and in bytes on macOS. Windows has no ``resource`` module:
    there the value is NaN, which the report writes as null ("not measurable").
    """
    try:
        import resource
    except ImportError:
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    unit = 1 if sys.platform == "darwin" else 1024
    return peak * unit / (1024.0 * 1024.0)


def cpu_model() -> str:
    """The CPU's model name (what ``lscpu`` shows), for speed figures to name their machine."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
