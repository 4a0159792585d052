"""The CUDA kernel registry: every hand-written kernel paired with its NumPy twin.

A kernel is registered as a :class:`KernelSpec`: a name, the NumPy reference (in
:mod:`gpudiff.backend.reference`), a CuPy launcher with the **same Python signature**, and
the ``cuda/*.cu`` file and ``extern "C"`` symbols it launches.  Algorithm code asks for a
kernel by name::

    f = get_kernel("clipped_stack", be)      # be: a Backend, "numpy" or "cupy"
    mean, var, n = f(data, bad, weights, nsigma=3.0, niter=3)

and gets the NumPy twin on the CPU and the launcher on a GPU.  The public wrappers at the
bottom of this module (:func:`clipped_stack`, :func:`mask_dilate_or`) do that and also
move the inputs to the backend.

This module holds the registry, the CUDA source lookup and the compiled-module cache.  The
launchers and their registrations are in :mod:`gpudiff.backend.launchers` (imported by
``gpudiff/backend/__init__.py``, so every kernel is registered as soon as any module of
the backend package is); the NumPy twins are in :mod:`gpudiff.backend.reference` and
:mod:`gpudiff.backend.stamp_moments` (whose twins this module re-exports).

CUDA sources are found by :func:`cuda_source_dir`, compiled lazily with
``cupy.RawModule`` (NVRTC) the first time a launcher runs, and cached per (file, device).
CuPy is imported only inside functions: importing this module never imports CuPy.

The standalone ``nvcc`` check used by CI lives in :mod:`gpudiff.backend.nvcc`
(``python -m gpudiff.backend --check``).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


from ..errors import KernelRegistryError
from .core import Backend, resolve_backend

# Re-exported: the stamp twins were defined here before the launchers moved out.
from .stamp_moments import adaptive_moments_twin, weighted_centroid_twin

__all__ = [
    "CUDA_DIR_ENV",
    "NVRTC_OPTIONS",
    "CLIPPED_STACK_MAX_N",
    "CLIPPED_STACK_VARIANTS",
    "KernelSpec",
    "register_kernel",
    "get_kernel",
    "get_spec",
    "list_kernels",
    "cuda_source_dir",
    "cuda_sources",
    "read_cuda_source",
    "load_module",
    "get_function",
    "clear_module_cache",
    "clipped_stack",
    "mask_dilate_or",
    "adaptive_moments_twin",
    "weighted_centroid_twin",
]

log = logging.getLogger("gpudiff.backend.kernels")

#: Environment variable naming a folder of ``.cu`` files that overrides the packaged ones.
CUDA_DIR_ENV = "GPUDIFF_CUDA_DIR"

#: Options for ``cupy.RawModule`` (NVRTC).  ``--fmad=false`` keeps the device arithmetic
#: identical to the NumPy twins (the sources also use explicit ``__dmul_rn``/``__dadd_rn``).
NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17", "--fmad=false")

#: Stack depths of the ``clipped_stack_f32_n*`` variants; deeper stacks use the
#: vectorized twin on the device.
CLIPPED_STACK_VARIANTS: tuple[int, ...] = (32, 64, 128, 256)
#: The deepest stack the ``clipped_stack`` kernel takes.
CLIPPED_STACK_MAX_N = CLIPPED_STACK_VARIANTS[-1]


# ----------------------------------------------------------------------------------------
# the CUDA source folder
# ----------------------------------------------------------------------------------------


def _has_cu(path: Path) -> bool:
    try:
        return path.is_dir() and any(p.suffix == ".cu" for p in path.iterdir())
    except OSError:
        return False


def cuda_source_dir() -> Path:
    """The folder holding the ``.cu`` files.

    Looked up in this order:

    1. the environment variable ``GPUDIFF_CUDA_DIR`` (an error if it is set but holds no
       ``.cu`` file: a typo should not silently fall back);
    2. ``gpudiff/_cuda`` inside the installed package (wheels: hatchling force-includes the
       repository's ``cuda/`` there);
    3. ``<repository>/cuda`` next to the package (source checkout, editable install,
       ``PYTHONPATH``).

    Raises
    ------
    KernelRegistryError
        None of these folders holds a ``.cu`` file; the message lists the places tried.
    """
    tried: list[str] = []
    env = os.environ.get(CUDA_DIR_ENV, "").strip()
    if env:
        p = Path(env).expanduser()
        if _has_cu(p):
            return p.resolve()
        raise KernelRegistryError(f"{CUDA_DIR_ENV}={env!r} does not name a folder with .cu files")
    try:
        from importlib.resources import files

        res = files("gpudiff") / "_cuda"
        p = Path(str(res))
        tried.append(str(p))
        if _has_cu(p):
            return p.resolve()
    except Exception as exc:  # not a file-system package (zip import) etc.
        tried.append(f"importlib.resources gpudiff/_cuda ({type(exc).__name__}: {exc})")
    p = Path(__file__).resolve().parents[2] / "cuda"
    tried.append(str(p))
    if _has_cu(p):
        return p
    raise KernelRegistryError(
        "cannot find the gpudiff CUDA sources (*.cu); tried: "
        + "; ".join(tried)
        + f". Set {CUDA_DIR_ENV} to the folder holding them."
    )


def cuda_sources() -> list[Path]:
    """Every ``.cu`` file of :func:`cuda_source_dir`, sorted by name."""
    return sorted(p for p in cuda_source_dir().iterdir() if p.suffix == ".cu")


def read_cuda_source(filename: str) -> str:
    """Text of one ``.cu`` file of :func:`cuda_source_dir`."""
    path = cuda_source_dir() / filename
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KernelRegistryError(f"cannot read CUDA source {path}: {exc}") from exc


# ----------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelSpec:
    """One hand-written kernel and its NumPy twin.

    Attributes
    ----------
    name : str
        Registry name (``get_kernel(name, ...)``).
    numpy_impl : callable
        The NumPy reference; also the CPU path and the test oracle.
    cuda_launcher : callable or None
        Same signature as ``numpy_impl``; takes and returns CuPy arrays.  None for a
        kernel that has only a CPU implementation so far.
    source : str or None
        The ``.cu`` file (relative to :func:`cuda_source_dir`).
    symbols : tuple of str
        The ``extern "C" __global__`` functions the launcher uses.
    doc : str
        One line for :func:`list_kernels` and ``--list``.
    """

    name: str
    numpy_impl: Callable[..., Any]
    cuda_launcher: Callable[..., Any] | None = None
    source: str | None = None
    symbols: tuple[str, ...] = ()
    doc: str = ""

    def __post_init__(self) -> None:
        if self.cuda_launcher is not None and (not self.source or not self.symbols):
            raise KernelRegistryError(
                f"kernel {self.name!r}: a CUDA launcher needs a source file and its symbols"
            )


_REGISTRY: dict[str, KernelSpec] = {}
_REGISTRY_LOCK = threading.Lock()


def register_kernel(spec: KernelSpec, *, replace: bool = False) -> KernelSpec:
    """Add ``spec`` to the registry (``replace=True`` to overwrite an entry)."""
    with _REGISTRY_LOCK:
        if spec.name in _REGISTRY and not replace:
            raise KernelRegistryError(f"kernel {spec.name!r} is already registered")
        _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> KernelSpec:
    """The :class:`KernelSpec` registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KernelRegistryError(
            f"unknown kernel {name!r}; registered: {sorted(_REGISTRY)}"
        ) from None


def list_kernels() -> list[str]:
    """Names of the registered kernels, sorted."""
    return sorted(_REGISTRY)


def get_kernel(name: str, backend: Backend | str | None = None) -> Callable[..., Any]:
    """The implementation of kernel ``name`` for ``backend``.

    Parameters
    ----------
    name : str
        A registered kernel (:func:`list_kernels`).
    backend : Backend, "numpy", "cupy", "auto" or None
        As for :func:`gpudiff.backend.resolve_backend`.

    Returns
    -------
    callable
        The NumPy twin on the numpy backend, the CuPy launcher on cupy (same signature).
        Inputs are not moved between host and device: pass arrays of that backend (or use
        the module-level wrappers such as :func:`clipped_stack`).

    Raises
    ------
    KernelRegistryError
        Unknown name, or the kernel has no CUDA launcher and the backend is cupy.
    """
    spec = get_spec(name)
    be = resolve_backend(backend)
    if be.name == "numpy":
        return spec.numpy_impl
    if spec.cuda_launcher is None:
        raise KernelRegistryError(f"kernel {name!r} has no CUDA implementation")
    return spec.cuda_launcher


# ----------------------------------------------------------------------------------------
# module loading (CuPy, lazily)
# ----------------------------------------------------------------------------------------

_MODULES: dict[tuple[str, int], Any] = {}
_FUNCTIONS: dict[tuple[str, int, str], Any] = {}
_MODULE_LOCK = threading.Lock()


def _symbols_of(filename: str) -> tuple[str, ...]:
    syms: list[str] = []
    for spec in _REGISTRY.values():
        if spec.source == filename:
            syms.extend(s for s in spec.symbols if s not in syms)
    return tuple(syms)


def load_module(filename: str, *, device: int | None = None):
    """The ``cupy.RawModule`` of ``filename`` on ``device`` (default: the current one).

    Compiled with NVRTC (:data:`NVRTC_OPTIONS`) on first use and cached per
    (file, device).  Every registered symbol of the file is fetched once, so a
    compilation error surfaces here.

    Raises
    ------
    KernelRegistryError
        The source cannot be found, read or compiled (the message names the file and holds
        the compiler log).
    """
    import cupy  # lazy: only the backend package imports CuPy

    dev = cupy.cuda.Device().id if device is None else int(device)
    key = (filename, dev)
    mod = _MODULES.get(key)
    if mod is not None:
        return mod
    with _MODULE_LOCK:
        mod = _MODULES.get(key)
        if mod is not None:
            return mod
        source = read_cuda_source(filename)
        with cupy.cuda.Device(dev):
            try:
                mod = cupy.RawModule(code=source, options=NVRTC_OPTIONS)
                for sym in _symbols_of(filename):
                    _FUNCTIONS[(filename, dev, sym)] = mod.get_function(sym)
            except Exception as exc:  # cupy.cuda.compiler.CompileException, CUDADriverError
                raise KernelRegistryError(
                    f"compiling CUDA source {filename!r} for device {dev} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        _MODULES[key] = mod
        return mod


def get_function(filename: str, symbol: str, *, device: int | None = None):
    """The ``cupy.RawKernel`` ``symbol`` of ``filename`` (compiling it if needed)."""
    import cupy

    dev = cupy.cuda.Device().id if device is None else int(device)
    fn = _FUNCTIONS.get((filename, dev, symbol))
    if fn is not None:
        return fn
    mod = load_module(filename, device=dev)
    try:
        with cupy.cuda.Device(dev):
            fn = mod.get_function(symbol)
    except Exception as exc:
        raise KernelRegistryError(
            f"CUDA source {filename!r} has no kernel {symbol!r}: {type(exc).__name__}: {exc}"
        ) from exc
    _FUNCTIONS[(filename, dev, symbol)] = fn
    return fn


def clear_module_cache() -> None:
    """Forget every compiled module (e.g. after editing a ``.cu`` file in a session)."""
    with _MODULE_LOCK:
        _MODULES.clear()
        _FUNCTIONS.clear()


# ----------------------------------------------------------------------------------------
# public wrappers: move inputs to the backend, then dispatch
# ----------------------------------------------------------------------------------------


def _to_backend(be: Backend, a):
    return None if a is None else be.asarray(a)


def clipped_stack(
    data,
    bad,
    weights=None,
    nsigma: float = 3.0,
    niter: int = 3,
    *,
    return_used: bool = False,
    backend: Backend | str | None = None,
):
    """afw ``MEANCLIP`` statistics along axis 0 of a stack, on ``backend``.

    See :func:`gpudiff.backend.reference.clipped_stack` for the parameters and the exact
    semantics; the inputs are moved to ``backend`` (host arrays to the GPU or back) and the
    outputs are arrays of that backend: ``(mean, variance, n_used)`` plus ``used`` with
    ``return_used=True``.
    """
    be = resolve_backend(backend)
    f = get_kernel("clipped_stack", be)
    return f(
        _to_backend(be, data),
        _to_backend(be, bad),
        _to_backend(be, weights),
        nsigma,
        niter,
        return_used=return_used,
    )


def mask_dilate_or(mask, footprint, *, backend: Backend | str | None = None):
    """Bitwise OR of mask bits under ``footprint`` (afw correlation convention), on
    ``backend``.  See :func:`gpudiff.backend.reference.mask_dilate_or`."""
    be = resolve_backend(backend)
    f = get_kernel("mask_dilate_or", be)
    return f(_to_backend(be, mask), footprint)
