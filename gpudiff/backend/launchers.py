"""The CuPy launchers of the hand-written CUDA kernels, registered with their NumPy twins.

Each launcher has the **same Python signature** as its twin (:mod:`gpudiff.backend.reference`,
:mod:`gpudiff.backend.reference_columns`, :mod:`gpudiff.backend.stamp_moments`), takes and
returns CuPy arrays, and launches the ``extern "C"`` symbols of one ``cuda/*.cu`` file through
:func:`gpudiff.backend.kernels.get_function` (compiled with NVRTC on first use).  Importing
this module registers every kernel (:func:`gpudiff.backend.kernels.register_kernel`);
``gpudiff/backend/__init__.py`` imports it, so the registry is complete whenever any module
of :mod:`gpudiff.backend` has been imported.  CuPy is imported only inside the launchers.
"""

from __future__ import annotations

import logging

import numpy as np

from . import reference, reference_columns
from .kernels import (
    CLIPPED_STACK_VARIANTS,
    CLIPPED_STACK_MAX_N,
    KernelSpec,
    get_function,
    register_kernel,
)
from .stamp_moments import adaptive_moments_twin, check_stamps, weighted_centroid_twin

__all__: list[str] = []  # nothing public: use gpudiff.backend.kernels.get_kernel

# The launchers log under the registry's name, as they did when they lived there.
log = logging.getLogger("gpudiff.backend.kernels")

_CLIP_BLOCK = 128  # threads per block of clipped_stack (one thread per pixel)
_MASK_BLOCK = (32, 8)  # (x = columns, y = rows) of mask_dilate_or
_MOM_BLOCK = 128  # threads per block of stamp_moments.cu (GD_MOM_BLOCK)


def _blocks(n: int, block: int) -> int:
    """Blocks of ``block`` threads that cover ``n`` items."""
    return (n + block - 1) // block


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
    variant = next(v for v in CLIPPED_STACK_VARIANTS if v >= nep)
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
        grid = (_blocks(npix, _CLIP_BLOCK),)
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
        symbols=tuple(f"clipped_stack_f32_n{v}" for v in CLIPPED_STACK_VARIANTS),
        doc="afw MEANCLIP/VARIANCECLIP along axis 0 of a masked, weighted stack",
    )
)


# ----------------------------------------------------------------------------------------
# kernel: clipped_columns
# ----------------------------------------------------------------------------------------

_COLS_BLOCK = 256  # threads per block of clipped_columns_f32
#: Ranks, histogram bins and radix phases of cuda/clipped_columns.cu (gd_cc::kRanks ...).
_COLS_RANKS, _COLS_BINS, _COLS_SELECT_PHASES = 6, 256, 4
#: Per-column state words of the kernel (gd_cc::kSI int64, gd_cc::kSD float64).
_COLS_SI, _COLS_SD = 16, 4
#: Blocks the launcher aims for (a few per SM of an H100/H200) when columns are few: a
#: column is then split over several blocks, each phase a launch of its own.
_COLS_TARGET_BLOCKS = 512
#: The fewest samples per block worth a split (below, the launches cost more than they save).
_COLS_MIN_CHUNK = 1 << 14


