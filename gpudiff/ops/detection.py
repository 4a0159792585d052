"""Source detection and measurement (meas_algorithms ``SourceDetectionTask`` style).

:func:`detect_sources`: background subtraction, matched filter (image ⊗ PSF, variance ⊗
K²), a per-pixel S/N threshold, connected footprints (:mod:`gpudiff.ops.footprints`) and
their peaks, then batched measurement of every peak (:mod:`gpudiff.ops.measurement`:
Gaussian-weighted centroid, PSF flux, adaptive moments and extendedness, mask flags) and
isolation.  :func:`select_kernel_sources` (:mod:`gpudiff.ops.kernel_sources`, re-exported
here) is the pure table filter of docs/algorithms.md §4.2 choosing PSF-matching kernel
sources.  Image work runs on the image's backend; per-source work on stacks of stamps
(n, s, s), never in a loop over sources; on a device both polarities run as one canvas
(:mod:`gpudiff.ops.detection_canvas`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
from astropy.table import Table

from ..backend import Backend, resolve_backend
from ..backend.threads import cpu_workers, parallel_map
from ..errors import InvalidInputError, PsfError
from ..image import Exposure, MaskedImage, MaskPlanes, Psf
from .background import estimate_background
from .convolution import correlate
from .footprints import dilate_disk, drop_small
from .detection_canvas import detect_both_on_canvas
from .kernel_sources import KERNEL_EXCLUDE_FLAGS, _isolated, select_kernel_sources
from .measurement import _fetch_many, _measure_on_backend, _measure_on_host, measure_peaks

__all__ = [
    "DetectionResult",
    "FLAG_PLANES",
    "KERNEL_EXCLUDE_FLAGS",
    "detect_sources",
    "select_kernel_sources",
]

#: Mask planes that make a source ``flag_masked`` when set in its footprint or central 5×5.
FLAG_PLANES: tuple[str, ...] = ("BAD", "SAT", "NO_DATA", "CR", "EDGE", "SUSPECT")

_POLARITIES = {"positive": (1,), "negative": (-1,), "both": (1, -1)}

#: Relative error of the adaptive-moment trace per unit S/N of a point source
#: (δT/T ≈ _SIZE_NOISE / SNR: measured 2.8 for Gaussian and 3.6 for Moffat stars).
_SIZE_NOISE = 3.5


@dataclass
class DetectionResult:
    """What :func:`detect_sources` found.

    Attributes
    ----------
    catalog : astropy.table.Table
        One row per peak, host columns (see :func:`detect_sources`).
    mask : int32 array (H, W) on the backend
        The input mask with ``DETECTED`` / ``DETECTED_NEGATIVE`` cleared, then set on this
        detection's footprints (assign it to the image to record the detection).
    mask_planes : MaskPlanes
        Definition of ``mask`` (the input's, plus the detection planes if absent).
    significance : float32 array (H, W) on the backend
        The thresholded image: per-pixel S/N of the matched-filtered image.
    background : array (H, W) or None
        The background that was subtracted.
    """

    catalog: Table
    mask: Any
    mask_planes: MaskPlanes
    significance: Any
    background: Any = None


def _label(be: Backend, on, min_pixels: int, grow: int, gap_columns=None):
    """Connected (8-neighbour) footprints of ``on`` with at least ``min_pixels`` pixels,
    grown by a disk of radius ``grow`` (touching grown footprints merge); (labels, n).
    ``gap_columns`` (a, b): columns a..b−1 are off the image (a canvas's gap,
    :mod:`gpudiff.ops.detection_canvas`): growth does not reach into them."""
    nd = be.ndimage
    eight = be.asarray(np.ones((3, 3), dtype=bool))
    labels, n = nd.label(on, structure=eight)
    n = int(n)
    if n and min_pixels > 1:
        # Without a count (a host sync): growing an empty mask labels nothing anyway.
        on, _ = drop_small(be, labels, n, min_pixels, count=False)
        if grow <= 0:
            labels, n = nd.label(on, structure=eight)
    if int(n) and grow > 0:
        grown = dilate_disk(be, on, grow)
        if gap_columns is not None:
            grown[:, gap_columns[0] : gap_columns[1]] = False
        labels, n = nd.label(grown, structure=eight)
    return labels, int(n)


#: Footprint pixels × window offsets compared per pass of :func:`_peaks` (bounds its
#: scratch memory: 2²⁵ float32 values and their int64 indices, ~400 MB).
_PEAK_CHUNK = 1 << 25


def _peaks(be: Backend, snr, labels, radius: int, footprint_pixels=None, sign: int = 1):
    """(rows, cols) of the local maxima of ``sign``·``snr`` inside footprints, one per
    plateau (its first pixel in raster order).

    A pixel is a peak when no pixel of its (2r+1)² window (inside the image) is larger:
    ndimage's maximum_filter over the whole image, but evaluated only at footprint pixels
    (a few per cent of a 4096² image) by gathering every window offset at once from a copy
    of the image padded with −∞ (+∞ for ``sign`` −1), which the image border then never
    beats.  Equal neighbouring maxima (flat tops) are one peak: the candidates are
    labelled and each label's smallest raster index kept.  About 20 device calls and
    two host syncs (the footprint pixels' and the plateaus' counts) whatever the radius.
    """
    xp, nd = be.xp, be.ndimage
    H, W = snr.shape
    ys, xs = xp.nonzero(labels) if footprint_pixels is None else footprint_pixels
    r = int(radius)
    Wp = W + 2 * r
    pad = xp.pad(snr, r, mode="constant", constant_values=-np.inf if sign > 0 else np.inf)
    flat = pad.reshape(-1)
    centre = ys * Wp + (xs + (r * Wp + r))  # (ys + r)·Wp + xs + r, one launch fewer
    v = flat[centre]
    offs = [dy * Wp + dx for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy or dx]
    n = int(ys.shape[0])
    step = max(1, _PEAK_CHUNK // max(n, 1))
    ok = None
    for k in range(0, len(offs), step):
        nb = flat[centre[:, None] + be.asarray(np.asarray(offs[k : k + step], np.int64))[None, :]]
        part = (v[:, None] >= nb if sign > 0 else v[:, None] <= nb).all(axis=1)
        ok = part if ok is None else ok & part
    cand = xp.zeros((H, W), dtype=bool)
    if ok is None:  # radius 0: every footprint pixel
        cand[ys, xs] = True
    else:
        cand[ys, xs] = ok
    plab, npk = nd.label(cand, structure=be.asarray(np.ones((3, 3), dtype=bool)))
    npk = int(npk)
    if npk == 0:
        return ys[:0], xs[:0]
    # nonzero() lists pixels in raster order, so the smallest flat index of a plateau is
    # its first pixel (as numpy.unique(..., return_index=True) over nonzero(plab) finds).
    first = nd.minimum(ys * W + xs, plab[ys, xs], xp.arange(1, npk + 1))
    return first // W, first % W


def _background(mi: MaskedImage, background, be: Backend):
    if isinstance(background, str) and background.strip().lower() == "estimate":
        return estimate_background(mi)
    bg = (
        None
        if background is None or isinstance(background, str)
        else be.asarray(background, dtype=np.float32)
    )
    if background is not None and (
        bg is None or bg.ndim not in (0, 2) or bg.ndim == 2 and bg.shape != mi.shape
    ):
        raise InvalidInputError(
            f"background must be None, 'estimate', a scalar or an array of shape {mi.shape}"
        )
    return None if bg is None else be.xp.broadcast_to(bg, mi.shape)


def detect_sources(
    mi: MaskedImage | Exposure,
    psf: Psf | None = None,
    *,
    threshold: float = 5.0,
    polarity: str = "positive",
    smooth: bool = True,
    bad_planes: Iterable[str] = ("NO_DATA",),
    background: Any = "estimate",
    footprint_grow: int = 0,
    min_pixels: int = 1,
    isolation_radius: float | None = None,
    isolation_fraction: float = 0.1,
    extended_nsigma: float = 3.0,
    extended_min: float = 0.1,
    psf_flux_weighting: str = "uniform",
    flag_planes: Iterable[str] = FLAG_PLANES,
    backend: Backend | str | None = None,
) -> DetectionResult:
    """Detect and measure sources above ``threshold`` × the matched-filter noise.

    Parameters
    ----------
    mi : MaskedImage or Exposure
        Not modified.  An Exposure supplies the PSF when ``psf`` is None.
    psf : Psf, optional
        Smoothing kernel (at the image centre; required when ``smooth``) and the model
        for the PSF flux and extendedness (at each source).
    threshold : float
        On the per-pixel S/N of the smoothed image (LSST ``pixel_stdev``); for a point
        source that S/N is its PSF S/N.
    polarity : {"positive", "negative", "both"}
        Negative sources get ``DETECTED_NEGATIVE`` and ``flag_negative``.
    smooth : bool
        Matched filter: Σ_d P(d)·I(r + d), the image correlated with the unflipped kernel,
        and the variance with K².  Without it the threshold is on image/√variance.
    bad_planes : iterable of str
        Pixels with zero weight everywhere (non-finite pixels always).
    background : None, array, scalar or "estimate"
        Subtracted first; "estimate": :func:`estimate_background` with its defaults;
        None: nothing (difference images).
    footprint_grow : int
        Grow footprints by this radius (a disk); footprints that then touch merge.
    min_pixels : int
        Drop footprints with fewer pixels (before growing).
    isolation_radius, isolation_fraction : float
        ``isolated`` is False when another source within the radius (default: the PSF
        stamp size) has |psf_flux| ≥ fraction × this one's.
    extended_nsigma, extended_min : float
        ``is_extended``: extendedness > max(extended_min, extended_nsigma·3.5/|S/N|),
        3.5/S/N being the measured relative noise of the moments trace of point sources.
    psf_flux_weighting : {"uniform", "inverse_variance"}
        "uniform" is meas_base ``PsfFlux``: F = ΣPI/ΣP², σ_F² = ΣP²V/(ΣP²)² (unbiased
        even when V comes from the noisy data); or weights 1/V.
    flag_planes : iterable of str
        Planes that set ``flag_masked`` when in the footprint or the central 5×5.
    backend : Backend or str, optional
        Default: the image's backend.

    Returns
    -------
    DetectionResult
        ``catalog`` (sorted by decreasing |peak_significance|): ``id``, ``footprint_id``,
        ``n_peaks`` (peaks in the footprint), ``x``, ``y`` (centroid, parent pixels,
        integer = pixel centre), ``peak_x``, ``peak_y``, ``peak_significance``,
        ``psf_flux`` (signed), ``psf_flux_err``, ``snr``, adaptive moments ``ixx``,
        ``iyy``, ``ixy`` and the PSF's ``psf_ixx``, ``psf_iyy``, ``psf_ixy``,
        ``extendedness`` (trace ratio − 1), ``footprint_npix``, ``footprint_x0``,
        ``footprint_y0``, ``footprint_x1``, ``footprint_y1`` (x1/y1 exclusive),
        ``mask_center`` / ``mask_footprint`` (OR of the mask bits in the central 5×5 / the
        footprint), ``masked_planes`` (the ``flag_planes`` found, comma-separated), and
        flags ``flag_edge`` (PSF stamp leaves the image), ``flag_masked``,
        ``flag_saturated``, ``flag_negative``, ``flag_centroid``, ``flag_shape``,
        ``flag_psf_flux``, ``is_extended``, ``isolated``.
    """
    if isinstance(mi, Exposure):
        psf = mi.psf if psf is None else psf
        mi = mi.masked_image
    for bad, what in (
        (
            not isinstance(mi, MaskedImage),
            f"needs a MaskedImage or Exposure, got {type(mi).__name__}",
        ),
        (
            polarity not in _POLARITIES,
            f"polarity must be one of {tuple(_POLARITIES)}, got {polarity!r}",
        ),
        (
            psf_flux_weighting not in ("uniform", "inverse_variance"),
            "psf_flux_weighting must be 'uniform' or 'inverse_variance', got "
            f"{psf_flux_weighting!r}",
        ),
        (
            not (threshold > 0 and math.isfinite(threshold)),
            f"threshold must be > 0, got {threshold!r}",
        ),
    ):
        if bad:
            raise InvalidInputError(f"detect_sources: {what}")
    if smooth and psf is None:
        raise PsfError(
            "detect_sources: smoothing needs a PSF (pass psf=, an Exposure with a PSF, or "
            "smooth=False)"
        )
    be = resolve_backend(backend if backend is not None else mi.backend)
    if be.name != mi.backend.name:
        mi = mi.to_backend(be)
    xp = be.xp
    planes = mi.mask_planes.copy()
    det_bit, neg_bit = 1 << planes.add("DETECTED"), 1 << planes.add("DETECTED_NEGATIVE")
    good = mi.good_pixels(list(bad_planes))
    bg = _background(mi, background, be)
    # (copy=False: the planes are float32 already; a second copy is a launch each)
    d = xp.where(good, mi.image if bg is None else mi.image - bg, 0).astype(xp.float32, copy=False)
    var = xp.where(good, mi.variance, 0).astype(xp.float32, copy=False)
    (x0, y0), (H, W) = mi.xy0, mi.shape
    cxp, cyp = x0 + (W - 1) / 2.0, y0 + (H - 1) / 2.0
    # Without a PSF: a σ = 1.5 px weight for centroids and moments, 13-px stamps.
    sigma_w, stamp, kimg = 1.5, 13, None
    if psf is not None:
        kimg = np.asarray(psf.kernel_image(cxp, cyp), dtype=np.float64)
        sigma_w = math.sqrt(0.5 * sum(psf.moments(cxp, cyp)[:2]))
        # Measurement stamps span ±10σ of the PSF core (at least 25 px), not the whole model
        # image: a 205² WebbPSF made per-source stamps cost minutes.  PSF fluxes then
        # measure the flux inside the stamp (wings beyond 10σ are a few % for JWST).
        stamp = min(kimg.shape[0], max(25, 2 * int(math.ceil(10 * sigma_w)) + 1))
    # Both planes are finite by construction (zero where not ``good``, which requires a
    # finite image and variance; an estimated background is finite): the correlation's
    # finiteness test, a host sync each on a device, is left to a caller's own background.
    user_bg = bg is not None and not isinstance(background, str)
    s, v = (
        (
            correlate(d, kimg, be, check_finite=user_bg),
            correlate(var, kimg * kimg, be, check_finite=False),
        )
        if smooth
        else (d, var)
    )
    # FFT rounding leaves ~1e-7·max residue where the variance is zero: not data.
    # (kept on the device, rounded to v's dtype as the Python float it replaces would be)
    vmin = (xp.max(v).astype(xp.float64) * 1e-6).astype(v.dtype) if v.size else 0.0
    snr = xp.where(good & (v > vmin), s / xp.sqrt(xp.maximum(v, vmin)), 0).astype(
        xp.float32, copy=False
    )
    peak_radius = max(1, int(round(sigma_w)))
    mask = mi.mask & ~np.int32(det_bit | neg_bit)

    signs = _POLARITIES[polarity]
    if be.is_gpu and len(signs) == 2:
        # Both polarities as the halves of one canvas: half the launches and syncs.
        found = detect_both_on_canvas(
            be,
            _label,
            _peaks,
            snr,
            d,
            var,
            good,
            mi.mask,
            threshold,
            int(min_pixels),
            int(footprint_grow),
            peak_radius,
            psf,
            mi.bbox,
            stamp,
            sigma_w,
            psf_flux_weighting,
        )
        found = [None if r is None else (r[1], r[2]) for r in found]
    else:
        found = _each_sign(
            be, signs, snr, d, var, good, mi, threshold, min_pixels, footprint_grow,
            peak_radius, psf, stamp, sigma_w, psf_flux_weighting,
        )  # fmt: skip
    parts = []
    for sign, res in zip(signs, found):
        if res is None:
            continue
        labels, cols = res
        mask = xp.where(labels > 0, mask | np.int32(det_bit if sign > 0 else neg_bit), mask)
        cols["_fp"] = cols["_fp"] + (0 if not parts else max(int(p["_fp"].max()) for p in parts))
        parts.append(cols)
    cat = _assemble(
        parts,
        planes,
        x0,
        y0,
        stamp if isolation_radius is None else isolation_radius,
        isolation_fraction,
        extended_nsigma,
        extended_min,
        flag_planes,
    )
    cat.meta.update(
        {
            "threshold": float(threshold),
            "polarity": polarity,
            "smooth": bool(smooth),
            "psf_sigma": sigma_w,
            "x0": x0,
            "y0": y0,
            "width": W,
            "height": H,
        }
    )
    return DetectionResult(
        catalog=cat,
        mask=mask.astype(xp.int32, copy=False),  # a new array already
        mask_planes=planes,
        significance=snr,
        background=bg,
    )


_COLUMNS = (
    "id",
    "footprint_id",
    "n_peaks",
    "x",
    "y",
    "peak_x",
    "peak_y",
    "peak_significance",
    "psf_flux",
    "psf_flux_err",
    "snr",
    "ixx",
    "iyy",
    "ixy",
    "psf_ixx",
    "psf_iyy",
    "psf_ixy",
    "extendedness",
    "footprint_npix",
    "footprint_x0",
    "footprint_y0",
    "footprint_x1",
    "footprint_y1",
    "mask_center",
    "mask_footprint",
    "masked_planes",
    "flag_edge",
    "flag_masked",
    "flag_saturated",
    "flag_negative",
    "flag_centroid",
    "flag_shape",
    "flag_psf_flux",
    "is_extended",
    "isolated",
)


def _each_sign(
    be, signs, snr, d, var, good, mi, threshold, min_pixels, footprint_grow, peak_radius,
    psf, stamp, sigma_w, psf_flux_weighting,
):  # fmt: skip
    """The polarities of :func:`detect_sources` one by one (one CPU thread each; on a
    device, single polarities): per polarity None or (labels, host columns)."""
    xp = be.xp

    def one_sign(sign: int):
        # snr <= -threshold is -snr >= threshold: no negated copy of the image
        on = snr >= threshold if sign > 0 else snr <= -threshold
        labels, n_fp = _label(be, on, int(min_pixels), int(footprint_grow))
        if n_fp == 0:
            return None
        fp = xp.nonzero(labels)  # footprint pixels, shared by the peaks and the measurement
        py, px = _peaks(be, snr, labels, peak_radius, fp, sign)
        # On a device the columns stay there and cross in one transfer below.
        measure = _measure_on_backend if be.is_gpu else measure_peaks
        cols = measure(
            be,
            sign,
            d,
            var,
            good,
            mi.mask,
            snr,
            labels,
            n_fp,
            py,
            px,
            psf,
            mi.bbox,
            stamp,
            sigma_w,
            psf_flux_weighting,
            footprint_pixels=fp,
        )
        return labels, cols

    # The polarities are independent: one CPU thread each.
    found = parallel_map(one_sign, signs, cpu_workers(len(signs), parallel=not be.is_gpu))
    if be.is_gpu:
        done = [r for r in found if r is not None]
        hosts = iter(_fetch_many(be, [dev for _, (dev, _) in done]))
        found = [
            None if r is None else (r[0], _measure_on_host(next(hosts), r[1][1])) for r in found
        ]
    return found


def _assemble(
    parts,
    planes: MaskPlanes,
    x0: int,
    y0: int,
    iso_radius: float,
    iso_fraction: float,
    ext_nsigma: float,
    ext_min: float,
    flag_planes,
) -> Table:
    """Concatenate the polarities; add parent offsets, ids and the derived flags."""
    if not parts:
        kind = {"masked_planes": str, "flag": bool, "is_e": bool, "isol": bool}
        return Table(
            {k: np.zeros(0, dtype=kind.get(k, kind.get(k[:4], np.float64))) for k in _COLUMNS}
        )
    c = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "_box"}
    order = np.argsort(-np.abs(c["peak_significance"]), kind="stable")
    c = {k: v[order] for k, v in c.items()}
    box = [np.concatenate([p["_box"][i] for p in parts])[order] for i in range(4)]
    c["footprint_x0"], c["footprint_y0"], c["footprint_x1"], c["footprint_y1"] = (
        box[0] + x0,
        box[1] + y0,
        box[2] + x0 + 1,
        box[3] + y0 + 1,
    )
    n = order.size
    fid = np.unique(c.pop("_fp"), return_inverse=True)[1].reshape(-1).astype(np.int64) + 1
    c.update(
        id=np.arange(1, n + 1, dtype=np.int64),
        footprint_id=fid,
        n_peaks=np.bincount(fid)[fid].astype(np.int64),
        x=c["x"] + x0,
        y=c["y"] + y0,
        peak_x=c["peak_x"].astype(np.int64) + x0,
        peak_y=c["peak_y"].astype(np.int64) + y0,
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        c["snr"] = snr = c["psf_flux"] / c["psf_flux_err"]
        tol = np.maximum(ext_min, ext_nsigma * _SIZE_NOISE / np.abs(snr))
        c["is_extended"] = (
            np.isfinite(c["extendedness"]) & np.isfinite(snr) & (c["extendedness"] > tol)
        )
    flagged = (c["mask_center"] | c["mask_footprint"]) & planes.bitmask_if_present(
        list(flag_planes)
    )
    names = np.empty(n, dtype=object)
    for v in np.unique(flagged):  # distinct bit patterns, not sources
        names[flagged == v] = ",".join(planes.interpret(int(v)))
    c["masked_planes"] = names.astype(str)
    c["flag_masked"] = flagged != 0
    c["flag_saturated"] = (
        (c["mask_center"] | c["mask_footprint"]) & planes.bitmask_if_present(["SAT"])
    ) != 0
    bright = np.where(
        np.isfinite(c["psf_flux"]), np.abs(c["psf_flux"]), np.abs(c["peak_significance"])
    )
    c["isolated"] = _isolated(c["x"], c["y"], bright, float(iso_radius), float(iso_fraction))
    return Table({k: c[k] for k in _COLUMNS})
