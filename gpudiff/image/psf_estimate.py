"""Empirical PSF estimation (:func:`estimate_psf`) for exposures that carry no PSF.

The image layer may not use :mod:`gpudiff.ops`, so this module has its own minimal peak
finder and a batched adaptive-moment measurement.  It runs on host NumPy arrays: a few
filters over the image and arithmetic on at most a few thousand small stamps.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import fft as _fft
from scipy import ndimage
from scipy.spatial import cKDTree

from ..errors import InvalidInputError, PsfError
from .psf import FWHM_PER_SIGMA, ImagePsf

__all__ = ["estimate_psf"]

log = logging.getLogger("gpudiff.image.psf_estimate")

_IQR_TO_SIGMA = 0.741301109  # docs/algorithms.md §0.5
_MAD_TO_SIGMA = 1.4826
_SMOOTH_SIGMA = 1.0  # detection smoothing (px): light, so close pairs stay separate peaks
_SAT_MARGIN = 0.8  # pixels above 0.8·saturation are already non-linear on most detectors
_ISOLATION_RATIO = 0.1  # a neighbour brighter than 10 % of the star spoils its stamp
_MARGIN = 5  # extra pixels around each stamp: ±1 for recentring and a 3-px local-sky ring
_SKY_RING = 3
_SIZE_NSIGMA = 3.0
_SIZE_NOISE = 2.5  # relative size error × S/N of adaptive moments
_SIZE_FLOOR = 0.01  # relative size tolerance when all stars are (nearly) noiseless
_COMBINE_NSIGMA = 4.0
_MODEL_FRACTION = 0.05  # per-pixel model error: PSF variation, centroid error, star photon noise
_CHUNK = 1024

_REASONS = (
    "near the image edge",
    "with failed moments",
    "near masked pixels",
    "near saturation",
    "below the S/N cut",
    "not isolated",
    "size outliers (extended, or sharper than the PSF)",
)


def _clipped_stats(values: np.ndarray, nsigma: float = 3.0, n_iter: int = 3) -> tuple[float, float]:
    """afw-style clipped mean and standard deviation (docs/algorithms.md §0.5): each pass
    re-clips all values."""
    v = values[np.isfinite(values)]
    if v.size < 10:
        raise PsfError(
            f"estimate_psf: only {v.size} unmasked finite pixels; cannot measure the sky"
        )
    if v.size > 2_000_000:  # a strided subsample is plenty for two numbers
        v = v[:: v.size // 1_000_000]
    q1, med, q3 = np.percentile(v, [25.0, 50.0, 75.0])
    centre, width = float(med), float(_IQR_TO_SIGMA * (q3 - q1))
    for _ in range(n_iter):
        kept = v[np.abs(v - centre) <= nsigma * width]
        if kept.size < 2:
            break
        centre, width = float(kept.mean()), float(kept.std())
    return centre, width


_T_FLOOR = 0.5  # px²: trace of a σ = 0.5 px Gaussian; anything sharper is a cosmic ray or
# hot pixel (a Nyquist-sampled PSF has FWHM ≥ 2 px, trace ≥ 1.4 px²)
_LOCUS_WIDTH = 0.3  # relative width of the window that finds the stellar locus
_LOCUS_MIN = 3


def _stellar_locus(t: np.ndarray) -> float:
    """Trace (Ixx+Iyy) of the stars among sources of traces ``t``: the median of the first
    window [t, 1.3 t], in increasing t above the cosmic-ray floor, holding ≥ 3 sources.

    Stars are the smallest real sources, and identical; galaxies are larger and spread
    over a wide range.  In a deep extragalactic field galaxies are the majority, so the
    median size (the previous choice) is a galaxy's: JWST F200W gave FWHM ~10 px for a
    ~2 px PSF.  Falls back to the median when no window holds 3 sources.
    """
    t = np.sort(t[np.isfinite(t) & (t > _T_FLOOR)])
    if t.size == 0:
        return float("nan")
    hi = np.searchsorted(t, t * (1.0 + _LOCUS_WIDTH), side="right")
    first = np.flatnonzero(hi - np.arange(t.size) >= min(_LOCUS_MIN, t.size))
    if first.size == 0:
        return float(np.median(t))
    i = int(first[0])
    return float(np.median(t[i : hi[i]]))


def _cut(a: np.ndarray, ys: np.ndarray, xs: np.ndarray, h: int) -> np.ndarray:
    """Stack of (2h+1)² cutouts of ``a`` centred on integer pixels (ys, xs); all must fit."""
    o = np.arange(-h, h + 1)
    return a[(ys[:, None] + o)[:, :, None], (xs[:, None] + o)[:, None, :]]


def _inside(ys, xs, h, shape) -> np.ndarray:
    return (ys >= h) & (xs >= h) & (ys < shape[0] - h) & (xs < shape[1] - h)


def _moments_batch(stamps: np.ndarray, w_init: float = 2.0, max_iter: int = 60, tol: float = 1e-6):
    """Adaptive moments of a stack of stamps centred on their peaks (vectorized over stamps).

    The same fixed point as :func:`gpudiff.image.adaptive_moments` (W ← 2·Q), computed for all
    stamps at once.  The weight is bounded below (σ² ≥ 0.04 px²) so a single hot pixel
    converges to a tiny size instead of diverging; it is then rejected as too sharp.

    Returns
    -------
    dx, dy, ixx, iyy, ixy, flux, wnorm, ok : arrays of shape (n,)
        Centroid offsets from the central pixel, moments (px²), Gaussian-weighted flux
        Σ w·I and ‖w‖ = sqrt(Σ w²) at convergence, and whether the iteration converged.
    """
    n, s, _ = stamps.shape
    c = np.arange(s, dtype=np.float64) - s // 2
    X, Y = c[None, None, :], c[None, :, None]
    lo, hi = 0.04, float(s * s)
    xc, yc, wxy, wxx, wyy = (
        np.zeros(n),
        np.zeros(n),
        np.zeros(n),
        np.full(n, w_init),
        np.full(n, w_init),
    )
    ok, active = np.ones(n, bool), np.ones(n, bool)

    def weights(xc, yc, wxx, wyy, wxy):
        det = (wxx * wyy - wxy * wxy)[:, None, None]
        dx, dy = X - xc[:, None, None], Y - yc[:, None, None]
        q = (
            wyy[:, None, None] * dx * dx
            - 2 * wxy[:, None, None] * dx * dy
            + wxx[:, None, None] * dy * dy
        ) / det
        return np.exp(-0.5 * q)

    for _ in range(max_iter):
        a = np.nonzero(active)[0]
        if a.size == 0:
            break
        wd = weights(xc[a], yc[a], wxx[a], wyy[a], wxy[a]) * stamps[a]
        s0 = wd.sum(axis=(1, 2))
        good, s0 = s0 > 0, np.where(s0 > 0, s0, 1.0)
        nx, ny = (wd * X).sum(axis=(1, 2)) / s0, (wd * Y).sum(axis=(1, 2)) / s0
        dx, dy = X - nx[:, None, None], Y - ny[:, None, None]
        nxx = np.clip(2 * (wd * dx * dx).sum(axis=(1, 2)) / s0, lo, hi)
        nyy = np.clip(2 * (wd * dy * dy).sum(axis=(1, 2)) / s0, lo, hi)
        lim = 0.99 * np.sqrt(nxx * nyy)
        nxy = np.clip(2 * (wd * dx * dy).sum(axis=(1, 2)) / s0, -lim, lim)
        # A centroid that wanders off the peak pixel belongs to something else.
        good &= (np.abs(nx) <= 2.0) & (np.abs(ny) <= 2.0)
        change = np.abs(nxx - wxx[a]) + np.abs(nyy - wyy[a]) + np.abs(nxy - wxy[a])
        xc[a], yc[a], wxx[a], wyy[a], wxy[a] = nx, ny, nxx, nyy, nxy
        ok[a[~good]] = False
        active[a[~good | (change < tol * (nxx + nyy))]] = False
    ok &= ~active  # not converged within max_iter
    w = weights(xc, yc, wxx, wyy, wxy)
    return (
        xc,
        yc,
        wxx,
        wyy,
        wxy,
        (w * stamps).sum(axis=(1, 2)),
        np.sqrt((w * w).sum(axis=(1, 2))),
        ok,
    )


def _measure(d, ys, xs, h, w_init):
    """Batched moments of (2h+1)² boxes around the peaks, in chunks to bound memory."""
    parts = [
        _moments_batch(_cut(d, ys[i : i + _CHUNK], xs[i : i + _CHUNK], h), w_init)
        for i in range(0, ys.size, _CHUNK)
    ]
    return (
        [np.concatenate(p) for p in zip(*parts)]
        if parts
        else [np.zeros(0)] * 7 + [np.zeros(0, bool)]
    )


def _fourier_shift(stamps: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """out(x) = in(x + d) per stamp: moves a source at centre + d onto the centre.

    Exact for Nyquist-sampled stars; odd sizes have no Nyquist term, and the edges are ≈ 0
    after sky subtraction, so the periodic wrap only touches the margin, which is cropped.
    """
    k = _fft.fftfreq(stamps.shape[1])
    phase = np.exp(
        2j * np.pi * (k[None, :, None] * dy[:, None, None] + k[None, None, :] * dx[:, None, None])
    )
    return _fft.ifft2(_fft.fft2(stamps, axes=(1, 2)) * phase, axes=(1, 2)).real


@dataclass
class _Selection:
    stamps: np.ndarray  # (n, k, k) sky-subtracted, recentred, not normalized
    x: np.ndarray  # parent coordinates of the centroids used
    y: np.ndarray  # (the stars' positions, for diagnostics)
    snr: np.ndarray
    sigma: float  # sky noise per pixel
    fwhm_guess: float
    counts: dict


def _saturation_level(exposure, saturation):
    try:
        value = float(exposure.metadata.get("SATURATE") if saturation is None else saturation)
    except (TypeError, ValueError):  # no (numeric) SATURATE card
        return None
    return value if math.isfinite(value) and value > 0 else None


def _select_stars(
    exposure,
    kernel_size,
    max_stars,
    min_stars,
    snr_min,
    bad_planes,
    saturation,
    radius_fwhm: float = 4.0,
) -> _Selection:
    be = exposure.backend
    img = np.array(be.asnumpy(exposure.image), dtype=np.float64)  # a copy: inputs stay untouched
    msk = np.asarray(be.asnumpy(exposure.mask))
    sat_bits = exposure.mask_planes.bitmask_if_present(
        [p for p in bad_planes if str(p).strip().upper() == "SAT"]
    )
    other_bits = exposure.mask_planes.bitmask_if_present(bad_planes) & ~sat_bits
    finite = np.isfinite(img)
    masked = ((msk & other_bits) != 0) | ~finite
    saturated = (msk & sat_bits) != 0
    level = _saturation_level(exposure, saturation)
    if level is not None:
        saturated |= finite & (img >= _SAT_MARGIN * level)
    usable = ~masked & ~saturated

    sky, sigma = _clipped_stats(img[usable])
    # A noiseless (simulated) image has sigma = 0; a tiny floor keeps S/N and weights finite.
    sigma = max(sigma, 1e-6 * (abs(sky) + 1.0))
    d = np.where(finite, img - sky, 0.0)
    sm = ndimage.gaussian_filter(d, _SMOOTH_SIGMA, mode="nearest")
    _, sig_s = _clipped_stats(sm[usable])  # measured, so correlated noise is accounted for
    # The σ=1 smoothed-peak S/N is ≥ 0.25 of the optimal S/N for FWHM ≲ 19 px, so this
    # threshold drops nothing that could pass snr_min, while keeping the list short.
    thresh = max(5.0, 0.25 * snr_min) * sig_s
    peak = (sm == ndimage.maximum_filter(sm, size=5, mode="nearest")) & (sm > thresh)
    py, px = np.nonzero(peak)
    if py.size:
        # Ties (plateaus, a star exactly between two pixels) give several maxima closer
        # than the 5×5 window; keep one of each group.
        pairs = cKDTree(np.c_[py, px]).query_pairs(2.9, output_type="ndarray")
        keep = np.ones(py.size, bool)
        keep[pairs[:, 1]] = False
        py, px = py[keep], px[keep]
    pk, n = sm[py, px], py.size
    if n == 0:
        raise PsfError(
            f"estimate_psf: no peaks above {thresh:.3g} (sky {sky:.4g} ± {sigma:.3g} per pixel); "
            "no stars to build a PSF from"
        )

    # --- stage 1: sizes.  Measure the moments in a box that grows with the PSF. --------
    hm, w_init = 8, 2.0
    for _ in range(3):
        inbox = _inside(py, px, hm, img.shape)
        idx = np.nonzero(inbox)[0]  # peaks whose measurement box fits
        dxo, dyo, ixx, iyy, ixy, flux, wnorm = (np.full(n, np.nan) for _ in range(7))
        ok = np.zeros(n, bool)
        for arr, val in zip(
            (dxo, dyo, ixx, iyy, ixy, flux, wnorm, ok), _measure(d, py[idx], px[idx], hm, w_init)
        ):
            arr[idx] = val
        snr = np.where(ok, flux / (sigma * np.where(ok, wnorm, 1.0)), 0.0)
        trial = ok & (snr >= snr_min)
        trial[idx] &= ~_cut(masked | saturated, py[idx], px[idx], hm).any(axis=(1, 2))
        if not trial.any():
            break
        t_star = _stellar_locus((ixx + iyy)[trial])
        if not math.isfinite(t_star):
            t_star = float(np.median((ixx + iyy)[trial]))
        fwhm_guess = FWHM_PER_SIGMA * math.sqrt(0.5 * t_star)
        w_init = (fwhm_guess / FWHM_PER_SIGMA) ** 2
        need = int(math.ceil(3.0 * fwhm_guess))
        if need <= hm:
            break
        hm = need
    counts = {"detected": n}
    if not trial.any():
        raise PsfError(
            f"estimate_psf: {n} peak(s) detected but none is unmasked, unsaturated, measurable "
            f"and has S/N ≥ {snr_min:g}; cannot even estimate the PSF size"
        )

    if kernel_size is None:
        kernel_size = max(15, 2 * int(math.ceil(radius_fwhm * fwhm_guess)) + 1)
    h = kernel_size // 2
    cy, cx = (
        py + np.rint(np.nan_to_num(dyo)).astype(int),
        px + np.rint(np.nan_to_num(dxo)).astype(int),
    )

    # --- stage 2: reject, in order; each star is counted at its first failed test. ----
    why = np.zeros(n, int)

    def reject(bad, code):
        why[(why == 0) & bad] = code

    def near(flags):  # any flagged pixel in the stamp of a star still in the running
        live, out = np.nonzero(why == 0)[0], np.zeros(n, bool)
        out[live] = _cut(flags, cy[live], cx[live], h).any(axis=(1, 2))
        return out

    reject(~inbox | ~_inside(cy, cx, h + _MARGIN, img.shape), 1)
    reject(~ok, 2)
    reject(near(masked), 3)
    reject(near(saturated), 4)
    reject(snr < snr_min, 5)
    # Isolation is judged against every detected peak, whatever became of it.
    pairs = cKDTree(np.c_[py, px]).query_pairs(2.0 * h, output_type="ndarray")
    crowded = np.zeros(n, bool)
    if pairs.size:
        i, j = pairs[:, 0], pairs[:, 1]
        crowded[i[pk[j] > _ISOLATION_RATIO * pk[i]]] = True
        crowded[j[pk[i] > _ISOLATION_RATIO * pk[j]]] = True
    reject(crowded, 6)
    # Galaxies are broader and cosmic rays sharper than the stars, which are the majority.
    # Tolerance: the spread of the sizes (PSF variation), or each star's own measurement
    # noise, δT/T ≈ 2.5/(S/N) (measured on noisy Gaussian and Moffat stars), if larger.
    # The clipping starts from the stellar locus (the compact end of the size
    # distribution), not from the median, which is a galaxy's in a deep field.
    live, t = why == 0, ixx + iyy
    keep = live.copy()
    locus = _stellar_locus(t[live]) if live.any() else float("nan")
    for it in range(4):
        if not keep.any():
            break
        med = locus if it == 0 and math.isfinite(locus) else float(np.median(t[keep]))
        spread = 0.0 if it == 0 else _MAD_TO_SIGMA * float(np.median(np.abs(t[keep] - med)))
        tol = _SIZE_NSIGMA * np.maximum(
            spread, med * np.maximum(_SIZE_NOISE / np.maximum(snr, 1e-9), _SIZE_FLOOR)
        )
        keep = live & (np.abs(t - med) <= tol)
    reject(live & ~keep, 7)

    for code, reason in enumerate(_REASONS, start=1):
        counts[reason] = int((why == code).sum())
    chosen = np.nonzero(why == 0)[0]
    if chosen.size < min_stars:
        rej = "; ".join(f"{k} {r}" for r, k in counts.items() if r != "detected")
        raise PsfError(
            f"estimate_psf: {chosen.size} usable star(s), fewer than min_stars={min_stars}. "
            f"{n} peak(s) detected above {thresh:.3g} (sky {sky:.4g} ± {sigma:.3g}); "
            f"rejected: {rej} "
            f"(S/N cut {snr_min:g}, kernel size {kernel_size})"
        )
    chosen = chosen[np.argsort(-flux[chosen], kind="stable")][:max_stars]
    counts["used"] = int(chosen.size)

    # --- stage 3: stamps, local sky, sub-pixel recentring. ----------------------------
    hh = h + _MARGIN
    cut = _cut(d, cy[chosen], cx[chosen], hh)
    cbad = _cut(masked | saturated, cy[chosen], cx[chosen], hh)
    o = np.arange(-hh, hh + 1)
    ring = np.maximum(np.abs(o)[:, None], np.abs(o)[None, :]) > hh - _SKY_RING
    # The outer ring (r ≈ h+3 … h+5) follows sky gradients; a median ignores neighbours.
    ring_vals = np.where(ring[None] & ~cbad, cut, np.nan)
    with np.errstate(all="ignore"):
        local = np.nan_to_num(np.nanmedian(ring_vals.reshape(len(chosen), -1), axis=1))
    cut = np.where(cbad, 0.0, cut - local[:, None, None])
    fy, fx = py[chosen] + dyo[chosen] - cy[chosen], px[chosen] + dxo[chosen] - cx[chosen]
    stamps = _fourier_shift(cut, fy, fx)[:, _MARGIN:-_MARGIN, _MARGIN:-_MARGIN]
    return _Selection(
        stamps=stamps,
        x=exposure.xy0[0] + cx[chosen] + fx,
        y=exposure.xy0[1] + cy[chosen] + fy,
        snr=snr[chosen],
        sigma=sigma,
        fwhm_guess=fwhm_guess,
        counts=counts,
    )


def _combine(stamps: np.ndarray, sigma: float, n_iter: int = 3) -> np.ndarray:
    """Clipped, weighted mean of star stamps, normalized to unit sum.

    Star amplitudes are fitted to the current model (far less noisy than a stamp sum);
    pixels off the model by > 4× the expected scatter (sky noise of star and model, plus 5 %
    of the model for PSF variation and photon noise) are dropped: faint neighbours, cosmic
    rays.  Weights are per star, flux² (sky-limited inverse variance of a unit-flux stamp),
    not per pixel, which would bias bright cores low.
    """
    n = stamps.shape[0]
    a = np.maximum(stamps.sum(axis=(1, 2)), 1e-30)
    s = stamps / a[:, None, None]
    m = np.median(s, axis=0)
    em2 = 0.5 * math.pi * float(((sigma / a) ** 2).sum()) / n**2  # variance of a median
    for _ in range(n_iter):
        m = m / m.sum()
        a = np.maximum((stamps * m).sum(axis=(1, 2)) / (m * m).sum(), 1e-30)
        s = stamps / a[:, None, None]
        e2 = ((sigma / a) ** 2)[:, None, None]
        tol2 = _COMBINE_NSIGMA**2 * (e2 + em2 + (_MODEL_FRACTION * m) ** 2)
        w = ((s - m) ** 2 <= tol2) / e2
        wsum = w.sum(axis=0)
        has, safe = wsum > 0, np.where(wsum > 0, wsum, 1.0)
        m = np.where(has, (w * s).sum(axis=0) / safe, np.median(s, axis=0))
        em2 = np.where(has, 1.0 / safe, e2.mean())
    # Negative pixels are noise (a PSF is non-negative); clipping them to 0 biases the far
    # wings up by ~0.4× the stack noise per pixel, which is harmless for kernel sizes
    # and FWHMs and avoids negative lobes in convolution kernels built from the PSF.
    m = np.clip(m, 0.0, None)
    if not m.sum() > 0:
        raise PsfError("estimate_psf: the combined star stamps have no positive flux")
    return m / m.sum()


def estimate_psf(
    exposure,
    *,
    kernel_size: int | None = None,
    max_stars: int = 50,
    min_stars: int = 5,
    snr_min: float = 50.0,
    bad_planes=("BAD", "SAT", "CR", "EDGE", "NO_DATA", "SUSPECT", "INTRP"),
    saturation: float | None = None,
) -> ImagePsf:
    """Build an empirical PSF from the bright, isolated, unsaturated stars of an exposure.

    Parameters
    ----------
    exposure : Exposure
        The image to measure (any backend; it is read, never modified).
    kernel_size : int, optional
        Odd side of the PSF image.  Default 2·ceil(4·FWHM)+1, at least 15, with the FWHM
        from the stellar locus of the candidates' adaptive moments; when that leaves fewer
        than ``min_stars`` (stamps off a small cutout's edge), 2·ceil(3·FWHM)+1.
    max_stars : int
        Use at most this many stars, the brightest that pass every test.
    min_stars : int
        Fewer usable stars than this raises :class:`PsfError`.
    snr_min : float
        Minimum S/N of a star: Gaussian-weighted flux (the adaptive weight) over its
        sky-noise error, i.e. the sky-limited matched-filter S/N.
    bad_planes : sequence of str
        Mask planes (by name; absent planes are ignored) that disqualify a star when set
        anywhere in its stamp.  ``SAT`` counts as saturation.
    saturation : float, optional
        Saturation level in image units; default the header card ``SATURATE`` of
        ``exposure.metadata`` if present.  Stars with a stamp pixel ≥ 0.8× this are dropped.

    Returns
    -------
    ImagePsf
        Unit-sum, odd-square PSF image with ``average_position`` at the centre of the
        exposure's bounding box (parent coordinates).

    Raises
    ------
    PsfError
        Fewer than ``min_stars`` usable stars; the message gives how many peaks were
        detected and how many were rejected at each step.
    InvalidInputError
        Malformed arguments.

    Notes
    -----
    1. Sky and noise: afw-style 3σ clipped mean and standard deviation of the pixels not
       in ``bad_planes``.
    2. Peaks: local maxima (5×5) of the image smoothed by a σ = 1 px Gaussian, above
       max(5, snr_min/4) times the smoothed image's own noise.
    3. Adaptive moments of every peak (batched, the ``adaptive_moments`` fixed point),
       giving the centroid, the size, and the S/N.
    4. Rejections, in order: near the edge, moments not converged, a ``bad_planes``
       pixel in the stamp, a (near-)saturated pixel in the stamp, S/N < ``snr_min``,
       a peak brighter than 10 % of the star within two stamp radii, and a size
       Ixx+Iyy more than 3σ from the stellar locus (the compact end of the size
       distribution: the first window [T, 1.3 T] above a cosmic-ray floor of 0.5 px²
       holding 3 sources; a deep field's median size is a galaxy's), then from the median
       of the stars kept, σ the larger of 1.4826·MAD and the star's own measurement error
       (2.5/(S/N) relative, at least 1 %).
    5. Stamps: local sky from a ring outside the stamp, Fourier shift of the centroid
       onto the central pixel, then a clipped, flux²-weighted mean (see ``_combine``);
       negative pixels are clipped to 0 and the result renormalized.

    The PSF is assumed constant over the exposure.
    """
    if kernel_size is not None and (
        int(kernel_size) != kernel_size or kernel_size < 3 or kernel_size % 2 == 0
    ):
        raise InvalidInputError(
            f"estimate_psf kernel_size must be an odd integer >= 3, got {kernel_size}"
        )
    if max_stars < 1 or min_stars < 1:
        raise InvalidInputError(
            f"estimate_psf needs max_stars, min_stars >= 1, got {max_stars}, {min_stars}"
        )
    if not (snr_min >= 0 and math.isfinite(snr_min)):
        raise InvalidInputError(f"estimate_psf snr_min must be finite and >= 0, got {snr_min}")
    bad_planes = (bad_planes,) if isinstance(bad_planes, str) else tuple(bad_planes)
    args = (int(max_stars), int(min_stars), float(snr_min), bad_planes, saturation)
    try:
        sel = _select_stars(exposure, None if kernel_size is None else int(kernel_size), *args)
    except PsfError:
        if kernel_size is not None:
            raise
        # A small cutout (DECam 256², ~8 stars) loses half its stars to the edge with
        # ±4 FWHM stamps; ±3 FWHM still holds > 99 % of a Gaussian or β ≥ 3 Moffat PSF.
        sel = _select_stars(exposure, None, *args, radius_fwhm=3.0)
        log.info(
            "estimate_psf: too few stars with ±4 FWHM stamps; used ±3 FWHM (%d px)",
            sel.stamps.shape[1],
        )
    stack = _combine(sel.stamps, sel.sigma)
    box = exposure.bbox  # pixel-centre convention: the centre of pixels x0 … x1-1
    centre = (box.x0 + 0.5 * (box.width - 1), box.y0 + 0.5 * (box.height - 1))
    log.debug(
        "estimate_psf: %s; FWHM guess %.3f px, size %d", sel.counts, sel.fwhm_guess, stack.shape[0]
    )
    return ImagePsf(stack, average_position=centre)
