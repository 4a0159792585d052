"""afw-style statistics of samples and masked images (spec §0.5), and batched moments of stamps.

``MEANCLIP`` / ``STDEVCLIP`` are computed by the registered ``clipped_stack`` kernel (CUDA on
CuPy, its NumPy twin on the CPU), which already implements afw's semantics exactly: pass 0
clips at median ± nσ·0.741301109·IQR, every later pass re-clips the **full** sample around
the previous clipped mean with half-width nσ·(previous clipped stdev), and the variance is
the ddof=1 variance of the survivors.  This module only arranges the data for it (a 1-D
sample is a stack of depth N over a single "pixel") and applies an and-mask.

The stamp helpers at the end (:func:`gather_stamps`, :func:`weighted_centroid`,
:func:`adaptive_moments_batch`) compute first and second moments of stacks of small
cut-outs, shape (n, s, s), in one vectorized pass per iteration on either backend; source
measurement (:mod:`gpudiff.ops.detection`) is built on them.
"""

from __future__ import annotations

import math
from typing import Any, Iterable


from ..backend import Backend, resolve_backend
from ..backend.kernels import clipped_stack
from ..errors import AllMaskedError, InvalidInputError, ShapeMismatchError
from ..image import Exposure, MaskedImage, MaskPlanes

__all__ = [
    "MAD_TO_SIGMA",
    "STATS_BAD_PLANES",
    "adaptive_moments_batch",
    "clipped_mean_std",
    "gather_stamps",
    "image_statistics",
    "robust_sigma",
    "weighted_centroid",
]

#: σ of a Gaussian per median absolute deviation, 1/Φ⁻¹(3/4).
MAD_TO_SIGMA = 1.482602218505602

#: Planes excluded from image statistics by default: defects, saturation, missing data,
#: edges and everything that is not sky (detections, cosmic rays, interpolated pixels).
STATS_BAD_PLANES: tuple[str, ...] = (
    "BAD", "SAT", "NO_DATA", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "CR", "INTRP", "SUSPECT",
)


def _flat_sample(values: Any, bad: Any, be: Backend):
    """(data, bad) as 1-D backend arrays; non-finite values are marked bad."""
    v = be.asarray(values)
    if v.dtype.kind not in "fiub":
        raise InvalidInputError(f"values must be a real array, got dtype {v.dtype}")
    v = v.reshape(-1)
    if v.size == 0:
        raise InvalidInputError("cannot compute statistics of an empty sample")
    excl = ~be.xp.isfinite(v) if v.dtype.kind == "f" else be.xp.zeros(v.shape, dtype=bool)
    if bad is not None:
        b = be.asarray(bad)
        if int(b.size) != int(v.size):
            raise ShapeMismatchError(f"bad has {b.size} elements but values has {v.size}")
        excl = excl | (b.reshape(-1) != 0)
    return v, excl


def clipped_mean_std(values: Any, nsigma: float = 3.0, niter: int = 3, *, bad: Any = None,
                     backend: Backend | str | None = None) -> tuple[float, float, int]:
    """afw ``MEANCLIP`` and ``STDEVCLIP`` of a sample.

    Parameters
    ----------
    values : array_like
        The sample, any shape (flattened).  NaN and ±inf are ignored.
    nsigma : float
        Clip half-width in σ (afw ``numSigmaClip``).
    niter : int
        Passes including the first median/IQR pass (afw ``numIter``).
    bad : array_like of bool, optional
        Same number of elements as ``values``; True excludes an element (an and-mask
        already applied).
    backend : Backend or str, optional
        Where to compute (default: the default backend).

    Returns
    -------
    mean : float
        Clipped mean (NaN when nothing survives).
    std : float
        Clipped standard deviation, sqrt of afw ``VARIANCECLIP`` (ddof = 1; NaN with
        fewer than two survivors).
    n : int
        Number of samples that survived the final pass.
    """
    be = resolve_backend(backend)
    v, excl = _flat_sample(values, bad, be)
    # A 1-D sample is a stack of depth N over one "pixel": the kernel's axis 0.
    mean, var, n_used = clipped_stack(v, excl, None, nsigma, niter, backend=be)
    m, s2 = float(be.asnumpy(mean)), float(be.asnumpy(var))
    return m, (math.sqrt(s2) if s2 >= 0 else float("nan")), int(be.asnumpy(n_used))


