"""Linear trails (satellites, aircraft, meteors) in a difference image.

LSST's ``MaskStreaksTask`` finds Canny edges of the detection mask and votes them into a
Kernel Hough Transform, then fits a line profile to the image.  Here, vectorized over
pixels rather than per edge:

1. The per-pixel significance (the matched-filtered S/N of detection, both signs) is
   thresholded low (3σ by default, below the 5σ detection threshold, so a faint trail that
   breaks into pieces at 5σ is still one line of pixels).
2. Its connected components that are compact (round blobs: stars, residuals, cosmic rays,
   noise) are dropped by their second moments; trail pieces are elongated.
3. The remaining pixels vote into a Hough accumulator (θ, ρ) on a 512-px binned grid
   (``np.bincount`` over pixel × angle chunks); the strongest cell is refined on the full
   grid by a weighted principal-axis fit of the pixels in its band (twice, narrowing).
4. A candidate is kept when it is long (``min_length``), thin (length / width ≥
   ``min_aspect``) and continuous (``min_coverage`` of its length has pixels); its votes are
   removed and the next cell is tried.
5. The trail's width is fitted on the image: the median perpendicular profile of the
   difference along the trail gives its Gaussian σ and amplitude; the mask covers the
   pixels where that profile exceeds ``mask_fraction`` of the per-pixel noise, widened by
   the PSF σ.

Image-level work runs on the image's backend; the handful of per-streak scalars on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from ..backend import Backend, resolve_backend
from ..errors import InvalidInputError
from ..image import MaskedImage
from ._host import fetch
from .footprints import dilate_disk as _dilate_disk

__all__ = ["Streak", "StreakResult", "find_streaks"]

#: Binned grid of the Hough accumulator (pixels along the longer side): keeps the number of
#: angle × pixel votes bounded at any image size; the line is then refined at full resolution.
_HOUGH_GRID = 512
#: Votes per chunk (pixels × angles), bounding the temporaries to ~64 MB.
_CHUNK = 1 << 22


@dataclass(frozen=True)
class Streak:
    """One linear trail.

    Attributes
    ----------
    x0, y0, x1, y1 : float
        End points of the trail's detected extent (parent pixels).
    angle : float
        Direction, degrees in [0, 180) counter-clockwise from +x.
    length : float
        Detected extent along the line, pixels.
    width : float
        Gaussian σ of the fitted cross-section, pixels.
    amplitude : float
        Fitted peak of the cross-section (image units, signed: negative for a trail in
        the template).
    half_width : float
        Half-width of the masked band, pixels.
    coverage : float
        Fraction of the extent that had significant pixels.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    angle: float
    length: float
    width: float
    amplitude: float
    half_width: float
    coverage: float


@dataclass
class StreakResult:
    """Streaks found, and ``labels``: int32 (H, W) on the backend, k + 1 on streak k's
    masked band, 0 elsewhere (``labels > 0`` is the STREAK mask)."""

    streaks: list
    labels: Any


def _components(be: Backend, on):
    """The pixels of ``on`` (row-major) and their 8-connected component labels (1…n):
    backend arrays (ys, xs, lab), or None when ``on`` has no pixel."""
    xp, nd = be.xp, be.ndimage
    labels, n = nd.label(on, structure=be.asarray(np.ones((3, 3), dtype=bool)))
    if int(n) == 0:
        return None
    ys, xs = xp.nonzero(labels)
    return ys, xs, labels[ys, xs]