def _cols_split(n: int, ncols: int) -> int:
    """Blocks per column: 1 (one launch for every phase) unless the columns are too few to
    fill the device and deep enough to share (the whole-image clip: one column of H·W)."""
    if ncols >= _COLS_TARGET_BLOCKS // 2 or n < 2 * _COLS_MIN_CHUNK:
        return 1
    return int(max(1, min(_blocks(_COLS_TARGET_BLOCKS, ncols), n // _COLS_MIN_CHUNK)))


def _launch_columns(d, g8, n, ncols, strides, nsigma, niter, good_is_finite, nphase, **mode):
    """Run phases ``[0, nphase)`` of ``clipped_columns_f32`` on ``ncols`` columns of ``n``
    samples; returns ``(mean, var, n_used, n_good)`` (float32, float32, int32, int64).

    ``strides`` = (data sample, data column, good sample, good column) in elements (bin
    mode: image pixel and row strides).  ``mode``: ``fracs``/``out_q`` (device float64
    (ncols, 3): selection-only quantiles) and ``bins`` = (ye, xe, nx, wmax) (device int64
    edges: the columns are the bins of the image ``d``).
    """
    import cupy

    mean = cupy.empty(ncols, dtype=cupy.float32)
    var = cupy.empty(ncols, dtype=cupy.float32)
    n_used = cupy.empty(ncols, dtype=cupy.int32)
    n_good = cupy.empty(ncols, dtype=cupy.int64)
    if ncols == 0:
        return mean, var, n_used, n_good
    nsplit = _cols_split(n, ncols)
    # one zeroed workspace (one memset): int64 state, float64 state, histograms
    n_si, n_sd = ncols * _COLS_SI, ncols * _COLS_SD
    n_h = ncols * _COLS_RANKS * _COLS_BINS // 2  # uint32 pairs
    ws = cupy.zeros(n_si + n_sd + n_h, dtype=cupy.int64)
    st_i = ws[:n_si]
    st_d = ws[n_si : n_si + n_sd].view(cupy.float64)
    ghist = ws[n_si + n_sd :].view(cupy.uint32)
    part = cupy.empty(ncols * nsplit * 2, dtype=cupy.float64)
    null = np.uint64(0)  # a null pointer argument
    fracs, out_q = mode.get("fracs"), mode.get("out_q")
    ye, xe, nx, wmax = mode.get("bins") or (null, null, 1, 1)
    fn = get_function("clipped_columns.cu", "clipped_columns_f32")
    # with one block per column a launch runs every phase; split columns need a launch
    # boundary between phases (their blocks fold each other's partial results)
    spans = [(0, nphase)] if nsplit == 1 else [(p, p + 1) for p in range(nphase)]
    for p0, p1 in spans:
        fn(
            (ncols * nsplit,),
            (_COLS_BLOCK,),
            (
                d,
                g8,
                np.int64(n),
                np.int32(ncols),
                *(np.int64(x) for x in strides),
                np.int32(nsplit),
                np.float64(nsigma),
                np.int32(niter),
                np.int32(1 if good_is_finite else 0),
                np.int32(p0),
                np.int32(p1),
                ghist,
                st_i,
                st_d,
                part,
                mean,
                var,
                n_used,
                n_good,
                null if fracs is None else fracs,
                null if out_q is None else out_q,
                ye,
                xe,
                np.int32(nx),
                np.int64(wmax),
            ),
        )
    return mean, var, n_used, n_good


def _as_u8(cupy, good):
    """``good`` as 0/1 bytes (a view for bool: bool and uint8 share the 1-byte layout)."""
    return good.view(cupy.uint8) if good.dtype == cupy.bool_ else (good != 0).view(cupy.uint8)


def _clipped_columns_cupy(data, good, nsigma=3.0, niter=3, *, want_var=True, good_is_finite=False):
    """CuPy launcher of ``clipped_columns_f32``; same signature and semantics as
    :func:`gpudiff.backend.reference_columns.clipped_columns` (equal to float32 rounding: the
    block reductions sum in another order).  Any strides: a column is read with its own."""
    import cupy

    d, gd = _dev(cupy, data), _dev(cupy, good)
    _, nsigma, niter = reference_columns.validate_clipped_columns(d, gd, nsigma, niter)
    if d.dtype != cupy.float32:
        d = d.astype(cupy.float32)
    g8 = _as_u8(cupy, gd)
    n, ncols = (int(s) for s in d.shape)
    strides = (d.strides[0] // 4, d.strides[1] // 4, g8.strides[0], g8.strides[1])
    mean, var, n_used, n_good = _launch_columns(
        d, g8, n, ncols, strides, nsigma, niter, good_is_finite, _COLS_SELECT_PHASES + niter
    )
    return mean, (var if want_var else None), n_used, n_good


register_kernel(
    KernelSpec(
        name="clipped_columns",
        numpy_impl=reference_columns.clipped_columns,
        cuda_launcher=_clipped_columns_cupy,
        source="clipped_columns.cu",
        symbols=("clipped_columns_f32",),
        doc="afw MEANCLIP/VARIANCECLIP of every column of a deep (N, B) stack, sort-free",
    )
)


def _quantile_columns_cupy(data, good, fractions):
    """CuPy launcher of ``clipped_columns_f32``'s selection phases; same signature and
    results as :func:`gpudiff.backend.reference_columns.quantile_columns` (the order
    statistics are exact, the interpolation the same float64 arithmetic)."""
    import cupy

    d, gd = _dev(cupy, data), _dev(cupy, good)
    _, g2, fr = reference_columns.validate_quantile_columns(d, gd, fractions)
    if d.dtype != cupy.float32:
        d = d.astype(cupy.float32)
    g8 = _as_u8(cupy, g2)  # a shared (N,) mask has column stride 0
    n, ncols = (int(s) for s in d.shape)
    m = fr.shape[1]
    fr3 = np.full((ncols, 3), -1.0)  # the kernel's "unused"
    fr3[:, :m] = np.where(np.isnan(fr), -1.0, fr)
    out_q = cupy.empty((ncols, 3), dtype=cupy.float64)  # every entry written (NaN: unused)
    strides = (d.strides[0] // 4, d.strides[1] // 4, g8.strides[0], g8.strides[1])
    _launch_columns(
        d,
        g8,
        n,
        ncols,
        strides,
        1.0,
        1,
        True,
        _COLS_SELECT_PHASES,
        fracs=cupy.asarray(fr3),
        out_q=out_q,
    )
    return out_q[:, :m]


register_kernel(
    KernelSpec(
        name="quantile_columns",
        numpy_impl=reference_columns.quantile_columns,
        cuda_launcher=_quantile_columns_cupy,
        source="clipped_columns.cu",
        symbols=("clipped_columns_f32",),
        doc="linear percentiles of the columns of a stack under one mask, sort-free",
    )
)


def _clipped_bins_cupy(
    image, good, y_edges, x_edges, nsigma=3.0, niter=3, *, want_var=True, good_is_finite=False
):
    """CuPy launcher of ``clipped_columns_f32`` in bin mode: the bins of the image read in
    place, one block per bin; same signature and results (to float32 rounding) as
    :func:`gpudiff.backend.reference_columns.clipped_bins`."""
    import cupy

    im, gd = _dev(cupy, image), _dev(cupy, good)
    _, nsigma, niter, ye, xe = reference_columns.validate_clipped_bins(
        im, gd, y_edges, x_edges, nsigma, niter
    )
    if im.dtype != cupy.float32:
        im = im.astype(cupy.float32)
    g8 = _as_u8(cupy, gd)
    ny, nx = ye.size - 1, xe.size - 1
    hmax, wmax = int(np.diff(ye).max()), int(np.diff(xe).max())
    strides = (im.strides[1] // 4, im.strides[0] // 4, g8.strides[1], g8.strides[0])
    mean, var, n_used, n_good = _launch_columns(
        im,
        g8,
        hmax * wmax,
        ny * nx,
        strides,
        nsigma,
        niter,
        good_is_finite,
        _COLS_SELECT_PHASES + niter,
        bins=(cupy.asarray(ye), cupy.asarray(xe), nx, wmax),
    )
    return mean, (var if want_var else None), n_used, n_good


register_kernel(
    KernelSpec(
        name="clipped_bins",
        numpy_impl=reference_columns.clipped_bins,
        cuda_launcher=_clipped_bins_cupy,
        source="clipped_columns.cu",
        symbols=("clipped_columns_f32",),
        doc="afw MEANCLIP/VARIANCECLIP of every bin of an image, read in place, sort-free",
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
    grid = (_blocks(width, bx), _blocks(height, by))
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


def _launch_per_stamp(symbol: str, img, ncols: int, *params):
    """Launch ``symbol`` of ``stamp_moments.cu``, one block per stamp of ``img``.

    The kernels share one argument layout, ``(img, n, s, *params, out, ok)``: ``img`` the
    (n, s, s) float64 stamps, ``out`` an (n, ``ncols``) float64 result and ``ok`` one byte
    per stamp.  Returns ``(out, ok)``, ``ok`` viewed as bool.
    """
    import cupy

    n, s = int(img.shape[0]), int(img.shape[1])
    out = cupy.empty((n, ncols), dtype=cupy.float64)
    ok = cupy.zeros(n, dtype=cupy.uint8)
    if n > 0 and s > 0:
        fn = get_function("stamp_moments.cu", symbol)
        fn((n,), (_MOM_BLOCK,), (img, np.int32(n), np.int32(s), *params, out, ok))
    return out, ok.view(cupy.bool_)


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
    :func:`~gpudiff.backend.stamp_moments.adaptive_moments_twin` (``check_every`` is
    accepted and unused: each block runs its own source to the end, one launch for the
    batch)."""
    import cupy

    st, v = cupy.asarray(stamps), cupy.asarray(valid)
    check_stamps(st, v)
    img = cupy.ascontiguousarray(cupy.where(v, st, 0).astype(cupy.float64))
    out, ok = _launch_per_stamp(
        "adaptive_moments_f64",
        img,
        5,
        np.float64(w_init),
        np.int32(max_iter),
        np.float64(tol),
    )
    return out[:, 0], out[:, 1], out[:, 2], out[:, 3], out[:, 4], ok


def _weighted_centroid_cupy(stamps, x0, y0, sigma: float, niter: int = 20, max_shift: float = 2.0):
    """CuPy launcher of ``weighted_centroid_f64``; same signature and results as
    :func:`~gpudiff.backend.stamp_moments.weighted_centroid_twin`."""
    import cupy

    st = cupy.asarray(stamps)
    x0 = cupy.ascontiguousarray(cupy.asarray(x0, dtype=cupy.float64).reshape(-1))
    y0 = cupy.ascontiguousarray(cupy.asarray(y0, dtype=cupy.float64).reshape(-1))
    check_stamps(st, x0, y0)
    img = cupy.ascontiguousarray(st.astype(cupy.float64))
    out, ok = _launch_per_stamp(
        "weighted_centroid_f64",
        img,
        2,
        x0,
        y0,
        np.float64(sigma),
        np.int32(niter),
        np.float64(max_shift),
    )
    return out[:, 0], out[:, 1], ok


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