def robust_sigma(values: Any, *, bad: Any = None, backend: Backend | str | None = None) -> float:
    """1.4826 × the median absolute deviation from the median (finite, unmasked values).

    Parameters
    ----------
    values : array_like
    bad : array_like of bool, optional
        True excludes an element.
    backend : Backend or str, optional

    Returns
    -------
    float
        NaN when no value is usable.
    """
    be = resolve_backend(backend)
    xp = be.xp
    v, excl = _flat_sample(values, bad, be)
    good = v[~excl].astype(xp.float64)
    if int(good.size) == 0:
        return float("nan")
    med = xp.median(good)
    return float(MAD_TO_SIGMA * xp.median(xp.abs(good - med)))


def _resolve_planes(mask_planes: MaskPlanes | None) -> MaskPlanes:
    return MaskPlanes() if mask_planes is None else mask_planes


def image_statistics(image: Any, *, mask: Any = None, mask_planes: MaskPlanes | None = None,
                     bad_planes: Iterable[str] = STATS_BAD_PLANES, nsigma: float = 3.0,
                     niter: int = 3, use_variance: bool = False,
                     backend: Backend | str | None = None) -> dict:
    """Clipped statistics of the unmasked, finite pixels of an image (afw ``makeStatistics``).

    Parameters
    ----------
    image : MaskedImage, Exposure or 2-D array
        For a (Masked) image or Exposure, its own mask and mask planes are used and
        ``mask`` / ``mask_planes`` must be omitted.
    mask : int array, optional
        With a plain array: the mask (the and-mask is applied to it).
    mask_planes : MaskPlanes, optional
        With a plain array: the definition of ``mask``; LSST's defaults if omitted.
    bad_planes : iterable of str
        The and-mask: pixels with any of these planes set are excluded (planes absent
        from the definition are ignored).  Pixels with a non-finite value (or, for a
        MaskedImage, a non-finite variance) are always excluded.
    nsigma, niter : float, int
        afw ``numSigmaClip`` and ``numIter``.
    use_variance : bool
        Compute the statistics of the variance plane instead of the image (MaskedImage
        input only; what ScaleVarianceTask needs).
    backend : Backend or str, optional
        Default: the image's backend (arrays: the default backend).

    Returns
    -------
    dict
        ``mean`` (MEANCLIP), ``std`` (STDEVCLIP), ``variance`` (VARIANCECLIP), ``median``
        (MEDIAN of the unclipped usable pixels), ``n`` (afw NPOINT: usable pixels before
        clipping) and ``n_used`` (survivors of the final pass).

    Raises
    ------
    AllMaskedError
        No pixel is usable.
    """
    if isinstance(image, Exposure):
        image = image.masked_image
    if isinstance(image, MaskedImage):
        if mask is not None or mask_planes is not None:
            raise InvalidInputError("image_statistics: a MaskedImage carries its own mask; omit mask/mask_planes")
        be = resolve_backend(backend if backend is not None else image.backend)
        xp = be.xp
        data = be.asarray(image.variance if use_variance else image.image)
        bm = image.mask_planes.bitmask_if_present(list(bad_planes))
        var = be.asarray(image.variance)
        bad = ((be.asarray(image.mask) & bm) != 0) | ~xp.isfinite(var)
    else:
        if use_variance:
            raise InvalidInputError("image_statistics: use_variance needs a MaskedImage")
        be = resolve_backend(backend)
        xp = be.xp
        data = be.asarray(image)
        bad = None
        if mask is not None:
            m = be.asarray(mask)
            if tuple(m.shape) != tuple(data.shape):
                raise ShapeMismatchError(f"mask has shape {tuple(m.shape)} but image has shape {tuple(data.shape)}")
            bm = _resolve_planes(mask_planes).bitmask_if_present(list(bad_planes))
            bad = (m.astype(xp.int64) & bm) != 0
    v, excl = _flat_sample(data, bad, be)
    n_valid = int((~excl).sum())
    if n_valid == 0:
        raise AllMaskedError(
            f"image_statistics: no usable pixel (all non-finite or masked by {', '.join(bad_planes)})")
    mean, var, n_used = clipped_stack(v, excl, None, nsigma, niter, backend=be)
    s2 = float(be.asnumpy(var))
    median = float(xp.median(v[~excl].astype(xp.float64)))
    return {
        "mean": float(be.asnumpy(mean)),
        "std": math.sqrt(s2) if s2 >= 0 else float("nan"),
        "variance": s2,
        "median": median,
        "n": n_valid,
        "n_used": int(be.asnumpy(n_used)),
    }