def _elongated(ys, xs, lab, min_pixels: int, min_axis_ratio: float, min_length: float):
    """Which pixels (host arrays from :func:`_components`) belong to components that are
    elongated (principal axis ratio ≥ ``min_axis_ratio``) or long (major axis ≥
    ``min_length``), with at least ``min_pixels`` pixels.

    On the host: the components' pixels cross to it anyway (for the Hough search), and
    these moments are ~50 small launches on a device.
    """
    n = int(lab.max()) if lab.size else 0
    xf, yf = xs.astype(np.float64), ys.astype(np.float64)

    def s(v):
        return np.bincount(lab, weights=v, minlength=n + 1)

    cnt = np.bincount(lab, minlength=n + 1).astype(np.float64)
    c = np.maximum(cnt, 1.0)
    mx, my = s(xf) / c, s(yf) / c
    sxx = s(xf * xf) / c - mx * mx + 1.0 / 12  # + a pixel's own extent
    syy = s(yf * yf) / c - my * my + 1.0 / 12
    sxy = s(xf * yf) / c - mx * my
    tr, det = sxx + syy, sxx * syy - sxy * sxy
    disc = np.sqrt(np.maximum(tr * tr / 4 - det, 0))
    l1, l2 = tr / 2 + disc, np.maximum(tr / 2 - disc, 1e-12)
    ratio = np.sqrt(l1 / l2)
    # A uniform segment of length L has σ_major = L/√12.
    keep = (cnt >= min_pixels) & ((ratio >= min_axis_ratio) | (np.sqrt(12 * l1) >= min_length))
    keep[0] = False
    return keep[lab]


