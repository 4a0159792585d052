"""NumPy twins of the hand-written CUDA kernels, and the input checks both twins share.

Every kernel in ``cuda/*.cu`` has here a reference implementation with the **same Python
signature** (see :mod:`gpudiff.backend.kernels`).  The twin is at once the CPU code path and
the test oracle of the CUDA kernel, so it follows the kernel's arithmetic step for step
(float64 accumulation, the same order of additions, the same interpolation formula) and the
two agree to float32 rounding, bit for bit in practice.

The functions are written against an array namespace taken from their input (NumPy, or
CuPy when handed CuPy arrays: the CUDA launcher uses that as its fallback for stacks deeper
than the kernel supports).  CuPy is only imported when a CuPy array is passed in.

Kernels
-------
:func:`clipped_stack`
    afw ``MEANCLIP`` / ``VARIANCECLIP`` along axis 0 of a masked, weighted stack.
:func:`clipped_columns`, :func:`clipped_bins`, :func:`quantile_columns`
    The column kernels of ``cuda/clipped_columns.cu``; their twins are in
    :mod:`gpudiff.backend.reference_columns` and re-exported here.
:func:`mask_dilate_or`
    Bitwise OR of mask bits under a footprint (afw's mask convolution rule).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from ..errors import InvalidInputError, ShapeMismatchError

# The column kernels' twins, re-exported: ``reference.clipped_columns`` and the rest keep
# working (reference_columns looks up this module's shared checks when called).
from .reference_columns import (
    QUANTILE_COLUMNS_MAX_FRACTIONS,
    clipped_bins,
    clipped_columns,
    quantile_columns,
    validate_clipped_bins,
    validate_clipped_columns,
    validate_quantile_columns,
)
from .threads import cpu_workers, parallel_map

__all__ = [
    "IQ_TO_STDEV",
    "clipped_stack",
    "clipped_columns",
    "quantile_columns",
    "clipped_bins",
    "mask_dilate_or",
    "validate_clipped_stack",
    "validate_clipped_columns",
    "validate_quantile_columns",
    "validate_clipped_bins",
    "QUANTILE_COLUMNS_MAX_FRACTIONS",
    "validate_mask_dilate_or",
    "footprint_offsets",
    "array_module",
]

#: 1 sigma in units of the inter-quartile range of a Gaussian (afw ``IQ_TO_STDEV``).
IQ_TO_STDEV = 0.741301109252802

#: Elements (N x pixels) processed per band by the vectorized twin: the float64 work
#: buffers (1 MB each) stay in the CPU cache, and memory is bounded whatever the image size
#: (measured: 2**17 is ~2x faster than 2**20 on 1024x1024x20).
_BAND_ELEMENTS = 1 << 17
#: At most this many CPU threads work on the bands of one call.
_CPU_THREADS = 8


def array_module(*arrays: Any):
    """Return ``cupy`` if any argument is a device array (anything exposing
    ``__cuda_array_interface__``), else ``numpy``.

    CuPy is imported only when a device array is actually present.
    """
    for a in arrays:
        if a is not None and hasattr(a, "__cuda_array_interface__"):
            import cupy  # lazy: only reached with CuPy input

            return cupy
    return np


class _ClippedStackArgs(NamedTuple):
    xp: Any
    data: Any  # float32, C-contiguous, shape (N, P)
    bad: Any  # bool, C-contiguous, shape (N, P); True = excluded (finiteness not yet applied)
    weights: Any  # float32 (N,) or None
    nsigma: float
    niter: int
    spatial_shape: tuple
    nepoch: int


# ----------------------------------------------------------------------------------------
# validation shared by both twins
# ----------------------------------------------------------------------------------------


def _as_float(name: str, value: Any) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be a real number, got {value!r}") from None
    return f


def validate_clipped_stack(data, bad, weights=None, nsigma=3.0, niter=3) -> _ClippedStackArgs:
    """Check and normalize the arguments of :func:`clipped_stack` (both twins call this).

    Returns C-contiguous ``data`` (float32, shape (N, P)) and ``bad`` (bool, (N, P)) in the
    namespace of ``data``; the caller's arrays are never modified (a copy is made whenever
    a conversion is needed).

    Raises
    ------
    InvalidInputError
        ``data`` is not a real array with at least one axis, N == 0, ``weights`` is not a
        1-d array of length N, has negative or non-finite values, ``nsigma`` <= 0 or not
        finite, ``niter`` < 1 or not an integer.
    ShapeMismatchError
        ``bad`` does not have the shape of ``data``.
    """
    xp = array_module(data, bad, weights)
    if data is None:
        raise InvalidInputError("clipped_stack: data is None")
    data = xp.asarray(data)
    if data.dtype.kind not in "fiub":
        raise InvalidInputError(f"clipped_stack: data must be a real array, got dtype {data.dtype}")
    if data.ndim < 1:
        raise InvalidInputError(
            "clipped_stack: data must have a leading sample axis (shape (N, ...))"
        )
    nepoch = int(data.shape[0])
    if nepoch == 0:
        raise InvalidInputError("clipped_stack: the stack is empty (N == 0)")
    if bad is None:
        raise InvalidInputError(
            "clipped_stack: bad is None (pass an all-False array to exclude nothing)"
        )
    bad = xp.asarray(bad)
    if tuple(bad.shape) != tuple(data.shape):
        raise ShapeMismatchError(
            f"clipped_stack: bad has shape {tuple(bad.shape)} but data has shape "
            f"{tuple(data.shape)}"
        )
    if bad.dtype.kind not in "biuf":
        raise InvalidInputError(
            f"clipped_stack: bad must be boolean or integer, got dtype {bad.dtype}"
        )

    nsig = _as_float("nsigma", nsigma)
    if not (math.isfinite(nsig) and nsig > 0.0):
        raise InvalidInputError(f"clipped_stack: nsigma must be finite and > 0, got {nsigma!r}")
    if isinstance(niter, bool) or not isinstance(niter, (int, np.integer)):
        raise InvalidInputError(f"clipped_stack: niter must be an integer, got {niter!r}")
    niter = int(niter)
    if niter < 1:
        raise InvalidInputError(f"clipped_stack: niter must be >= 1, got {niter}")

    w = None
    if weights is not None:
        w = xp.asarray(weights)
        if w.ndim != 1 or int(w.shape[0]) != nepoch:
            raise InvalidInputError(
                f"clipped_stack: weights must have shape ({nepoch},) (one per epoch), "
                f"got {tuple(w.shape)}"
            )
        if w.dtype.kind not in "fiub":
            raise InvalidInputError(f"clipped_stack: weights must be real, got dtype {w.dtype}")
        w = w.astype(xp.float32)  # always a copy
        if not bool(xp.all(xp.isfinite(w))):
            raise InvalidInputError("clipped_stack: weights must be finite")
        if bool(xp.any(w < 0)):
            raise InvalidInputError("clipped_stack: weights must be >= 0")

    spatial_shape = tuple(int(s) for s in data.shape[1:])
    npix = int(np.prod(spatial_shape, dtype=np.int64)) if spatial_shape else 1
    data32 = xp.ascontiguousarray(data.astype(xp.float32, copy=False)).reshape(nepoch, npix)
    bad_b = bad if bad.dtype == xp.bool_ else (bad != 0)
    bad_b = xp.ascontiguousarray(bad_b).reshape(nepoch, npix)
    return _ClippedStackArgs(xp, data32, bad_b, w, nsig, niter, spatial_shape, nepoch)


# ----------------------------------------------------------------------------------------
# clipped_stack
# ----------------------------------------------------------------------------------------


def _band_pixels(xp, nep: int, npix: int) -> int:
    """Pixels per band: cache-sized on the CPU; on a GPU (the CuPy fallback for deep
    stacks) a quarter of the free device memory at ~48 bytes per sample, so the band
    loop does not degenerate into thousands of tiny launches."""
    if xp is np:
        return max(1, _BAND_ELEMENTS // nep)
    try:
        free = int(xp.cuda.runtime.memGetInfo()[0])
    except Exception:  # pragma: no cover - CuPy without a usable device
        free = 1 << 30
    return max(1, min(max(npix, 1), (free // 4) // (48 * nep)))


def _quantile_sorted(xp, s, n, frac: float):
    """afw ``medianAndQuartiles`` on columns of ``s`` (sorted along axis 0, padded with +inf).

    ``idx = frac*(n-1)``, ``q1 = int(idx)``, value = ``(q1+1-idx)*s[q1] + (idx-q1)*s[q1+1]``
    in float64 (the same as NumPy's ``'linear'`` percentile); ``s[0]`` when n == 1; NaN
    when n == 0.
    """
    nm1 = xp.maximum(n - 1, 0)
    idx = frac * nm1.astype(xp.float64)
    q1 = idx.astype(xp.int64)  # truncation == afw static_cast<int> (idx >= 0)
    q2 = xp.minimum(q1 + 1, nm1)  # == q1 + 1 whenever n > 1; clamped only to stay in range
    w1 = (q1 + 1).astype(xp.float64) - idx
    w2 = idx - q1.astype(xp.float64)
    v1 = xp.take_along_axis(s, q1[None, :], axis=0)[0].astype(xp.float64)
    v2 = xp.take_along_axis(s, q2[None, :], axis=0)[0].astype(xp.float64)
    val = w1 * v1 + w2 * v2
    return xp.where(n > 0, val, xp.nan)


def _quartiles_sorted(xp, s, n):
    """(median, q1, q3) of the columns of ``s``: :func:`_quantile_sorted` at 0.5, 0.25 and
    0.75, the same float64 arithmetic element for element, with one gather per side for
    all three (``s`` is C-contiguous: a flat ``take``, not ``take_along_axis``)."""
    nm1 = xp.maximum(n - 1, 0)
    nm1_f = nm1.astype(xp.float64)
    idx = xp.stack([0.50 * nm1_f, 0.25 * nm1_f, 0.75 * nm1_f])  # (3, B), no host array
    q1 = idx.astype(xp.int64)  # truncation == afw static_cast<int> (idx >= 0)
    q2 = xp.minimum(q1 + 1, nm1[None, :])
    w1 = (q1 + 1).astype(xp.float64) - idx
    w2 = idx - q1.astype(xp.float64)
    b = int(s.shape[1])
    cols = xp.arange(b, dtype=xp.int64)[None, :]
    flat = s.reshape(-1)
    v1 = flat.take(q1 * b + cols).astype(xp.float64)
    v2 = flat.take(q2 * b + cols).astype(xp.float64)
    val = xp.where((n > 0)[None, :], w1 * v1 + w2 * v2, xp.nan)
    return val[0], val[1], val[2]


def _clip_band(xp, data, bad, w64, nsigma: float, niter: int, want_used: bool):
    """MEANCLIP on one band: data float32 (N, B), bad bool (N, B).  Returns float64 mean,
    variance, int32 n_used and (optionally) the bool survivor mask (N, B)."""
    valid = ~bad & xp.isfinite(data)
    n = valid.sum(axis=0).astype(xp.int64)

    # pass 0 centre and width: median and IQR of the valid samples (afw medianAndQuartiles)
    s = xp.sort(xp.where(valid, data, xp.float32(np.inf)), axis=0)
    median, q1, q3 = _quartiles_sorted(xp, s, n)
    del s
    iqr = q3 - q1
    iqr_width = (nsigma * IQ_TO_STDEV) * iqr  # afw: numSigmaClip*IQ_TO_STDEV*iqrange

    x = xp.where(valid, data, xp.float32(0)).astype(xp.float64)
    # work buffers, reused by every pass (allocation dominates otherwise)
    d = xp.empty_like(x)
    t = xp.empty_like(x)
    ws = xp.empty_like(x) if w64 is not None else None
    sel = xp.empty(x.shape, dtype=xp.bool_)
    wcol = None if w64 is None else w64[:, None]
    center = median
    hwidth = iqr_width
    mean = var = None
    for it in range(niter):
        if it > 0:
            # afw: centre = clipped mean of the previous pass; width = nsigma*clipped stdev
            # when the pixel has more than one valid sample, else the IQR width again.
            center = mean
            hwidth = xp.where(n > 1, nsigma * xp.sqrt(var), iqr_width)
        xp.subtract(x, center[None, :], out=d)
        # afw CheckClipRange: |val - centre| <= cliplimit  (False for NaN centre/width)
        xp.abs(d, out=t)
        xp.less_equal(t, hwidth[None, :], out=sel)
        sel &= valid
        # Sums along axis 0 run sequentially in k, as in the CUDA kernel; non-survivors
        # add exact zeros.  (A NaN centre makes the column NaN, but then sumw == 0.)
        if wcol is None:
            sumw = sel.sum(axis=0).astype(xp.float64)  # == sequential sum of 1.0
            sumw2 = sumw
            xp.multiply(sel, d, out=t)  # wd = 1*d
        else:
            xp.multiply(sel, wcol, out=ws)
            sumw = ws.sum(axis=0)
            xp.multiply(ws, ws, out=t)
            sumw2 = t.sum(axis=0)
            xp.multiply(ws, d, out=t)  # wd = w*d
        sumx = t.sum(axis=0)
        t *= d  # (w*d)*d
        sumx2 = t.sum(axis=0)
        mean, var = weighted_mean_var(xp, sumw, sumw2, sumx, sumx2, center)
    n_used = sel.sum(axis=0).astype(xp.int32)
    return mean, var, n_used, (sel if want_used else None)


def weighted_mean_var(xp, sumw, sumw2, sumx, sumx2, center):
    """afw's weighted mean and unbiased variance of the offsets d = x − ``center`` from
    their sums Σw, Σw², Σw·d, Σw·d² (NaN where no weight; the variance NaN where
    (Σw)² − Σw² is not positive): (mean, var), the mean with ``center`` added back.
    Shared by :func:`clipped_stack` and its blocked host version
    (:mod:`gpudiff.ops._clip_host`), which must agree bit for bit."""
    okw = sumw > 0
    sumw_s = xp.where(okw, sumw, 1.0)
    mean_d = xp.where(okw, sumx / sumw_s, xp.nan)
    s2 = sumw * sumw
    denom = s2 - sumw2
    okv = okw & (denom > 0)
    var = xp.where(
        okv,
        (sumx2 / sumw_s - mean_d * mean_d) * (s2 / xp.where(okv, denom, 1.0)),
        xp.nan,
    )
    return mean_d + center, var


def clipped_stack(data, bad, weights=None, nsigma=3.0, niter=3, *, return_used=False):
    """Sigma-clipped (afw ``MEANCLIP``) mean and variance along axis 0 of a masked stack.

    NumPy twin of the CUDA kernel ``clipped_stack_f32_n*`` in ``cuda/clipped_stack.cu``.

    Parameters
    ----------
    data : array, shape (N, ...)
        The stack; converted to float32 (as the kernel reads it).  NaN and +-inf samples
        are excluded.
    bad : bool or integer array, shape of ``data``
        True (nonzero) = sample excluded (already ``mask & badPlanes`` != 0).
    weights : array (N,), optional
        Per-epoch weights >= 0 (afw's multiplicative weights); None = all 1.
    nsigma : float
        Clip half-width in sigma (afw ``numSigmaClip``), > 0.
    niter : int
        Total number of clipping passes **including** the first median/IQR pass (afw
        ``numIter``; the loop is ``for i in range(numIter)``), >= 1.
    return_used : bool
        Also return the survivor mask of the final pass, bool (N, ...).

    Returns
    -------
    mean : float32 array, shape ``data.shape[1:]``
        Weighted mean of the survivors of the final pass, sum(w x)/sum(w).
    variance : float32 array
        afw VARIANCECLIP of the survivors: the weighted variance with the
        reliability-weights correction, (sum(w d^2)/sum(w) - mean_d^2) *
        sum(w)^2/(sum(w)^2 - sum(w^2)); i.e. the ddof=1 sample variance for equal weights.
        NaN when fewer than two survivors carry weight.
    n_used : int32 array
        Number of survivors of the final pass (zero-weight survivors included).  Note
        that afw's ``NPOINT`` is a different number: the count of *valid* samples before
        clipping (``(~bad & isfinite(data)).sum(0)``).
    used : bool array (N, ...), only with ``return_used=True``
        Which samples survived the final pass.

    Notes
    -----
    Pass 0 keeps samples with ``|x - median| <= nsigma*0.741301109252802*IQR`` (quartiles by
    linear interpolation, afw ``medianAndQuartiles``); pass i > 0 re-clips the **full**
    valid sample around the previous pass's clipped mean with half-width
    ``nsigma*sqrt(previous clipped variance)`` (the IQR width again if the pixel has one
    valid sample).  A pixel without valid samples gives NaN, NaN, 0; a pixel with one
    (of positive weight) gives that value, NaN, 1.  All accumulation is float64, in epoch
    order.

    Like afw, a pass that leaves a single survivor among several valid samples has a NaN
    variance, so the next pass keeps nothing (NaN, NaN, 0); a pass that keeps nothing
    propagates NaN.  Where afw computes 0*inf for the variance of one survivor (NaN for
    unit weights, NaN or +-inf by rounding for other weights) this returns NaN.
    """
    a = validate_clipped_stack(data, bad, weights, nsigma, niter)
    xp = a.xp
    nep, npix = a.data.shape
    w64 = None if a.weights is None else a.weights.astype(xp.float64)
    mean = xp.empty(npix, dtype=xp.float32)
    var = xp.empty(npix, dtype=xp.float32)
    n_used = xp.empty(npix, dtype=xp.int32)
    used = xp.empty((nep, npix), dtype=xp.bool_) if return_used else None
    band = _band_pixels(xp, nep, npix)

    def one_band(p0: int) -> None:
        p1 = min(npix, p0 + band)
        with np.errstate(all="ignore"):  # per thread: NumPy's error state is thread-local
            m, v, nu, sel = _clip_band(
                xp, a.data[:, p0:p1], a.bad[:, p0:p1], w64, a.nsigma, a.niter, return_used
            )
        mean[p0:p1] = m
        var[p0:p1] = v
        n_used[p0:p1] = nu
        if return_used:
            used[:, p0:p1] = sel

    # Bands write disjoint columns: one thread per core gives the same bits as one thread.
    starts = range(0, npix, band)
    parallel_map(one_band, starts, cpu_workers(len(starts), _CPU_THREADS, parallel=xp is np))
    shp = a.spatial_shape
    out = (mean.reshape(shp), var.reshape(shp), n_used.reshape(shp))
    if return_used:
        return out + (used.reshape((nep,) + shp),)
    return out


# ----------------------------------------------------------------------------------------
# mask_dilate_or
# ----------------------------------------------------------------------------------------


def _as_int32_bits(xp, mask):
    """Mask pixels as int32 bit patterns (uint32 reinterpreted, narrower ints widened)."""
    if mask.dtype.kind not in "iub":
        raise InvalidInputError(
            f"mask_dilate_or: mask must be an integer array, got dtype {mask.dtype}"
        )
    if mask.dtype == xp.int32:
        return mask
    if mask.dtype == xp.uint32:
        return mask.view(xp.int32)
    if mask.dtype.itemsize < 4 or mask.dtype.kind == "b":
        return mask.astype(xp.int32)
    # 64-bit integers: only if every value fits in 32 bits
    if mask.size and (bool((mask < -(2**31)).any()) or bool((mask >= 2**32).any())):
        raise InvalidInputError("mask_dilate_or: mask values do not fit in 32 bits")
    return mask.astype(xp.int64).astype(xp.uint32).view(xp.int32)


def footprint_offsets(footprint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dy, dx) int32 offsets of the nonzero pixels of a host 2-d ``footprint``, relative
    to afw's centre ``ctrY = (kh-1)//2, ctrX = (kw-1)//2``, in row-major order."""
    fp = np.asarray(footprint)
    kh, kw = fp.shape
    ii, jj = np.nonzero(fp)
    return (ii - (kh - 1) // 2).astype(np.int32), (jj - (kw - 1) // 2).astype(np.int32)


def _scatter_dilate_or(m: np.ndarray, nz: np.ndarray, dys: np.ndarray, dxs: np.ndarray):
    """:func:`mask_dilate_or` of a host mask from its set pixels ``nz`` (flat indices):
    ``out[r − dy, c − dx] |= m[r, c]`` for every tap (dy, dx) inside the image."""
    H, W = m.shape
    r, c = np.divmod(nz, W)
    v = m.ravel()[nz]
    out = np.zeros((H, W), dtype=np.int32)
    for dy, dx in zip(dys.tolist(), dxs.tolist()):
        rr, cc = r - dy, c - dx
        ok = (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
        np.bitwise_or.at(out, (rr[ok], cc[ok]), v[ok])
    return out


def validate_mask_dilate_or(mask, footprint):
    """Check the arguments of :func:`mask_dilate_or`; returns (xp, int32 mask, bool footprint)."""
    xp = array_module(mask)
    if mask is None or footprint is None:
        raise InvalidInputError("mask_dilate_or: mask and footprint are required")
    mask = xp.asarray(mask)
    if mask.ndim != 2:
        raise InvalidInputError(f"mask_dilate_or: mask must be 2-d, got shape {tuple(mask.shape)}")
    # the footprint is small: it always lives on the host
    fp = (
        footprint
        if isinstance(footprint, np.ndarray)
        else (
            footprint.get()
            if hasattr(footprint, "__cuda_array_interface__")
            else np.asarray(footprint)
        )
    )
    if fp.ndim != 2 or fp.shape[0] < 1 or fp.shape[1] < 1:
        raise InvalidInputError(
            f"mask_dilate_or: footprint must be a non-empty 2-d array, got shape {fp.shape}"
        )
    if fp.dtype.kind not in "biuf":
        raise InvalidInputError(
            f"mask_dilate_or: footprint must be boolean or numeric, got dtype {fp.dtype}"
        )
    return xp, _as_int32_bits(xp, mask), fp != 0


def _shift_or(xp, a, step: int, axis: int):
    """a[i] | a[i + step] along ``axis`` (zeros beyond the end)."""
    out = a.copy()
    n = a.shape[axis]
    if step < n:
        dst = [slice(None)] * a.ndim
        src = [slice(None)] * a.ndim
        dst[axis], src[axis] = slice(0, n - step), slice(step, n)
        out[tuple(dst)] |= a[tuple(src)]
    return out


def _window_or(xp, a, axis: int, ctr: int, length: int):
    """out[i] = OR of a[i - ctr : i - ctr + length] along ``axis`` (zeros outside)."""
    n = a.shape[axis]
    # Pad so that every window lies inside the array, then use a doubling table:
    # W_{2k}[i] = W_k[i] | W_k[i + k]; a window of any length L is the OR of two
    # overlapping windows of the largest power of two <= L.
    pad = [(0, 0)] * a.ndim
    pad[axis] = (ctr, length - 1 - ctr)
    w = xp.pad(a, pad)
    size = 1
    while 2 * size <= length:
        w = _shift_or(xp, w, size, axis)
        size *= 2
    w = _shift_or(xp, w, length - size, axis) if length > size else w
    sl = [slice(None)] * a.ndim
    sl[axis] = slice(0, n)
    return w[tuple(sl)]


def mask_dilate_or(mask, footprint):
    """Bitwise OR of mask bits under a footprint, afw correlation convention.

    ``out[r, c] = OR_{i,j : fp[i,j]} mask[r - ctrY + i, c - ctrX + j]`` with
    ``ctrY = (kh-1)//2``, ``ctrX = (kw-1)//2``; pixels outside the image contribute 0.
    NumPy twin of ``mask_dilate_or_i32`` in ``cuda/mask_ops.cu``.

    Parameters
    ----------
    mask : integer array (H, W)
        Mask bits (int32; uint32 is reinterpreted bit for bit).
    footprint : array (kh, kw)
        Nonzero = in the footprint (e.g. ``kernel != 0``).

    Returns
    -------
    int32 array (H, W)
    """
    xp, m, fp = validate_mask_dilate_or(mask, footprint)
    if fp.all():
        # A full rectangle (every AL kernel): OR is separable and idempotent, so two 1-D
        # window ORs of log2(k) doubling steps each replace the kh·kw shifted ORs.
        kh, kw = fp.shape
        out = _window_or(xp, m, 1, (kw - 1) // 2, kw)
        return _window_or(xp, out, 0, (kh - 1) // 2, kh)
    H, W = m.shape
    dys, dxs = footprint_offsets(fp)
    if xp is np:
        # Sparse masks (filled cosmic rays: ~0.1 % of the pixels) scatter each set pixel
        # to its taps instead of ORing the whole image once per tap (a 67-tap core cost
        # 67 passes over a 2048² image).  Same bits; not on a device, where the positions
        # would be a host sync.
        nz = np.flatnonzero(m)
        if nz.size * dys.size < m.size // 4:
            return _scatter_dilate_or(m, nz, dys, dxs)
    out = xp.zeros((H, W), dtype=xp.int32)
    for dy, dx in zip(dys.tolist(), dxs.tolist()):
        r0, r1 = max(0, -dy), min(H, H - dy)
        c0, c1 = max(0, -dx), min(W, W - dx)
        if r0 >= r1 or c0 >= c1:
            continue
        out[r0:r1, c0:c1] |= m[r0 + dy : r1 + dy, c0 + dx : c1 + dx]
    return out