# ----------------------------------------------------------------------------------------
# moments of stacks of stamps
# ----------------------------------------------------------------------------------------


def gather_stamps(be: Backend, image: Any, rows: Any, cols: Any, half: int, fill: Any = 0):
    """Cut-outs of side 2·half+1 centred on integer pixels, in one gather.

    Parameters
    ----------
    be : Backend
    image : 2-D array on ``be``
    rows, cols : integer arrays (n,)
        Centre pixels (array indices); may lie anywhere, even off the image.
    half : int
    fill : scalar
        Value of the stamp pixels that fall outside the image.

    Returns
    -------
    stamps : array (n, s, s)
    inside : bool array (n, s, s)
        Which stamp pixels lie in the image.
    """
    xp = be.xp
    H, W = image.shape
    o = xp.arange(-half, half + 1)
    r = be.asarray(rows).astype(xp.int64)[:, None] + o[None, :]
    c = be.asarray(cols).astype(xp.int64)[:, None] + o[None, :]
    inside = ((r >= 0) & (r < H))[:, :, None] & ((c >= 0) & (c < W))[:, None, :]
    st = image[xp.clip(r, 0, H - 1)[:, :, None], xp.clip(c, 0, W - 1)[:, None, :]]
    return xp.where(inside, st, xp.asarray(fill, dtype=st.dtype)), inside


