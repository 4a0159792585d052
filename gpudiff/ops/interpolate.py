"""Interpolation over masked defects before any convolution.

A bad column of a raw CCD holds garbage (up to several times saturation); a cosmic ray
or a saturated core holds values no model describes; NO_DATA holds NaN.  A convolution
spreads each of them over the kernel's footprint, and a decorrelation filter further
still, so they must be replaced by something that looks like the sky and sources around
them *before* the first convolution.  A constant fill (LSST's
``interpolateBadMaskPlanes`` uses the image median) leaves a step at the edge of every
filled region that the kernel turns into a ±stripe; this module interpolates instead,
in the spirit of afw's ``interpolateOverDefects``:

1. every bad pixel gets the linear interpolation between the nearest good pixels on
   either side of its run, along its row and along its column; the two are combined
   with weights 1/L² (L the run length), so a bad column is filled from its left and
   right neighbours and a bad row from above and below, and a blob from both;
2. a pixel whose shorter run is longer than ``max_run`` (the inside of a large blob or
   of an edge strip), or with good pixels on one side only in both directions, takes
   the PSF-smoothed neighbourhood instead: a normalized Gaussian convolution of the good
   pixels (σ the PSF's, doubled until it reaches good pixels).

Everything is vectorized: the neighbours of every bad pixel are found with one
``searchsorted`` of the bad pixels' flat indices in the good pixels' flat indices (row-
major for rows, column-major for columns); no Python loop over pixels or runs.  The code
is written once against ``backend.xp`` (NumPy or CuPy).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from ..backend import Backend, resolve_backend
from ..image import MaskedImage

__all__ = ["DEFAULT_INTERPOLATE_PLANES", "interpolate_over_defects", "defect_pixels"]

#: The planes filled by default: what raw data and LSST's ``badMaskPlanes`` call unusable,
#: plus cosmic rays (LSST's calexps arrive with them already interpolated).
DEFAULT_INTERPOLATE_PLANES: tuple[str, ...] = ("NO_DATA", "BAD", "SAT", "CR", "EDGE")


def defect_pixels(mi: MaskedImage, planes: Iterable[str] = DEFAULT_INTERPOLATE_PLANES) -> Any:
    """Boolean array: pixels with any of ``planes`` set or a non-finite image or variance."""
    xp = mi.backend.xp
    bm = mi.mask_planes.bitmask_if_present(list(planes))
    bad = ~(xp.isfinite(mi.image) & xp.isfinite(mi.variance))
    if bm:
        bad |= (mi.mask & bm) != 0
    return bad


def _runs(xp: Any, bad_flat: Any, n_line: int):
    """For each bad flat index (sorted; lines of ``n_line`` pixels), the flat indices of the
    first and last pixels of its run: the maximal stretch of consecutive bad pixels of its
    line that holds it."""
    n = int(bad_flat.size)
    if n == 0:
        return bad_flat, bad_flat
    start = xp.ones(n, dtype=bool)
    start[1:] = (bad_flat[1:] != bad_flat[:-1] + 1) | (bad_flat[1:] % n_line == 0)
    first = xp.flatnonzero(start)
    run = xp.cumsum(start) - 1
    # Each run ends where the next begins; the last run at the last bad pixel.
    last = xp.concatenate([first[1:] - 1, xp.full(1, n - 1, dtype=first.dtype)])
    return bad_flat[first][run], bad_flat[last][run]


def _line_fill(xp: Any, at: Any, bad_flat: Any, n_line: int):
    """Linear interpolation of each plane along lines; returns (values, run length) with
    the run length +inf where one side is missing (values then one-sided).

    The nearest good pixels before and after a bad pixel on its line are the neighbours
    of its run: found from the (few) bad pixels alone, never from the good ones.  ``at``
    maps flat indices of this order to ``(rows, columns)`` of the planes, and back the
    values of each plane there (float64)."""
    first, last = _runs(xp, bad_flat, n_line)
    lo, hi = first - 1, last + 1
    has_lo = first % n_line != 0
    has_hi = hi % n_line != 0
    d_lo = (bad_flat - lo).astype(np.float64)
    d_hi = (hi - bad_flat).astype(np.float64)
    both = has_lo & has_hi
    w_hi = xp.where(both, d_lo / xp.where(both, d_lo + d_hi, 1.0), xp.where(has_hi, 1.0, 0.0))
    w_lo = 1.0 - w_hi
    # A missing side has weight 0; its value only has to be finite.
    v_lo = [xp.where(has_lo, v, 0.0) for v in at(xp.where(has_lo, lo, bad_flat))]
    v_hi = [xp.where(has_hi, v, 0.0) for v in at(xp.where(has_hi, hi, bad_flat))]
    vals = [a * w_lo + b * w_hi for a, b in zip(v_lo, v_hi)]
    run = xp.where(both, d_lo + d_hi - 1.0, xp.inf)
    return vals, run, has_lo | has_hi


def _smoothed(be: Backend, planes: list, good: Any, where: Any, sigma: float) -> list:
    """Normalized Gaussian convolution of the good pixels at ``where`` (2-D bool of the
    pixels to fill), σ doubled until every such pixel sees good pixels (then the mean of
    the good pixels, for a region wider than the image).  Each pass filters only the
    box around the pixels still to fill, grown by the filter's reach (4σ)."""
    xp, nd = be.xp, be.ndimage
    todo = where.copy()
    out = [xp.zeros(where.shape, dtype=np.float64) for _ in planes]
    s = float(sigma)
    H, W = good.shape
    while bool(todo.any()) and s <= 2 * max(H, W):
        rr = xp.flatnonzero(todo.any(axis=1))
        cc = xp.flatnonzero(todo.any(axis=0))
        reach = int(math.ceil(4 * s)) + 1
        y0, y1 = max(int(rr[0]) - reach, 0), min(int(rr[-1]) + reach + 1, H)
        x0, x1 = max(int(cc[0]) - reach, 0), min(int(cc[-1]) + reach + 1, W)
        sl = (slice(y0, y1), slice(x0, x1))
        g = good[sl]
        den = nd.gaussian_filter(g.astype(np.float64), s, mode="constant", cval=0.0)
        ok = todo[sl] & (den > 1e-3)
        if bool(ok.any()):
            for o, p in zip(out, planes):
                num = nd.gaussian_filter(xp.where(g, p[sl], 0.0), s, mode="constant", cval=0.0)
                o[sl] = xp.where(ok, num / xp.where(ok, den, 1.0), o[sl])
            todo[sl] &= ~ok
        s *= 2.0
    if bool(todo.any()):
        for o, p in zip(out, planes):
            o[todo] = p[good].mean()
    return [o.ravel() for o in out]


