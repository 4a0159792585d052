"""The array backend: one switch between NumPy/SciPy (CPU) and CuPy (CUDA GPU).

Algorithm code is written once against ``be.xp`` (the array namespace), ``be.fft``,
``be.ndimage`` and ``be.linalg``; a :class:`Backend` bundles those modules with the
three conversions every stage needs (``asarray``, ``asnumpy``, ``synchronize``).

CuPy is imported lazily, here and only here, so ``import gpudiff`` works on machines
without CUDA.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import BackendUnavailableError, InvalidInputError
from .threads import get_num_threads

__all__ = [
    "Backend",
    "BACKEND_NAMES",
    "ENV_VAR",
    "get_backend",
    "resolve_backend",
    "use_backend",
    "available_backends",
    "cuda_device_count",
    "cupy_status",
]

log = logging.getLogger("gpudiff.backend")

#: Environment variable read when no backend is named explicitly.
ENV_VAR = "GPUDIFF_BACKEND"
#: cuFFT plans kept per device (CuPy's default is 16; see ``_cupy_backend``).
_FFT_PLAN_CACHE_SIZE = 64
BACKEND_NAMES = ("auto", "numpy", "cupy")


def _native(a: np.ndarray) -> np.ndarray:
    """Return ``a`` in native byte order (FITS data are big-endian)."""
    if a.dtype.byteorder not in ("=", "|") and not a.dtype.isnative:
        return a.astype(a.dtype.newbyteorder("="))
    return a


@dataclass(frozen=True)
class Backend:
    """An array backend.

    Attributes
    ----------
    name : str
        ``"numpy"`` or ``"cupy"``.
    xp : module
        The array namespace (``numpy`` or ``cupy``).
    fft : module
        FFTs (``scipy.fft`` or ``cupyx.scipy.fft``).
    ndimage : module
        ``scipy.ndimage`` or ``cupyx.scipy.ndimage``.
    linalg : module
        Batched dense linear algebra (``numpy.linalg`` or ``cupy.linalg``); both solve
        stacks of matrices in one call.
    device : int or None
        CUDA device ordinal for CuPy, ``None`` on the CPU.
    """

    name: str
    xp: ModuleType
    fft: ModuleType
    ndimage: ModuleType
    linalg: ModuleType
    device: int | None = None
    _to_device: Callable[[Any], Any] = field(repr=False, compare=False, default=np.asarray)
    _sync: Callable[[], None] = field(repr=False, compare=False, default=lambda: None)

    @property
    def is_gpu(self) -> bool:
        """True for a CUDA backend."""
        return self.name == "cupy"

    @property
    def fft_kwargs(self) -> dict:
        """Extra keyword arguments for ``fft`` calls: scipy.fft gets the thread setting
        (:func:`gpudiff.backend.threads.get_num_threads`) as ``workers``."""
        return {"workers": get_num_threads()} if self.name == "numpy" else {}

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        """Convert ``a`` to an array of this backend.

        Host arrays are first brought to native byte order (a CuPy transfer of a
        big-endian FITS array would otherwise fail or be misread), then cast to
        ``dtype`` if given.  Arrays already on this backend with the right dtype are
        returned without a copy.
        """
        if isinstance(a, np.ndarray) or not hasattr(a, "__cuda_array_interface__"):
            a = _native(np.asarray(a))
            if dtype is not None:
                a = a.astype(dtype, copy=False)
            return self._to_device(a)
        # Already a device array.
        if self.name == "numpy":
            a = self._from_device(a)
            return a if dtype is None else a.astype(dtype, copy=False)
        return a if dtype is None else a.astype(dtype, copy=False)

    @staticmethod
    def _from_device(a: Any) -> np.ndarray:
        return a.get()

    def asnumpy(self, a: Any) -> np.ndarray:
        """Return ``a`` as a NumPy array on the host (no copy if it already is one)."""
        if isinstance(a, np.ndarray):
            return a
        if hasattr(a, "__cuda_array_interface__"):
            return self._from_device(a)
        return np.asarray(a)

    def bincount(self, x: Any, minlength: int, weights: Any = None) -> Any:
        """``xp.bincount(x, weights, minlength)`` for labels known to lie in
        ``[0, minlength)``, without a host sync on a device.

        ``cupy.bincount`` syncs twice per call (a negativity test and ``int(x.max())`` to
        size its output: ``cupy/_statistics/histogram.py``, "This function may
        synchronize the device"); the output size is known here, so a device adds into a
        zeroed table instead (``add.at``: a scatter-add, no sync).  Integer counts
        (int64), or float64 sums of ``weights``, as ``numpy.bincount``.  On the CPU it is
        ``numpy.bincount`` itself.
        """
        return bincount(self.xp, x, minlength, weights)

    def synchronize(self) -> None:
        """Wait for all queued device work (a no-op on the CPU).  Time after this."""
        self._sync()


def bincount(xp: Any, x: Any, minlength: int, weights: Any = None) -> Any:
    """:meth:`Backend.bincount` for code that holds the array namespace ``xp`` only:
    ``numpy.bincount`` when ``xp`` is NumPy, else a scatter-add into a zeroed table of
    ``minlength`` bins (no host sync; every label must lie in ``[0, minlength)``)."""
    if xp is np:
        return np.bincount(x, weights=weights, minlength=minlength)
    if weights is None:
        out = xp.zeros(int(minlength), dtype=xp.int64)
        xp.add.at(out, x, 1)
    else:
        out = xp.zeros(int(minlength), dtype=xp.float64)
        xp.add.at(out, x, weights)
    return out


def _numpy_backend() -> Backend:
    import scipy.fft
    import scipy.ndimage

    return Backend(
        name="numpy",
        xp=np,
        fft=scipy.fft,
        ndimage=scipy.ndimage,
        linalg=np.linalg,
        device=None,
    )


def cupy_status() -> tuple[bool, str]:
    """Tell whether CuPy can run here, and why not if it cannot.

    Returns
    -------
    ok : bool
        True when CuPy imports and at least one CUDA device answers.
    reason : str
        A one-line explanation (device name when ``ok``).
    """
    try:
        import cupy  # noqa: F401  (lazy: only the backend imports CuPy)
    except Exception as exc:  # ImportError, or a broken CUDA library at import time
        return False, f"CuPy is not importable ({type(exc).__name__}: {exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"CuPy imports but CUDA is unusable ({type(exc).__name__}: {exc})"
    if n < 1:
        return False, "CuPy imports but no CUDA device is present"
    try:
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        dev = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    except Exception:
        dev = "CUDA device"
    return True, f"{n} CUDA device(s); current: {dev}"


def cuda_device_count() -> int:
    """Number of CUDA devices CuPy can use here (0 without CuPy or a working device)."""
    if not cupy_status()[0]:
        return 0
    import cupy  # lazy, and only here: the batch layer asks this instead of importing CuPy

    return int(cupy.cuda.runtime.getDeviceCount())


def _cupy_backend() -> Backend:
    ok, reason = cupy_status()
    if not ok:
        raise BackendUnavailableError(
            f"backend 'cupy' was requested but cannot run here: {reason}. "
            "Install gpudiff[cuda12] or gpudiff[cuda13] on a machine with an NVIDIA GPU, "
            "or use backend='numpy'."
        )
    import cupy
    import cupyx.scipy.fft
    import cupyx.scipy.ndimage

    def sync() -> None:
        cupy.cuda.get_current_stream().synchronize()

    # A subtraction + DIA run uses ~26 distinct FFT shapes (padded images, stamps,
    # decorrelation, detection) against CuPy's default plan cache of 16: sized for a run,
    # plans are made once instead of being evicted and rebuilt every call (issue 16).
    try:
        cache = cupy.fft.config.get_plan_cache()
        if cache.get_size() < _FFT_PLAN_CACHE_SIZE:
            cache.set_size(_FFT_PLAN_CACHE_SIZE)
    except AttributeError:  # an older CuPy without the per-device plan cache API
        pass

    return Backend(
        name="cupy",
        xp=cupy,
        fft=cupyx.scipy.fft,
        ndimage=cupyx.scipy.ndimage,
        linalg=cupy.linalg,
        device=cupy.cuda.Device().id,
        _to_device=cupy.asarray,
        _sync=sync,
    )


@functools.lru_cache(maxsize=None)
def _build(name: str) -> Backend:
    if name == "numpy":
        return _numpy_backend()
    if name == "cupy":
        return _cupy_backend()
    # auto
    ok, reason = cupy_status()
    if ok:
        log.info("gpudiff backend 'auto' resolved to 'cupy' (%s)", reason)
        return _cupy_backend()
    log.info("gpudiff backend 'auto' resolved to 'numpy' (%s)", reason)
    return _numpy_backend()


_current: contextvars.ContextVar[Backend | None] = contextvars.ContextVar(
    "gpudiff_backend", default=None
)


def get_backend(name: str | None = None) -> Backend:
    """Return the backend called ``name``.

    Parameters
    ----------
    name : {"auto", "numpy", "cupy"}, optional
        ``None`` means: the backend set by :func:`use_backend` if inside one, else the
        environment variable ``GPUDIFF_BACKEND``, else ``"auto"``.  ``"auto"`` picks
        CuPy when it imports and a CUDA device is present, else NumPy.

    Raises
    ------
    BackendUnavailableError
        ``"cupy"`` was asked for where it cannot run.
    InvalidInputError
        ``name`` is not a known backend.
    """
    if name is None:
        active = _current.get()
        if active is not None:
            return active
        name = os.environ.get(ENV_VAR, "auto") or "auto"
        source = f"environment variable {ENV_VAR}"
    else:
        source = "argument"
    key = str(name).strip().lower()
    if key not in BACKEND_NAMES:
        raise InvalidInputError(
            f"unknown gpudiff backend {name!r} (from {source}); choose one of {BACKEND_NAMES}"
        )
    return _build(key)


def resolve_backend(backend: "Backend | str | None" = None) -> Backend:
    """Turn a ``backend=`` argument (a :class:`Backend`, a name or ``None``) into a Backend."""
    if isinstance(backend, Backend):
        return backend
    return get_backend(backend)


@contextlib.contextmanager
def use_backend(backend: "Backend | str") -> Iterator[Backend]:
    """Make ``backend`` the default for :func:`get_backend` inside a ``with`` block."""
    be = resolve_backend(backend)
    token = _current.set(be)
    try:
        yield be
    finally:
        _current.reset(token)


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine (``"numpy"`` always)."""
    names = ["numpy"]
    if cupy_status()[0]:
        names.append("cupy")
    return names