def _grid(be: Backend, s: int):
    c = be.xp.arange(s, dtype=be.xp.float64) - (s // 2)
    return c[None, None, :], c[None, :, None]


def weighted_centroid(be: Backend, stamps: Any, x0: Any, y0: Any, sigma: float, niter: int = 20,
                      max_shift: float = 2.0):
    """Iterated Gaussian-weighted centroids of a stack of stamps.

    x ← Σ w·I·x / Σ w·I with w a round Gaussian of ``sigma`` centred on the current x.
    For a symmetric source the true centre is the fixed point, so the estimate is
    unbiased; with ``sigma`` the PSF's σ it is close to the optimal (matched-filter)
    centroid in the sky-noise limit.

    Parameters
    ----------
    stamps : array (n, s, s)
        Background-subtracted, masked pixels zeroed; offsets are from the central pixel.
    x0, y0 : arrays (n,)
        Starting offsets (column, row) from the central pixel.
    sigma : float
    niter : int
    max_shift : float
        A centroid further than this from the central pixel (or with Σ w·I ≤ 0) failed.

    Returns
    -------
    x, y : float64 arrays (n,)
        Offsets from the central pixel.
    ok : bool array (n,)
    """
    xp = be.xp
    X, Y = _grid(be, stamps.shape[1])
    img = stamps.astype(xp.float64)
    x, y = be.asarray(x0).astype(xp.float64), be.asarray(y0).astype(xp.float64)
    ok = xp.ones(x.shape, dtype=bool)
    step = xp.zeros(x.shape)
    for _ in range(niter):
        w = xp.exp(-((X - x[:, None, None]) ** 2 + (Y - y[:, None, None]) ** 2) / (2.0 * sigma * sigma)) * img
        s0 = w.sum(axis=(1, 2))
        good = s0 > 0
        s0 = xp.where(good, s0, 1.0)
        nx, ny = (w * X).sum(axis=(1, 2)) / s0, (w * Y).sum(axis=(1, 2)) / s0
        good &= (xp.abs(nx) <= max_shift) & (xp.abs(ny) <= max_shift)
        ok &= good
        step = xp.where(ok, xp.abs(nx - x) + xp.abs(ny - y), 0.0)
        x, y = xp.where(ok, nx, x), xp.where(ok, ny, y)
    return x, y, ok & (step < 1e-3)


def adaptive_moments_batch(be: Backend, stamps: Any, valid: Any, w_init: float, max_iter: int = 60,
                           tol: float = 1e-6):
    """Adaptive (elliptical-Gaussian-weighted) moments of a stack of stamps.

    The fixed point W = 2·Q of :func:`gpudiff.image.adaptive_moments` (the ``SdssShape``
    definition: a Gaussian of covariance C gives exactly C), iterated for all stamps at
    once; the weight is bounded (σ² ≥ 0.04 px², |ρ| < 0.99) so noise cannot make it
    diverge.

    Parameters
    ----------
    stamps : array (n, s, s)
        Background-subtracted stamps centred near the sources.
    valid : bool array (n, s, s)
        Pixels to use (masked and off-image pixels excluded).
    w_init : float
        Starting weight variance (px²), e.g. the PSF's σ².

    Returns
    -------
    xc, yc, ixx, iyy, ixy : float64 arrays (n,)
        Centroid offsets from the central pixel and moments (px²).
    ok : bool array (n,)
        Converged, with positive weighted flux and a centroid within 2 px.
    """
    xp = be.xp
    n, s, _ = stamps.shape
    X, Y = _grid(be, s)
    img = xp.where(valid, stamps, 0).astype(xp.float64)
    lo, hi = 0.04, float(s * s)
    xc, yc, wxy = xp.zeros(n), xp.zeros(n), xp.zeros(n)
    wxx, wyy = xp.full(n, float(w_init)), xp.full(n, float(w_init))
    ok = xp.ones(n, dtype=bool)
    change = xp.full(n, xp.inf)
    # Iterate only the stamps still moving: most converge in ~10 steps, a few noisy ones
    # need all max_iter, and recomputing the converged ones cost ~80 % of the time.
    act = xp.arange(n)
    for _ in range(max_iter):
        if act.size == 0:
            break
        im = img[act]
        cx, cy, cxx, cyy, cxy = xc[act], yc[act], wxx[act], wyy[act], wxy[act]
        det = (cxx * cyy - cxy * cxy)[:, None, None]
        dx, dy = X - cx[:, None, None], Y - cy[:, None, None]
        q = (cyy[:, None, None] * dx * dx - 2 * cxy[:, None, None] * dx * dy + cxx[:, None, None] * dy * dy) / det
        wd = xp.exp(-0.5 * q) * im
        s0 = wd.sum(axis=(1, 2))
        good = s0 > 0
        s0 = xp.where(good, s0, 1.0)
        nx, ny = (wd * X).sum(axis=(1, 2)) / s0, (wd * Y).sum(axis=(1, 2)) / s0
        dx, dy = X - nx[:, None, None], Y - ny[:, None, None]
        nxx = xp.clip(2 * (wd * dx * dx).sum(axis=(1, 2)) / s0, lo, hi)
        nyy = xp.clip(2 * (wd * dy * dy).sum(axis=(1, 2)) / s0, lo, hi)
        lim = 0.99 * xp.sqrt(nxx * nyy)
        nxy = xp.clip(2 * (wd * dx * dy).sum(axis=(1, 2)) / s0, -lim, lim)
        good &= (xp.abs(nx) <= 2.0) & (xp.abs(ny) <= 2.0)
        ok[act] = ok[act] & good
        upd = ok[act]
        ch = xp.abs(nxx - cxx) + xp.abs(nyy - cyy) + xp.abs(nxy - cxy)
        change[act] = xp.where(upd, ch, change[act])
        xc[act], yc[act] = xp.where(upd, nx, cx), xp.where(upd, ny, cy)
        wxx[act], wyy[act], wxy[act] = xp.where(upd, nxx, cxx), xp.where(upd, nyy, cyy), xp.where(upd, nxy, cxy)
        moving = upd & (change[act] >= tol * (wxx[act] + wyy[act]))
        act = act[moving]
    ok &= change < tol * (wxx + wyy) * 10
    return xc, yc, wxx, wyy, wxy, ok
