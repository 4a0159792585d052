"""Out-of-memory fallback for GPU stages: free the pool, retry in row bands, then on the CPU.

A stage that runs out of device memory must not crash a long pipeline: the work can
always be finished, more slowly.  :func:`with_memory_fallback` runs a stage on its
backend and, when (and only when) the device reports an allocation failure,

1. frees CuPy's memory pools and FFT plan cache (cached blocks are often what fills
   the device),
2. if the stage can work on row bands (``banded=``), retries it on the same device in
   4, then 16 bands (each band a fraction of the memory),
3. re-runs the whole stage on the NumPy backend, with a :class:`GpudiffFallbackWarning`,
4. raises :class:`DeviceMemoryError` if even the CPU run runs out of memory.

Any other error passes through untouched: only memory exhaustion is worth a retry.
CuPy is never imported here; its exception classes are recognised by name (and, when
CuPy is already loaded, by ``isinstance``), so this module works on machines without it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Callable, Sequence, TypeVar

from ..errors import DeviceMemoryError, GpudiffFallbackWarning
from .core import Backend, get_backend

__all__ = ["with_memory_fallback", "is_out_of_memory", "free_device_memory", "BAND_COUNTS"]

log = logging.getLogger("gpudiff.backend.fallback")

T = TypeVar("T")

#: Row-band counts tried, in order, before falling back to the CPU.
BAND_COUNTS = (4, 16)

#: CuPy's out-of-memory exception (``cupy.cuda.memory.OutOfMemoryError``) and the CUDA
#: library errors that can mean an allocation failed (then told apart by their message).
_OOM_NAMES = {"OutOfMemoryError"}
#: (CuPy spells them ``CuFFTError``, ``CUBLASError``, ``CUSOLVERError``, ``CuSparseError``,
#: ``CUDARuntimeError``, ``CUDADriverError``: the match is by exact class name.)
_LIB_ERROR_NAMES = {
    "CuFFTError",
    "CUBLASError",
    "CUSOLVERError",
    "CUDARuntimeError",
    "CUDADriverError",
    "CuSparseError",
}
_ALLOC_WORDS = (
    "ALLOC_FAILED",
    "cudaErrorMemoryAllocation",
    "CUDA_ERROR_OUT_OF_MEMORY",
    "out of memory",
)
#: Allocation failures that reach Python as builtin exceptions: CUDA's own error codes in a
#: C++ exception translated by Cython, and Thrust's workspace allocation through CuPy's
#: pool (sort, argsort: ``std::bad_alloc`` surfaces as a builtin ``MemoryError``).
_CUDA_ALLOC_CODES = ("cudaErrorMemoryAllocation", "CUDA_ERROR_OUT_OF_MEMORY")
_CUPY_MODULES = ("cupy", "cupyx", "cupy_backends")


def is_out_of_memory(exc: BaseException) -> bool:
    """True when ``exc`` is a device allocation failure (CuPy, cuFFT, cuBLAS, CUDA runtime).

    Recognised without importing CuPy: by class name and module (``cupy…``), plus
    ``isinstance`` against ``cupy.cuda.memory.OutOfMemoryError`` when CuPy is loaded.
    A host ``MemoryError`` is *not* a device failure: it is left to the caller.  Builtin
    exceptions count only when their message carries a CUDA allocation error code, or is
    a C++ ``std::bad_alloc`` (Thrust's workspace, allocated from CuPy's pool, during a
    device sort): NumPy's own host failures say neither.
    """
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        with contextlib.suppress(AttributeError):
            if isinstance(exc, cupy.cuda.memory.OutOfMemoryError):
                return True
    for cls in type(exc).__mro__:
        if str(getattr(cls, "__module__", "")).split(".")[0] not in _CUPY_MODULES:
            continue
        if cls.__name__ in _OOM_NAMES:
            return True
        if cls.__name__ in _LIB_ERROR_NAMES and any(
            w.lower() in str(exc).lower() for w in _ALLOC_WORDS
        ):
            return True
    if type(exc) in (MemoryError, RuntimeError):  # exactly the builtins Cython translates to
        msg = str(exc)
        if any(w in msg for w in _CUDA_ALLOC_CODES):
            return True
        if isinstance(exc, MemoryError) and "bad_alloc" in msg:
            return True
    return False


def free_device_memory(backend: Backend) -> None:
    """Release CuPy's cached device and pinned blocks and its FFT plans (no-op on the CPU)."""
    if not backend.is_gpu:
        return
    xp = backend.xp
    for release in (
        lambda: xp.get_default_memory_pool().free_all_blocks(),
        lambda: xp.get_default_pinned_memory_pool().free_all_blocks(),
        lambda: xp.fft.config.get_plan_cache().clear(),
    ):
        with contextlib.suppress(Exception):  # best effort: a missing pool is nothing to free
            release()


