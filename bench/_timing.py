"""Shared timing helper of the bench scripts: warm up, synchronize, time, repeat."""

from __future__ import annotations

import time


def time_call(be, fn, repeat: int, warmup: int = 1) -> list[float]:
    """Wall times of ``repeat`` calls of ``fn()`` after ``warmup`` untimed ones.

    The device is synchronized before reading the clock on either side of each call, so
    CuPy's asynchronous launches are fully counted.
    """
    for _ in range(warmup):
        fn()
    be.synchronize()
    times = []
    for _ in range(repeat):
        be.synchronize()
        t0 = time.perf_counter()
        fn()
        be.synchronize()
        times.append(time.perf_counter() - t0)
    return times
