"""ScaleVarianceTask on many images at once, for a device (docs/algorithms.md §6).

:meth:`~gpudiff.tasks.scale_variance.ScaleVarianceTask.compute_scale_factors` costs two
host syncs per image on a device: the background bins (``bin_background``'s transfer) and
the five quartiles.  CompareWarp rescales every PSF-matched warp, so 20 warps spent 40 of
the 68 host syncs of a 20 × 2048² coadd (``bench/bench_device_counts.py``).  Here the N
images' (decimated) planes are stacked, and

1. every bin of every image is clipped by one ``clipped_bins`` launch on the images laid
   one under the other (the bin edges of image k offset by k·h rows: a bin never spans
   two images), and all bins cross to the host in **one** transfer;
2. each image's bins are filled and interpolated as ``estimate_background`` does (host
   work on the tiny grid, then the separable interpolation on the device, no sync);
3. the quartiles of z, of the background-subtracted image and the median variance of
   every image are the 3N columns of one ``quantile_columns`` launch (a good-pixel mask
   per column), and cross with the N good-pixel counts in **one** transfer.

The numbers are the per-image device path's bit for bit: both kernels treat each bin or
column on its own (the NumPy twins sort and sum every column independently, the CUDA
kernel gives each column its own block), every other operation is elementwise on the same
float32 / float64 values, and the host steps are the same code on the same numbers.  On
the CPU, or for images of different shapes, the per-image method runs instead (the CPU
path stays exactly as it was).  ``tests/test_scale_variance_many.py`` compares both forms.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..backend import kernels as _kernels
from ..errors import GpudiffError
from ..image import Exposure, MaskedImage
from ..ops._host import fetch
from ..ops.background import (
    BackgroundBins,
    _bin_edges,
    _bin_sizes,
    fill_bad_bins,
    interpolate_background,
)
from ..ops.stats import _quantiles
from .scale_variance import _ALGORITHMS, IQR_TO_SIGMA, ScaleVarianceFactors, ScaleVarianceTask

__all__ = ["MAX_BATCH_SAMPLES", "compute_scale_factors_many", "run_many"]

#: Samples (pixels after decimation, all images together) measured in one batch: about
#: 60 bytes of device temporaries each, so 2²⁵ samples (32 images of 1024²) take ~2 GB.
MAX_BATCH_SAMPLES = 1 << 25

# estimate_background's defaults, which compute_scale_factors uses (docs/algorithms.md §6)
_NSIGMA, _NITER, _MIN_FRACTION, _EXTRAPOLATE = 3.0, 3, 0.1, "quadratic"


def compute_scale_factors_many(
    task: ScaleVarianceTask, masked_images: Sequence[MaskedImage | Exposure]
) -> list[ScaleVarianceFactors]:
    """:meth:`ScaleVarianceTask.compute_scale_factors` of every image (docs/algorithms.md §6).

    Parameters
    ----------
    task : ScaleVarianceTask
        Its config and backend.
    masked_images : sequence of MaskedImage or Exposure
        Not modified.

    Returns
    -------
    list of ScaleVarianceFactors
        One per image, in order; the per-image method's numbers.  On a device, images of
        one (decimated) shape are measured together, two host syncs per batch of at most
        :data:`MAX_BATCH_SAMPLES` samples; otherwise (the CPU, shapes that differ, a
        constant background) one image at a time.
    """
    mis = [task._decimate(task._on_backend(m)) for m in masked_images]
    order = _ALGORITHMS[task.config.background.algorithm.upper()]
    if (
        not task.backend.is_gpu
        or len(mis) < 2
        or order == "constant"
        or len({mi.shape for mi in mis}) > 1
    ):
        # mis are decimated already: decimating again is a no-op (<= max_samples pixels)
        return [task.compute_scale_factors(mi) for mi in mis]
    per_batch = max(1, MAX_BATCH_SAMPLES // max(1, mis[0].image.size))
    out: list[ScaleVarianceFactors] = []
    for b0 in range(0, len(mis), per_batch):
        out += _batch(task, mis[b0 : b0 + per_batch], order)
    return out


def run_many(
    task: ScaleVarianceTask, masked_images: Sequence[MaskedImage | Exposure]
) -> list[float | GpudiffError]:
    """:meth:`ScaleVarianceTask.run` of every image, from :func:`compute_scale_factors_many`.

    Parameters
    ----------
    task : ScaleVarianceTask
    masked_images : sequence of MaskedImage or Exposure

    Returns
    -------
    list
        Per image the factor, or the :class:`~gpudiff.errors.GpudiffError` that
        :meth:`~ScaleVarianceTask.run` would raise for it (both factors above the limit),
        so that one image's failure leaves the others' factors usable.
    """
    out: list[float | GpudiffError] = []
    for f in compute_scale_factors_many(task, masked_images):
        try:
            out.append(task.select_factor(f))
        except GpudiffError as exc:
            out.append(exc)
    return out


def _stacked_bitmask(xp, mis: list, planes: Sequence[str]) -> Any:
    """The images' bitmasks of ``planes``: one scalar when they agree, else (N, 1, 1)."""
    bms = [mi.mask_planes.bitmask_if_present(list(planes)) for mi in mis]
    if len(set(bms)) == 1:
        return bms[0]
    # int64 holds every plane bit of any image (an int32 mask with bit 31 would overflow).
    return xp.asarray(np.asarray(bms, dtype=np.int64))[:, None, None]