def _hough(be: Backend, xs, ys, thetas, n_rho: int, rho_min: float, weights=None):
    """Accumulator (n_theta, n_rho) of ρ = x cos θ + y sin θ, 1-unit ρ bins from rho_min."""
    xp = be.xp
    nt = thetas.size
    c, s = xp.cos(thetas), xp.sin(thetas)
    acc = xp.zeros(nt * n_rho, dtype=xp.float64)
    step = max(1, _CHUNK // nt)
    t_idx = xp.arange(nt, dtype=xp.int64)[None, :] * n_rho
    for i in range(0, int(xs.size), step):  # chunks of pixels, bounded memory
        x, y = xs[i : i + step, None], ys[i : i + step, None]
        r = xp.floor(x * c[None, :] + y * s[None, :] - rho_min).astype(xp.int64)
        r = xp.clip(r, 0, n_rho - 1)
        w = (
            None
            if weights is None
            else xp.broadcast_to(weights[i : i + step, None], r.shape).ravel()
        )
        idx = (r + t_idx).ravel()
        if be.is_gpu:
            # Votes scatter-added into the accumulator: no host sync (cupy.bincount has
            # two per call) and one launch per chunk.
            xp.add.at(acc, idx, 1.0 if w is None else w)
        else:
            acc += np.bincount(idx, weights=w, minlength=nt * n_rho)
    return acc.reshape(nt, n_rho)


def _axis_fit(xs, ys, w):
    """Weighted principal axis: (centre x, centre y, unit direction (ux, uy))."""
    sw = w.sum()
    mx, my = (w * xs).sum() / sw, (w * ys).sum() / sw
    dx, dy = xs - mx, ys - my
    cxx, cyy, cxy = (w * dx * dx).sum() / sw, (w * dy * dy).sum() / sw, (w * dx * dy).sum() / sw
    ang = 0.5 * math.atan2(2 * cxy, cxx - cyy)
    return mx, my, math.cos(ang), math.sin(ang)


def find_streaks(
    mi: MaskedImage,
    significance: Any,
    psf_sigma: float,
    *,
    threshold: float = 3.0,
    min_length: float | None = None,
    min_aspect: float = 6.0,
    min_coverage: float = 0.4,
    max_streaks: int = 10,
    mask_fraction: float = 0.5,
    exclude_planes: Iterable[str] = ("NO_DATA", "EDGE", "BAD", "SAT"),
    backend: Backend | str | None = None,
) -> StreakResult:
    """Find linear trails in a difference image and the band each one covers.

    Parameters
    ----------
    mi : MaskedImage
        The difference (not modified); its image and variance give the fitted profile.
    significance : array (H, W)
        Per-pixel S/N used for detection (e.g. ``DetectionResult.significance``: the
        PSF-matched-filtered difference over its noise, or the score's S/N).  Both signs
        count: a trail in the template is negative in the difference.
    psf_sigma : float
        Gaussian σ of the PSF, pixels (sets the default length, the compact-blob cut and
        the widening of the mask).
    threshold : float
        |significance| above which pixels vote.
    min_length : float, optional
        Shortest trail, pixels (default max(30, 8 × FWHM)): longer than any unresolved
        residual (compact blobs were dropped by shape first).
    min_aspect : float
        Least length / (2.35 × width): a trail is thin.
    min_coverage : float
        Least fraction of 2-px steps along the extent holding significant pixels: aligned
        but separate stars or residuals cover a small fraction of the line between them.
    max_streaks : int
        Stop after this many.
    mask_fraction : float
        The band is masked where the fitted profile exceeds this fraction of the
        per-pixel noise σ.
    exclude_planes : iterable of str
        Pixels within 3 PSF σ of these planes do not vote (masked defects: a BAD column is a
        line too).
    backend : Backend or str, optional

    Returns
    -------
    StreakResult
    """
    if not isinstance(mi, MaskedImage):
        raise InvalidInputError(f"find_streaks needs a MaskedImage, got {type(mi).__name__}")
    if not (psf_sigma > 0 and math.isfinite(psf_sigma)):
        raise InvalidInputError(f"find_streaks: psf_sigma must be > 0, got {psf_sigma!r}")
    if not (threshold > 0 and math.isfinite(threshold)):
        raise InvalidInputError(f"find_streaks: threshold must be > 0, got {threshold!r}")
    be = resolve_backend(backend if backend is not None else mi.backend)
    if be.name != mi.backend.name:
        mi = mi.to_backend(be)
    xp = be.xp
    sig = be.asarray(significance, dtype=xp.float32)
    H, W = mi.shape
    if sig.shape != (H, W):
        raise InvalidInputError(
            f"find_streaks: significance shape {sig.shape} differs from {mi.shape}"
        )
    fwhm = 2.3548 * psf_sigma
    min_length = max(30.0, 8.0 * fwhm) if min_length is None else float(min_length)
    labels_out = xp.zeros((H, W), dtype=xp.int32)
    excl = mi.mask_planes.bitmask_if_present(list(exclude_planes))
    on = (xp.abs(sig) >= threshold) & xp.isfinite(sig)
    if excl:
        # The matched filter spreads a masked defect's values over the PSF footprint
        # around it (a BAD column of garbage becomes a bright line): those pixels do not
        # vote either.
        on &= ~_dilate_disk(be, (mi.mask & excl) != 0, int(math.ceil(3 * psf_sigma)))
    # Compact blobs (stars, residual rings, CRs, noise) are not lines: a PSF-sized blob has
    # axis ratio ~1; a trail piece of length ≥ 3 × its thresholded width has ≥ 3 (the lobes
    # of a bright star's residual ring reach ~2.5 and lined up as false trails at 2).
    got = _components(be, on)
    if got is None:
        return StreakResult([], labels_out)
    # The candidate pixels go to the host in one transfer with their labels and |S/N|;
    # the component shapes are measured there and the Hough search runs there: on a
    # device its loop of small steps cost ~300 launches and ~100 host syncs per image.
    # Only a line that passes the fit is profiled on the device, on the full image.
    ys_d, xs_d, lab_d = got
    ys_all, xs_all, lab, sig_on = fetch(be, ys_d, xs_d, lab_d, xp.abs(sig[ys_d, xs_d]))
    kept = _elongated(
        ys_all,
        xs_all,
        lab,
        min_pixels=max(5, int(psf_sigma**2)),
        min_axis_ratio=3.0,
        min_length=min_length,
    )
    ys_all, xs_all, sig_on = ys_all[kept], xs_all[kept], sig_on[kept]
    if not ys_all.size:
        return StreakResult([], labels_out)
    hb = resolve_backend("numpy")
    # The occupied b × b blocks, row-major (as the nonzero of their OR map).
    b = max(1, -(-max(H, W) // _HOUGH_GRID))
    Wb = -(-W // b)
    yb, xb = np.divmod(np.unique((ys_all // b) * Wb + xs_all // b), Wb)
    xb = (xb.astype(np.float64) + 0.5) * b - 0.5  # block centres in full-resolution pixels
    yb = (yb.astype(np.float64) + 0.5) * b - 0.5
    d = math.hypot(H, W)
    rho_min, n_rho = -d - b, int(math.ceil((2 * d + 2 * b) / b)) + 1
    n_theta = int(min(1440, max(180, math.ceil(math.pi * d / b / 2))))
    thetas = np.linspace(0.0, math.pi, n_theta, endpoint=False)
    # ρ in binned units: scale the coordinates so a bin is b full pixels.
    acc = _hough(hb, xb / b, yb / b, thetas, n_rho, rho_min / b)
    # A line of width ≲ b straddles two ρ bins: score cells by the sum of three.
    sig_on = sig_on.astype(np.float64)
    xs_all, ys_all = xs_all.astype(np.float64), ys_all.astype(np.float64)
    min_votes = 0.5 * min_length / b
    img = yy = xx = None  # full-image arrays, made when a line first passes the fit
    streaks: list[Streak] = []
    for _ in range(4 * max_streaks):
        score = acc.copy()
        score[:, 1:] += acc[:, :-1]
        score[:, :-1] += acc[:, 1:]
        k = int(np.argmax(score))
        it, ir = divmod(k, n_rho)
        if float(score[it, ir]) / 3.0 < min_votes or len(streaks) >= max_streaks:
            break
        th = float(thetas[it])
        rho = (ir + 0.5) * b + rho_min
        # Remove this cell's binned votes whether the candidate is kept or not.
        pb = np.abs(xb * math.cos(th) + yb * math.sin(th) - rho) <= 1.5 * b
        if pb.any():
            acc -= _hough(hb, xb[pb] / b, yb[pb] / b, thetas, n_rho, rho_min / b)
        acc[max(0, it - 1) : it + 2, max(0, ir - 1) : ir + 2] = 0
        st = _fit_streak(
            hb, xs_all, ys_all, sig_on, th, rho, b, psf_sigma, min_length, min_aspect, min_coverage
        )
        if st is None:
            continue
        mx, my, ux, uy, t0, t1, cov = st
        if img is None:
            img = xp.where(xp.isfinite(mi.image), mi.image, 0).astype(xp.float64)
            # Broadcast row and column indices (the (H, W) grid's values, without it).
            yy, xx = xp.arange(H)[:, None], xp.arange(W)[None, :]
        streak, band = _profile(
            be,
            img,
            mi.variance,
            xx,
            yy,
            mx,
            my,
            ux,
            uy,
            t0,
            t1,
            cov,
            psf_sigma,
            mask_fraction,
            mi.xy0,
        )
        if streak is None:
            continue
        streaks.append(streak)
        labels_out = xp.where(band & (labels_out == 0), len(streaks), labels_out).astype(xp.int32)
        # Its pixels vote no more (one transfer per accepted trail).
        keep = ~be.asnumpy(
            band[be.asarray(ys_all.astype(np.int64)), be.asarray(xs_all.astype(np.int64))]
        )
        xs_all, ys_all, sig_on = xs_all[keep], ys_all[keep], sig_on[keep]
    return StreakResult(streaks, labels_out)


def _fit_streak(be, xs, ys, w, th, rho, b, psf_sigma, min_length, min_aspect, min_coverage):
    """Refine a Hough cell on the full-resolution pixels; None when it is not a trail."""
    xp, host = be.xp, be.asnumpy
    ux, uy = -math.sin(th), math.cos(th)  # along the line
    mx, my = rho * math.cos(th), rho * math.sin(th)
    # Band widths: the binned cell, then a narrower band around the refined axis.
    for half in (1.5 * b + 2 * psf_sigma, 4 * psf_sigma + 2):
        perp = (xs - mx) * (-uy) + (ys - my) * ux
        sel = xp.abs(perp) <= half
        if int(sel.sum()) < 10:
            return None
        px, py, pw = host(xs[sel]), host(ys[sel]), host(w[sel])
        mx, my, ux, uy = _axis_fit(px, py, pw)
    t = (px - mx) * ux + (py - my) * uy
    p = (px - mx) * (-uy) + (py - my) * ux
    t0, t1 = np.percentile(t, [0.5, 99.5])
    length = float(t1 - t0)
    if length < min_length:
        return None
    inside = (t >= t0) & (t <= t1)
    steps = np.unique(np.floor((t[inside] - t0) / 2.0))
    cov = steps.size / max(1.0, math.ceil(length / 2.0))
    width = math.sqrt(max(np.average(p[inside] ** 2, weights=pw[inside]), 0.25))
    if cov < min_coverage or length / (2.3548 * width) < min_aspect:
        return None
    return mx, my, ux, uy, float(t0), float(t1), float(cov)


def _profile(be, img, var, xx, yy, mx, my, ux, uy, t0, t1, cov, psf_sigma, mask_fraction, xy0):
    """Fit the trail's perpendicular profile on the image and build its masked band."""
    xp, host = be.xp, be.asnumpy
    t = (xx - mx) * ux + (yy - my) * uy
    p = (xx - mx) * (-uy) + (yy - my) * ux
    r = max(10.0, 6.0 * psf_sigma)
    near = (t >= t0) & (t <= t1) & (xp.abs(p) <= r) & (var > 0)
    pv, iv = host(p[near]), host(img[near])
    if pv.size < 20:
        return None, None
    # Median profile in half-pixel bins (robust to stars crossing the trail).
    bins = np.floor((pv + r) * 2).astype(np.int64)
    order = np.argsort(bins, kind="stable")
    bs, vs = bins[order], iv[order]
    edges = np.flatnonzero(np.diff(bs)) + 1
    centres, meds = [], []
    for grp_b, grp_v in zip(np.split(bs, edges), np.split(vs, edges)):  # ~4r bins, not pixels
        centres.append(grp_b[0] / 2.0 - r + 0.25)
        meds.append(np.median(grp_v))
    c, m = np.asarray(centres), np.asarray(meds)
    far = np.abs(c) > r / 2
    base = float(np.median(m[far])) if far.any() else 0.0
    m = m - base
    core = np.abs(c) <= 2 * psf_sigma + 1
    sign = 1.0 if m[core].sum() >= 0 else -1.0
    q = np.clip(sign * m, 0, None)
    if q.sum() <= 0:
        return None, None
    centre, sigma = 0.0, 2.0 * psf_sigma
    for _ in range(4):  # moments in a window of ±3σ: the clipped noise outside biases σ up
        win = q * (np.abs(c - centre) <= max(3.0 * sigma, 2.0))
        if win.sum() <= 0:
            return None, None
        centre = float((win * c).sum() / win.sum())
        sigma = math.sqrt(max(float((win * (c - centre) ** 2).sum() / win.sum()), 0.25))
    amp = float(np.interp(centre, c, sign * m)) * sign
    noise = math.sqrt(float(np.median(host(var[near]))))
    # Gaussian cross-section above mask_fraction × noise, plus the PSF σ.
    ratio = abs(amp) / max(mask_fraction * noise, 1e-30)
    half = sigma * math.sqrt(2 * math.log(ratio)) if ratio > 1 else sigma
    half = max(half, 2.0 * sigma) + psf_sigma
    mx, my = mx + centre * (-uy), my + centre * ux
    p = p - centre
    margin = 2.0 * half
    band = (xp.abs(p) <= half) & (t >= t0 - margin) & (t <= t1 + margin)
    ang = math.degrees(math.atan2(uy, ux)) % 180.0
    x0, y0 = xy0
    st = Streak(
        x0=float(mx + t0 * ux + x0),
        y0=float(my + t0 * uy + y0),
        x1=float(mx + t1 * ux + x0),
        y1=float(my + t1 * uy + y0),
        angle=ang,
        length=float(t1 - t0),
        width=sigma,
        amplitude=amp,
        half_width=half,
        coverage=cov,
    )
    return st, band