def _drop_tracebacks(exc: BaseException) -> BaseException:
    """``exc`` without its traceback (nor those of its cause/context chain).

    The frames of a traceback hold the failed attempt's locals, device arrays included;
    kept (for the warning's message), they would stay allocated through the retries,
    since freeing the memory pool releases only unreferenced blocks.
    """
    seen: set = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    return exc


def with_memory_fallback(
    stage: str,
    run: Callable[[Backend], T],
    backend: Backend,
    *,
    banded: Callable[[Backend, int], T] | None = None,
    band_counts: Sequence[int] = BAND_COUNTS,
) -> T:
    """Run ``run(backend)``; on a device out-of-memory error, retry banded, then on the CPU.

    Parameters
    ----------
    stage : str
        Name used in the warning and the error (e.g. ``"AlardLuptonSubtractTask.run"``).
    run : callable ``(Backend) -> result``
        The whole stage on a given backend.  It must not modify its inputs (gpudiff
        stages never do), since it may be called up to three times.
    backend : Backend
        Where to run first.  On the CPU backend ``run`` is simply called.
    banded : callable ``(Backend, n_bands) -> result``, optional
        The same stage done in ``n_bands`` row bands, for stages whose output rows depend
        only on nearby input rows (convolutions; see
        :func:`gpudiff.ops.convolution.process_in_row_bands`); tried with each of
        ``band_counts``.
    band_counts : sequence of int

    Returns
    -------
    The stage's result.  After a CPU fallback its arrays are on the NumPy backend (moving
    them back to a device that just ran out of memory would fail again).

    Warns
    -----
    GpudiffFallbackWarning
        When the stage was finished on the CPU.

    Raises
    ------
    DeviceMemoryError
        Every fallback ran out of memory too.
    """
    try:
        return run(backend)
    except Exception as exc:
        if not backend.is_gpu or not is_out_of_memory(exc):
            raise
        first = _drop_tracebacks(exc)
    log.warning("%s: out of device memory (%s); freeing the memory pool and retrying", stage, first)
    free_device_memory(backend)
    if banded is not None:
        for n in band_counts:
            try:
                result = banded(backend, int(n))
                log.warning(
                    "%s: finished in %d row bands after running out of device memory", stage, n
                )
                return result
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                log.warning("%s: out of device memory in %d row bands too", stage, n)
            free_device_memory(backend)  # after the except block: its traceback is gone
    warnings.warn(
        f"{stage}: out of GPU memory ({type(first).__name__}: {first}); "
        f"{'banded processing failed too; ' if banded is not None else ''}"
        "re-running this stage on the NumPy CPU backend",
        GpudiffFallbackWarning,
        stacklevel=3,
    )
    try:
        return run(get_backend("numpy"))
    except MemoryError as exc:
        raise DeviceMemoryError(
            f"{stage}: out of memory on the GPU ({type(first).__name__}: {first}) and "
            f"on the CPU fallback ({exc}); process smaller images or tiles"
        ) from exc