def interpolate_over_defects(
    mi: MaskedImage,
    planes: Iterable[str] = DEFAULT_INTERPOLATE_PLANES,
    *,
    fwhm: float = 3.0,
    max_run: int | None = None,
    backend: Backend | str | None = None,
) -> MaskedImage:
    """Replace defect pixels by an interpolation of their good neighbours.

    Parameters
    ----------
    mi : MaskedImage
        Not modified.
    planes : iterable of str
        Mask planes whose pixels are replaced (those the image does not define are
        ignored); pixels with a non-finite image or variance are always replaced.
    fwhm : float
        PSF FWHM, pixels: the σ of the smoothed-neighbourhood fallback is FWHM/2.355.
    max_run : int, optional
        Longest run (pixels) bridged by linear interpolation; default ``max(8, 4·fwhm)``.
        A pixel whose shorter run (row or column) is longer, or that has good pixels on
        one side only in both directions, takes the smoothed neighbourhood.
    backend : Backend or str, optional
        Default: the image's.

    Returns
    -------
    MaskedImage
        A new image whose defect pixels hold the interpolated image and variance values,
        flagged ``INTRP`` (added if undefined) on top of their original planes.  ``mi``
        itself when no pixel needs filling or no pixel is good (nothing to interpolate
        from).
    """
    be = resolve_backend(backend) if backend is not None else mi.backend
    if mi.backend.name != be.name:
        mi = mi.to_backend(be)
    xp = be.xp
    fwhm = float(fwhm)
    if not (math.isfinite(fwhm) and fwhm > 0):
        fwhm = 3.0
    max_run = max(8, int(math.ceil(4 * fwhm))) if max_run is None else int(max_run)
    bad = defect_pixels(mi, planes)
    n_bad = int(xp.count_nonzero(bad))
    if n_bad == 0 or n_bad == bad.size:
        return mi
    H, W = bad.shape
    good = ~bad

    def planes_at(r, c):
        return [mi.image[r, c].astype(np.float64), mi.variance[r, c].astype(np.float64)]

    # Along rows (row-major flat indices) and along columns (column-major); only the
    # bad pixels and their neighbours are touched (a few thousand of millions).
    rows_bad = xp.flatnonzero(bad.ravel())
    vals_r, run_r, _ = _line_fill(xp, lambda f: planes_at(f // W, f % W), rows_bad, W)
    r_of_r, c_of_r = rows_bad // W, rows_bad % W
    cm = c_of_r * H + r_of_r
    order = xp.argsort(cm)  # column-major position → row-major position
    vals_c, run_c, _ = _line_fill(xp, lambda f: planes_at(f % H, f // H), cm[order], H)
    # Column-major results back to the row-major order of rows_bad.
    back = xp.empty_like(order)
    back[order] = xp.arange(order.size)
    vals_c = [v[back] for v in vals_c]
    run_c = run_c[back]

    # 1/L² weights; a one-sided direction (L = inf) only counts when it is all there is.
    w_r = xp.where(xp.isfinite(run_r), 1.0 / (run_r * run_r), 0.0)
    w_c = xp.where(xp.isfinite(run_c), 1.0 / (run_c * run_c), 0.0)
    wsum = w_r + w_c
    two_sided = wsum > 0
    safe = xp.where(two_sided, wsum, 1.0)
    fill = [
        xp.where(two_sided, (vr * w_r + vc * w_c) / safe, 0.0) for vr, vc in zip(vals_r, vals_c)
    ]
    shortest = xp.minimum(run_r, run_c)
    far = ~two_sided | (shortest > max_run)
    if bool(far.any()):
        where = xp.zeros(H * W, dtype=bool)
        idx = rows_bad[far]
        where[idx] = True
        where = where.reshape(H, W)
        img = xp.where(good, mi.image, 0).astype(np.float64)
        var = xp.where(good, mi.variance, 0).astype(np.float64)
        sm = _smoothed(be, [img, var], good, where, fwhm / 2.3548)
        for f, s in zip(fill, sm):
            f[far] = s[idx]
    new_img = mi.image.copy()
    new_var = mi.variance.copy()
    new_img.ravel()[rows_bad] = fill[0].astype(np.float32)
    new_var.ravel()[rows_bad] = fill[1].astype(np.float32)
    # The planes are fresh arrays of the right dtypes: adopted, not copied again.
    mask, mask_planes = mi._plane_set("INTRP", bad)
    return MaskedImage._adopt(
        new_img, new_var, mask, xy0=mi.xy0, mask_planes=mask_planes, backend=be
    )