def _batch(task: ScaleVarianceTask, mis: list, order: str) -> list[ScaleVarianceFactors]:
    """The factors of images of one shape (two host syncs)."""
    be, cfg = task.backend, task.config
    xp = be.xp
    n = len(mis)
    h, w = mis[0].shape
    npix = h * w
    img = xp.stack([mi.image for mi in mis])
    var = xp.stack([mi.variance for mi in mis])
    mask = xp.stack([mi.mask for mi in mis])
    finite = xp.isfinite(img) & xp.isfinite(var)
    bc = cfg.background
    bg_planes = cfg.mask_planes if bc.ignored_pixel_mask is None else bc.ignored_pixel_mask
    # MaskedImage.good_pixels of every image (the background bins' pixels) ...
    good_bg = ((mask & _stacked_bitmask(xp, mis, bg_planes)) == 0) & finite
    # ... and compute_scale_factors' good pixels
    good = ((mask & _stacked_bitmask(xp, mis, cfg.mask_planes)) == 0) & finite & (var > 0)
    del mask, finite

    # 1. bin_background of every image: one launch, one transfer
    by, bx = _bin_sizes(int(bc.bin_size))
    ye, xe = _bin_edges(h, by), _bin_edges(w, bx)
    ny, nx = ye.size - 1, xe.size - 1
    ye_all = np.concatenate([ye[:-1] + k * h for k in range(n)] + [np.array([n * h])])
    mean, _, n_used, n_good = _kernels.get_kernel("clipped_bins", be)(
        img.reshape(n * h, w),
        good_bg.reshape(n * h, w),
        ye_all,
        xe,
        _NSIGMA,
        _NITER,
        want_var=False,
        good_is_finite=img.dtype == np.float32,  # good_pixels implies a finite image
    )
    del good_bg
    bins = be.asnumpy(xp.stack([mean.astype(np.float64), n_used.astype(np.float64), n_good]))
    area = np.diff(ye)[:, None] * np.diff(xe)[None, :]
    yc, xc = 0.5 * (ye[:-1] + ye[1:] - 1), 0.5 * (xe[:-1] + xe[1:] - 1)

    # 2. each image's background model (bin_background's host tail, then the interpolation)
    backgrounds = []
    for k in range(n):
        sl = slice(k * ny * nx, (k + 1) * ny * nx)
        raw = bins[0, sl].reshape(ny, nx)
        used = bins[1, sl].astype(np.int32).reshape(ny, nx)
        n_valid = bins[2, sl].astype(np.int64).reshape(ny, nx)
        ok = np.isfinite(raw) & (used >= 2) & (n_valid >= _MIN_FRACTION * area)
        if not ok.any():
            # ScaleVarianceTask._background's fallback for AllMaskedError: one constant
            # level, the median of the good pixels (no sync: it stays on the device)
            bg = _quantiles(be, [img[k].astype(np.float64)], good[k], [(0.5,)])[0]
            backgrounds.append(xp.broadcast_to(bg, (h, w)))
            continue
        values = raw.copy() if ok.all() else fill_bad_bins(raw, ok, yc, xc, "linear")
        model = BackgroundBins(
            values=values, raw=raw, n_valid=n_valid, good=ok, y_edges=ye, x_edges=xe
        )
        backgrounds.append(
            interpolate_background(model, (h, w), order, _EXTRAPOLATE, backend=be).astype(
                np.float64
            )
        )

    # 3. the quartiles of every image as the 3N columns of one launch, one transfer
    sub = img.astype(np.float64) - xp.stack(backgrounds)
    del backgrounds
    var64 = var.astype(np.float64)
    with np.errstate(all="ignore"):  # bad pixels (var <= 0, NaN) are outside ``good``
        z = sub / xp.sqrt(var64)
    # columns per image: z, image - background, variance (compute_scale_factors' order)
    cols = xp.stack([z, sub, var64], axis=1, dtype=xp.float32).reshape(3 * n, npix)
    del z, sub, var64
    good_cols = xp.repeat(good.reshape(n, 1, npix), 3, axis=1).reshape(3 * n, npix)
    table = np.tile(np.array([[0.25, 0.75], [0.25, 0.75], [0.5, np.nan]]), (n, 1))
    q = _kernels.get_kernel("quantile_columns", be)(cols.T, good_cols.T, table)
    q, n_dev = fetch(be, q.reshape(n, 6)[:, :5], good.reshape(n, npix).sum(axis=1))
    out = []
    for k in range(n):
        n_good_k = int(n_dev[k])
        if n_good_k < 2:
            out.append(ScaleVarianceFactors(float("nan"), float("nan"), n_good_k))
            continue
        zq1, zq3, q1, q3, median_var = (float(v) for v in q[k])
        pixel_factor = (IQR_TO_SIGMA * (zq3 - zq1)) ** 2
        image_factor = float((IQR_TO_SIGMA * (q3 - q1) / math.sqrt(median_var)) ** 2)
        out.append(ScaleVarianceFactors(pixel_factor, image_factor, n_good_k))
    return out
