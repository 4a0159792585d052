"""Host threads for independent pieces of CPU work (bands, warps, visits, image planes).

NumPy releases the GIL inside its ufunc loops, sorts and reductions, so on the CPU
independent pieces of array work run about N× faster on N cores when each gets a thread.
On a GPU the device already runs in parallel and threads would only contend for it, so
callers pass ``parallel=not backend.is_gpu``.  Every piece must write only its own
outputs: results are then the same bits as a sequential run.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

__all__ = ["cpu_workers", "parallel_map", "run_concurrently"]


def cpu_workers(n_items: int, limit: int | None = None, *, parallel: bool = True) -> int:
    """Threads to use for ``n_items`` pieces: one per core, at most ``limit``; 1 when not
    ``parallel`` or with fewer than two pieces."""
    if not parallel or n_items < 2:
        return 1
    n = min(os.cpu_count() or 1, n_items)
    return max(1, n if limit is None else min(n, int(limit)))


def parallel_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> list:
    """``[fn(x) for x in items]``, on ``workers`` threads when more than one (order kept;
    the first exception is raised)."""
    items = list(items)
    if workers <= 1 or len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def run_concurrently(*calls: Callable[[], Any], parallel: bool = True) -> list:
    """The results of the zero-argument ``calls``, run on one thread each when ``parallel``."""
    return parallel_map(lambda call: call(), calls, cpu_workers(len(calls), parallel=parallel))
