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

import numpy as np

from ..errors import InvalidInputError, KernelRegistryError, ShapeMismatchError
from . import reference
from .core import Backend, resolve_backend

__all__ = [
    "CUDA_DIR_ENV",
    "NVRTC_OPTIONS",
    "CLIPPED_STACK_MAX_N",
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
_CLIPPED_STACK_VARIANTS: tuple[int, ...] = (32, 64, 128, 256)
CLIPPED_STACK_MAX_N = _CLIPPED_STACK_VARIANTS[-1]

_CLIP_BLOCK = 128  # threads per block of clipped_stack (one thread per pixel)
_MASK_BLOCK = (32, 8)  # (x = columns, y = rows) of mask_dilate_or


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


def load_module(filename: str, device: int | None = None):
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


def get_function(filename: str, symbol: str, device: int | None = None):
    """The ``cupy.RawKernel`` ``symbol`` of ``filename`` (compiling it if needed)."""
    import cupy

    dev = cupy.cuda.Device().id if device is None else int(device)
    fn = _FUNCTIONS.get((filename, dev, symbol))
    if fn is not None:
        return fn
    mod = load_module(filename, dev)
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
# kernel: clipped_stack
# ----------------------------------------------------------------------------------------


def _dev(cupy, a):
    """``cupy.asarray(a)``, letting None through to the validators' error messages."""
    return None if a is None else cupy.asarray(a)


def _clipped_stack_cupy(data, bad, weights=None, nsigma=3.0, niter=3, *, return_used=False):
    """CuPy launcher of ``clipped_stack_f32_n*``; same signature and semantics as
    :func:`gpudiff.backend.reference.clipped_stack`.  Stacks deeper than
    :data:`CLIPPED_STACK_MAX_N` run the vectorized twin on the device instead."""
    import cupy

    a = reference.validate_clipped_stack(_dev(cupy, data), _dev(cupy, bad), weights, nsigma, niter)
    nep, npix = a.data.shape
    if nep > CLIPPED_STACK_MAX_N:
        log.debug(
            "clipped_stack: N=%d > %d, using the vectorized CuPy path", nep, CLIPPED_STACK_MAX_N
        )
        return reference.clipped_stack(
            a.data.reshape((nep,) + a.spatial_shape),
            a.bad.reshape((nep,) + a.spatial_shape),
            a.weights,
            a.nsigma,
            a.niter,
            return_used=return_used,
        )
    variant = next(v for v in _CLIPPED_STACK_VARIANTS if v >= nep)
    fn = get_function("clipped_stack.cu", f"clipped_stack_f32_n{variant}")
    w = (
        cupy.ones(nep, dtype=cupy.float32)
        if a.weights is None
        else cupy.ascontiguousarray(a.weights)
    )
    bad_u8 = a.bad.view(cupy.uint8)  # bool and uint8 share the 1-byte layout
    mean = cupy.empty(npix, dtype=cupy.float32)
    var = cupy.empty(npix, dtype=cupy.float32)
    n_used = cupy.empty(npix, dtype=cupy.int32)
    used = (
        cupy.empty((nep, npix), dtype=cupy.uint8)
        if return_used
        else cupy.empty(1, dtype=cupy.uint8)
    )
    if npix > 0:
        grid = ((npix + _CLIP_BLOCK - 1) // _CLIP_BLOCK,)
        fn(
            grid,
            (_CLIP_BLOCK,),
            (
                a.data,
                bad_u8,
                w,
                np.int32(nep),
                np.int64(npix),
                np.float64(a.nsigma),
                np.int32(a.niter),
                mean,
                var,
                n_used,
                used,
                np.int32(1 if return_used else 0),
            ),
        )
    shp = a.spatial_shape
    out = (mean.reshape(shp), var.reshape(shp), n_used.reshape(shp))
    if return_used:
        return out + (used.view(cupy.bool_).reshape((nep,) + shp),)
    return out


register_kernel(
    KernelSpec(
        name="clipped_stack",
        numpy_impl=reference.clipped_stack,
        cuda_launcher=_clipped_stack_cupy,
        source="clipped_stack.cu",
        symbols=tuple(f"clipped_stack_f32_n{v}" for v in _CLIPPED_STACK_VARIANTS),
        doc="afw MEANCLIP/VARIANCECLIP along axis 0 of a masked, weighted stack",
    )
)


# ----------------------------------------------------------------------------------------
# kernel: mask_dilate_or
# ----------------------------------------------------------------------------------------


#: kh·kw·H·W above which a full-rectangle footprint is dilated separably on the device
#: (2048² × 64 taps: ~20 extra launches, ~0.2 ms, against ~0.3 G tap reads saved).
_MASK_SEPARABLE_MIN_TAPS = 2048 * 2048 * 64


def _mask_dilate_or_cupy(mask, footprint):
    """CuPy launcher of ``mask_dilate_or_i32``; same signature and semantics as
    :func:`gpudiff.backend.reference.mask_dilate_or`."""
    import cupy

    _, m, fp = reference.validate_mask_dilate_or(_dev(cupy, mask), footprint)
    m = cupy.ascontiguousarray(m)
    height, width = (int(s) for s in m.shape)
    if fp.all() and fp.size * height * width > _MASK_SEPARABLE_MIN_TAPS:
        # A full rectangle (every AL kernel, the warp footprint): the twin's separable
        # doubling ORs, run with CuPy, read each pixel ~2·log2(k) times instead of kh·kw
        # (441 at 21×21); ~20 launches, worth it once the image is big.
        return reference.mask_dilate_or(m, fp)
    dy, dx = reference.footprint_offsets(fp)
    out = cupy.zeros((height, width), dtype=cupy.int32)
    if height == 0 or width == 0 or dy.size == 0:
        return out
    fn = get_function("mask_ops.cu", "mask_dilate_or_i32")
    bx, by = _MASK_BLOCK
    grid = ((width + bx - 1) // bx, (height + by - 1) // by)
    fn(
        grid,
        (bx, by),
        (
            m,
            np.int32(height),
            np.int32(width),
            cupy.asarray(dy),
            cupy.asarray(dx),
            np.int32(dy.size),
            out,
        ),
    )
    return out


register_kernel(
    KernelSpec(
        name="mask_dilate_or",
        numpy_impl=reference.mask_dilate_or,
        cuda_launcher=_mask_dilate_or_cupy,
        source="mask_ops.cu",
        symbols=("mask_dilate_or_i32",),
        doc="bitwise OR of mask bits under a footprint (afw correlation convention)",
    )
)


# ----------------------------------------------------------------------------------------
# kernels: adaptive_moments, weighted_centroid (stamp batches, one block per source)
# ----------------------------------------------------------------------------------------

_MOM_BLOCK = 128  # threads per block of stamp_moments.cu (GD_MOM_BLOCK)


def _check_stamps(stamps, *others):
    """Stamps must be (n, s, s); ``others`` (n, s, s) or (n,) as given."""
    if getattr(stamps, "ndim", 0) != 3 or int(stamps.shape[1]) != int(stamps.shape[2]):
        shape = getattr(stamps, "shape", None)
        raise ShapeMismatchError(f"stamps must have shape (n, s, s), got {shape}")
    for o in others:
        if o is not None and int(o.shape[0]) != int(stamps.shape[0]):
            raise ShapeMismatchError(f"expected {stamps.shape[0]} rows, got shape {tuple(o.shape)}")


def _offsets(xp, s: int):
    """Pixel offsets from the central pixel of a side-``s`` stamp, float64 (s,)."""
    return xp.arange(s, dtype=xp.float64) - (s // 2)


def weighted_centroid_twin(stamps, x0, y0, sigma: float, niter: int = 20, max_shift: float = 2.0):
    """NumPy twin of ``weighted_centroid_f64`` (also runs on CuPy arrays): iterated
    Gaussian-weighted centroids of a stack of stamps, all stamps at once.

    See :func:`gpudiff.ops.stats.weighted_centroid` for the definition.  Exactly ``niter``
    masked steps (no host synchronisation); the round weight is separable, so each step
    is two batched matrix products with the (n, 2, s) weight rows [g, g·offset]: about 15
    whole-batch array operations per step.

    Returns
    -------
    x, y : float64 arrays (n,)
    ok : bool array (n,)
    """
    xp = reference.array_module(stamps, x0, y0)
    _check_stamps(stamps, x0, y0)
    n, s = int(stamps.shape[0]), int(stamps.shape[1])
    c = _offsets(xp, s)
    c2 = xp.stack([xp.ones(s), c])  # (2, s): the weight rows' factors 1 and offset
    img = stamps.astype(xp.float64)
    # p: (n, 2) current (x, y); starting values as given
    p = xp.stack([xp.asarray(x0).astype(xp.float64), xp.asarray(y0).astype(xp.float64)], axis=1)
    ok = xp.ones(n, dtype=bool)
    step = xp.zeros(n)
    k = -0.5 / (sigma * sigma)
    with np.errstate(all="ignore"):  # failed stamps give 0/0 or inf: masked out below
        for it in range(niter):
            d = c[None, None, :] - p[:, :, None]  # (n, 2, s): offsets from the current centre
            g = xp.exp(xp.square(d) * k)  # (n, 2, s): g(x - x_c), g(y - y_c)
            w = g[:, :, None, :] * c2[None, None, :, :]  # (n, axis, [1, offset], s)
            a = img @ w[:, 0].transpose(0, 2, 1)  # (n, s_rows, 2): Σ_col I·g·[1, X]
            m = w[:, 1] @ a  # (n, 2, 2): [[Σ wI, Σ wIX], [Σ wIY, ·]]
            s0 = m[:, 0, 0]
            q = xp.stack([m[:, 0, 1], m[:, 1, 0]], axis=1) / s0[:, None]  # new (x, y)
            good = (s0 > 0) & (xp.abs(q) <= max_shift).all(axis=1)  # NaN compares False
            ok &= good
            if it == niter - 1:  # the convergence test only needs the last step
                step = xp.where(ok, xp.abs(q - p).sum(axis=1), 0.0)
            p = xp.where(ok[:, None], q, p)
    return p[:, 0], p[:, 1], ok & (step < 1e-3)


def _moment_basis(xp, s: int):
    """(s², 6) float64 [1, X, Y, X², Y², XY] over the pixels of a side-``s`` stamp (row-major),
    so that ``w.reshape(n, s²) @ basis`` gives every raw moment of a batch in one product."""
    c = _offsets(xp, s)
    X = xp.broadcast_to(c[None, :], (s, s)).reshape(-1)
    Y = xp.broadcast_to(c[:, None], (s, s)).reshape(-1)
    return xp.stack([xp.ones(s * s), X, Y, X * X, Y * Y, X * Y], axis=1)


def _adaptive_step(xp, im, basis, dxg, dyg, st, ok, change, act, lo, hi, tol):
    """One fixed-point step W ← 2·Q for every row; only rows in ``act`` change.

    ``st`` is (m, 5) [xc, yc, wxx, wyy, wxy]; returns the updated (st, ok, change, act).
    Raw moments come from one matrix product with ``basis``; the central moments are
    Σw(X−x̄)²/Σw = ΣwX²/Σw − x̄² (exact algebra; the cancellation costs < 1e-14 here)."""
    m, s = int(im.shape[0]), int(im.shape[1])
    det = st[:, 2] * st[:, 3] - st[:, 4] * st[:, 4]
    h = (-0.5 / det)[:, None, None]
    # -q/2 = -(wyy·dx² - 2·wxy·dx·dy + wxx·dy²) / (2·det), with dx (m, 1, s), dy (m, s, 1)
    dx = dxg - st[:, 0][:, None, None]
    dy = dyg - st[:, 1][:, None, None]
    # the (m, 1, s) and (m, s, 1) factors first: three full-stamp operations, not six
    e = (dx * dx * (st[:, 3][:, None, None] * h) + dy * dy * (st[:, 2][:, None, None] * h)) + (
        dx * (st[:, 4][:, None, None] * (-2.0 * h))
    ) * dy
    wd = xp.exp(e) * im
    # einsum, not @: NumPy sends @ to a multithreaded BLAS, ~10x slower for these shapes
    # on two busy cores; on a GPU both are one launch
    mom = xp.einsum("nk,kj->nj", wd.reshape(m, s * s), basis)  # (m, 6) raw moments
    s0 = mom[:, 0]
    good = s0 > 0
    r = mom[:, 1:] / xp.where(good, s0, 1.0)[:, None]  # [x̄, ȳ, Σ wX²/Σw, Σ wY²/Σw, Σ wXY/Σw]
    cen = 2.0 * (r[:, 2:] - r[:, [0, 1, 0]] * r[:, [0, 1, 1]])
    dia = xp.clip(cen[:, :2], lo, hi)
    lim = 0.99 * xp.sqrt(dia[:, 0] * dia[:, 1])
    nxy = xp.clip(cen[:, 2], -lim, lim)
    new = xp.concatenate([r[:, :2], dia, nxy[:, None]], axis=1)
    good &= (xp.abs(r[:, :2]) <= 2.0).all(axis=1)
    ok = ok & (good | ~act)  # rows not iterated keep their flag
    upd = ok & act
    ch = xp.abs(new[:, 2:] - st[:, 2:]).sum(axis=1)
    change = xp.where(upd, ch, change)
    st = xp.where(upd[:, None], new, st)
    act = upd & (change >= tol * (st[:, 2] + st[:, 3]))
    return st, ok, change, act


def adaptive_moments_twin(
    stamps,
    valid,
    w_init: float,
    max_iter: int = 60,
    tol: float = 1e-6,
    *,
    check_every: int | None = None,
):
    """NumPy twin of ``adaptive_moments_f64`` (also runs on CuPy arrays): adaptive moments
    of a stack of stamps by masked whole-batch iterations.

    See :func:`gpudiff.ops.stats.adaptive_moments_batch` for the definition.  Every step
    updates all rows still moving with whole-batch array operations (~45 of them, no host
    synchronisation); a row that converged or failed stops changing.  Every
    ``check_every`` steps the host learns which rows still move (one synchronisation),
    stops when none does and iterates only those from then on; a row's result does not
    depend on ``check_every``.  Default: 1 for NumPy arrays (free there, and compacting
    saves work: most rows converge in ~10 steps, a few noisy ones use the whole budget),
    10 for device arrays.

    Returns
    -------
    xc, yc, ixx, iyy, ixy : float64 arrays (n,)
    ok : bool array (n,)
    """
    xp = reference.array_module(stamps, valid)
    _check_stamps(stamps, valid)
    n, s = int(stamps.shape[0]), int(stamps.shape[1])
    k = int(check_every) if check_every else (1 if xp is np else 10)
    if k < 1:
        raise InvalidInputError(f"check_every must be >= 1, got {check_every}")
    c = _offsets(xp, s)
    dxg, dyg = c[None, None, :], c[None, :, None]
    basis = _moment_basis(xp, s)
    img = xp.where(valid, stamps, 0).astype(xp.float64)
    lo, hi = 0.04, float(s * s)
    w0 = float(w_init)
    st = xp.zeros((n, 5)) + xp.asarray(np.array([0.0, 0.0, w0, w0, 0.0]))
    ok = xp.ones(n, dtype=bool)
    change = xp.full(n, xp.inf)
    act = xp.ones(n, dtype=bool)
    rows = None  # the rows iterated (None: all)
    done = 0
    with np.errstate(all="ignore"):  # failed rows give 0/0 or inf: masked out
        while done < max_iter:
            if rows is None:
                sub = (img, st, ok, change, act)
            else:
                sub = (img[rows], st[rows], ok[rows], change[rows], act[rows])
            im, sst, sok, sch, sact = sub
            for _ in range(min(k, max_iter - done)):
                sst, sok, sch, sact = _adaptive_step(
                    xp, im, basis, dxg, dyg, sst, sok, sch, sact, lo, hi, tol
                )
                done += 1
            if rows is None:
                st, ok, change, act = sst, sok, sch, sact
            else:
                st[rows], ok[rows], change[rows], act[rows] = sst, sok, sch, sact
            if done >= max_iter:
                break
            rows = xp.nonzero(act)[0]  # the check: one host sync
            if int(rows.shape[0]) == 0:
                break
    ok &= change < tol * (st[:, 2] + st[:, 3]) * 10
    return st[:, 0], st[:, 1], st[:, 2], st[:, 3], st[:, 4], ok


def _adaptive_moments_cupy(
    stamps,
    valid,
    w_init: float,
    max_iter: int = 60,
    tol: float = 1e-6,
    *,
    check_every: int | None = None,
):
    """CuPy launcher of ``adaptive_moments_f64``; same signature and results as
    :func:`adaptive_moments_twin` (``check_every`` is accepted and unused: each block runs
    its own source to the end, one launch for the batch)."""
    import cupy

    st, v = cupy.asarray(stamps), cupy.asarray(valid)
    _check_stamps(st, v)
    n, s = int(st.shape[0]), int(st.shape[1])
    img = cupy.ascontiguousarray(cupy.where(v, st, 0).astype(cupy.float64))
    out = cupy.empty((n, 5), dtype=cupy.float64)
    ok = cupy.zeros(n, dtype=cupy.uint8)
    if n > 0 and s > 0:
        fn = get_function("stamp_moments.cu", "adaptive_moments_f64")
        args = (
            img,
            np.int32(n),
            np.int32(s),
            np.float64(w_init),
            np.int32(max_iter),
            np.float64(tol),
            out,
            ok,
        )
        fn((n,), (_MOM_BLOCK,), args)
    return out[:, 0], out[:, 1], out[:, 2], out[:, 3], out[:, 4], ok.view(cupy.bool_)


def _weighted_centroid_cupy(stamps, x0, y0, sigma: float, niter: int = 20, max_shift: float = 2.0):
    """CuPy launcher of ``weighted_centroid_f64``; same signature and results as
    :func:`weighted_centroid_twin`."""
    import cupy

    st = cupy.asarray(stamps)
    x0 = cupy.ascontiguousarray(cupy.asarray(x0, dtype=cupy.float64).reshape(-1))
    y0 = cupy.ascontiguousarray(cupy.asarray(y0, dtype=cupy.float64).reshape(-1))
    _check_stamps(st, x0, y0)
    n, s = int(st.shape[0]), int(st.shape[1])
    img = cupy.ascontiguousarray(st.astype(cupy.float64))
    out = cupy.empty((n, 2), dtype=cupy.float64)
    ok = cupy.zeros(n, dtype=cupy.uint8)
    if n > 0 and s > 0:
        fn = get_function("stamp_moments.cu", "weighted_centroid_f64")
        args = (
            img,
            np.int32(n),
            np.int32(s),
            x0,
            y0,
            np.float64(sigma),
            np.int32(niter),
            np.float64(max_shift),
            out,
            ok,
        )
        fn((n,), (_MOM_BLOCK,), args)
    return out[:, 0], out[:, 1], ok.view(cupy.bool_)


register_kernel(
    KernelSpec(
        name="adaptive_moments",
        numpy_impl=adaptive_moments_twin,
        cuda_launcher=_adaptive_moments_cupy,
        source="stamp_moments.cu",
        symbols=("adaptive_moments_f64",),
        doc="adaptive (SdssShape) moments of a batch of stamps, one block per source",
    )
)

register_kernel(
    KernelSpec(
        name="weighted_centroid",
        numpy_impl=weighted_centroid_twin,
        cuda_launcher=_weighted_centroid_cupy,
        source="stamp_moments.cu",
        symbols=("weighted_centroid_f64",),
        doc="iterated Gaussian-weighted centroids of a batch of stamps, one block per source",
    )
)


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
