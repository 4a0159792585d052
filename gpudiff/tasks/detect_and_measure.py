"""DetectAndMeasureTask and DetectAndMeasureScoreTask: DIA sources on a difference image.

Detection runs on the difference with PSF smoothing (or on the preconvolved score image
without smoothing), at 5σ, both polarities (docs/algorithms.md §4.3 "DetectAndMeasureScoreTask");
the DIA source catalog is measured on the difference.  After detection:

- linear trails are found (:func:`gpudiff.ops.streaks.find_streaks`), masked ``STREAK`` (as
  LSST's ``MaskStreaksTask``), and every peak on one trail becomes **one** record with
  ``flag_streak``;
- the peaks of one footprint become one record (the brightest peak's measurement);
  ``flag_multi_peak`` marks footprints whose peaks lie more than a FWHM apart (a residual
  ring or extended residual, not a point source);
- sources inside the halo of a bright star (saturated footprints in the difference's SAT
  planes, which carry the science's and the template's, and optional bright catalog
  stars) get ``flag_bright_star``: their wings extend beyond the matching kernel, so their
  residual is not a transient (LSST masks these regions before DIA too);
- ``clean`` is True when no flag is set.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from astropy import units as u
from astropy.table import Table

from ..backend import Backend, resolve_backend
from ..configfield import option, validate_config
from ..errors import InvalidInputError
from ..image import Exposure, MaskedImage
from ..ops.cosmic_rays import find_cosmic_rays
from ..ops.detection import detect_sources
from ..ops.photometry import forced_psf_flux
from ..ops.streaks import StreakResult, find_streaks

__all__ = [
    "DetectAndMeasureConfig",
    "DetectAndMeasureResult",
    "DetectAndMeasureTask",
    "DetectAndMeasureScoreTask",
    "DIA_FLAGS",
    "detection_noise_excess",
]

log = logging.getLogger("gpudiff.tasks.detect_and_measure")

_CLEARED = ("DETECTED", "DETECTED_NEGATIVE", "NOT_DEBLENDED", "STREAK")

#: Boolean flag columns of the DIA catalog; ``clean`` is the NOR of them.
DIA_FLAGS = (
    "flag_edge",
    "flag_masked",
    "flag_saturated",
    "flag_cr",
    "flag_dipole",
    "flag_streak",
    "flag_bright_star",
    "flag_multi_peak",
    "flag_psf_flux",
)

#: Mask planes holding saturated pixels of the science (SAT) and of the template
#: (SAT_TEMPLATE, from ``rename_template_mask``), in afw and lsst-images spellings.
_SAT_PLANES = ("SAT", "SATURATED", "SAT_TEMPLATE", "SATURATED_TEMPLATE")


@dataclass(frozen=True)
class DetectAndMeasureConfig:
    """Detection threshold (σ of the detection image), polarity, and the flag rules.

    A positive and a negative detection closer than ``dipole_separation_fwhm`` × FWHM are
    flagged ``flag_dipole`` (a misaligned or mis-matched star, not two transients); 2.5
    FWHM: the opposite lobes of bright-star residuals on realistic pairs lay 1.5–2.5 FWHM
    apart and passed as clean sources at 1.5 (8.6 → 3.8 clean false per Mpix together
    with ``halo_residual_snr`` = 20 instead of 50, on a 1024² pair; completeness kept).
    ``do_subtract_background`` removes a binned background from the detection image first
    (LSST's detectAndMeasure does so too): differences keep any differential background
    that was fitted but not subtracted.

    ``find_streaks``/``streak_threshold``: trails are searched on pixels above this
    significance (below the detection threshold, so a faint trail broken into pieces at
    5σ is one line).  Bright-star halos: a saturated footprint of equivalent radius
    r_sat = √(area/π) flags sources within ``halo_sat_factor`` × r_sat + FWHM: a
    Moffat wing (β ≈ 2–2.5) falls from the saturation level (~5000σ of sky) to the
    ~σ/``halo_residual_fraction`` level where a residual of that fraction is detectable
    within (5000 × 0.1)^(1/(2β)) ≈ 3.5–4.7 × r_sat.  A catalog star of flux F (no
    saturation) flags sources where ``halo_residual_fraction`` × F × a β =
    ``halo_beta`` Moffat of the PSF's FWHM exceeds ``halo_nsigma`` × the sky σ.  A
    record with |peak_significance| ≥ ``halo_residual_snr`` (20) that is not a clean point
    source (multi-peak, dipole, CR or masked: a bright star's residual) has a halo too,
    at least 2 FWHM.  Halo radii are widened to the measured extent of the residual
    (see :func:`bright_star_halos`).
    """

    threshold: float = option(
        5.0,
        doc="Detection threshold in sigmas of the detection image.",
        min=0,
        inclusive_min=False,
        lsst="detection.thresholdValue",
    )
    polarity: str = option(
        "both",
        doc="Detect positive sources, negative ones, or both.",
        choices=("positive", "negative", "both"),
        lsst="detection.thresholdPolarity",
    )
    do_subtract_background: bool = option(
        True,
        doc="Subtract a binned background from the detection image first (a difference "
        "keeps any differential background that was fitted but not subtracted).",
        gpudiff_only=True,
    )
    dipole_separation_fwhm: float = option(
        2.5,
        doc="A positive and a negative detection closer than this x FWHM are flagged flag_dipole.",
        gpudiff_only=True,
    )
    find_cosmic_rays: bool = option(
        True,
        doc="Find cosmic rays on the difference and flag sources on them (flag_cr).",
        gpudiff_only=True,
    )
    flag_planes: tuple[str, ...] = option(
        ("BAD", "SAT", "CR", "EDGE", "NO_DATA", "SUSPECT", "INTRP"),
        doc="Mask planes that flag a source (flag_masked) when set in its central 5x5 pixels "
        "(those in the rest of its footprint are listed in masked_planes).",
        gpudiff_only=True,
    )
    find_streaks: bool = option(
        True,
        doc="Find linear trails, mask them STREAK and make each trail one flag_streak record.",
        lsst="doMaskStreaks",
    )
    streak_threshold: float = option(
        3.0,
        doc="Significance (sigma) of the pixels searched for trails; below the detection "
        "threshold so that a trail broken into pieces is one line.",
        min=0,
        inclusive_min=False,
        gpudiff_only=True,
    )
    multi_peak_separation_fwhm: float = option(
        1.0,
        doc="Peaks of one footprint further apart than this x FWHM set flag_multi_peak.",
        gpudiff_only=True,
    )
    halo_sat_factor: float = option(
        4.0,
        doc="A saturated footprint of equivalent radius r_sat flags sources within this x "
        "r_sat + FWHM (bright-star halo).",
        min=0,
        gpudiff_only=True,
    )
    halo_residual_fraction: float = option(
        0.1,
        doc="Fraction of a bright star's wing assumed left in the difference when sizing its halo.",
        min=0,
        inclusive_min=False,
        gpudiff_only=True,
    )
    halo_nsigma: float = option(
        0.5,
        doc="A catalog star's halo reaches where its residual wing exceeds this x the sky sigma.",
        min=0,
        inclusive_min=False,
        gpudiff_only=True,
    )
    halo_beta: float = option(
        2.0,
        doc="Moffat beta of the wing model of a catalog star's halo.",
        min=1,
        inclusive_min=False,
        gpudiff_only=True,
    )
    halo_max_factor: float = option(
        5.0,
        doc="Halo radii are widened to the measured extent of the residual, out to this x "
        "the model radius.",
        gpudiff_only=True,
    )
    halo_annulus_snr: float = option(
        2.5,
        doc="|S/N| a pixel needs to count in the measured extent of a residual.",
        gpudiff_only=True,
    )
    halo_annulus_fraction: float = option(
        0.1,
        doc="The residual extends to the outermost annulus with more than this fraction of "
        "its pixels at |S/N| >= halo_annulus_snr.",
        gpudiff_only=True,
    )
    halo_residual_snr: float = option(
        20.0,
        doc="A record at least this significant that is not a clean point source (a bright "
        "star's residual) gets a halo of at least 2 FWHM.",
        gpudiff_only=True,
    )
    #: A transient detected on the science is in the science catalog too.  Measured: 35 of
    #: 254 S/N >= 8 injections of a 2048² realistic pair were flagged by their own halo
    #: without it.
    halo_own_flux_fraction: float = option(
        0.3,
        doc="A record whose |PSF flux| is at least this fraction of a catalog star's flux is "
        "not flagged by that star's halo (it is the change itself, not a residual).",
        gpudiff_only=True,
    )
    #: LSST thresholds on the variance plane alone.  Resampled or drizzled inputs (the
    #: shared DECam cutouts, JWST i2d) carry pixel-to-pixel noise correlations the variance
    #: plane cannot hold: the per-pixel noise is right but the PSF-smoothed noise is
    #: 1.07–1.2× (DECam) and ~2× (JWST) the prediction, and a 5σ threshold then passes
    #: noise peaks.
    max_noise_excess: float | None = option(
        0.05,
        doc="When the robust std of the detection image's S/N off the footprints exceeds 1 "
        "by more than this, the threshold and the S/N are put in units of that measured "
        "noise (None: off, as LSST).",
        gpudiff_only=True,
    )

    def __post_init__(self):
        # Every rule is a single-field one (the field options).
        validate_config(self)


@dataclass
class DetectAndMeasureResult:
    """``dia_sources`` (astropy Table, every column with a unit and a description), the
    difference with DETECTED*/STREAK planes set, and the trails found."""

    dia_sources: Table
    subtracted_measured_exposure: Exposure
    streaks: list | None = None


class DetectAndMeasureTask:
    """Detect and measure DIA sources on a difference image (PSF-smoothed, 5σ, ±)."""

    smooth = True

    def __init__(
        self, config: DetectAndMeasureConfig | None = None, backend: Backend | str | None = None
    ):
        self.config = DetectAndMeasureConfig() if config is None else config
        self.backend = resolve_backend(backend)

    def _clean(self, exp: Exposure) -> MaskedImage:
        return exp.masked_image.to_backend(self.backend).with_planes_cleared(_CLEARED)

    def _detect(self, detection_image: MaskedImage, psf):
        cfg = self.config

        def detect(mi: MaskedImage):
            # EDGE pixels hold copied, unconvolved input (doCopyEdge) or an incomplete
            # matched filter: not searched, so they cannot produce detections.
            return detect_sources(
                mi,
                psf,
                threshold=cfg.threshold,
                polarity=cfg.polarity,
                smooth=self.smooth,
                bad_planes=("NO_DATA", "EDGE"),
                background="estimate" if cfg.do_subtract_background else None,
                flag_planes=cfg.flag_planes,
                backend=self.backend,
            )

        det = detect(detection_image)
        if cfg.max_noise_excess is None:
            return det
        excess = detection_noise_excess(det, self.backend)
        det.catalog.meta["noise_excess"] = float(excess)
        if not excess > 1.0 + cfg.max_noise_excess:
            return det
        # Correlated noise: detect again with the variance scaled so that the smoothed
        # S/N has unit noise.  PSF-flux errors then hold the correlated noise too (a PSF
        # flux is that same smoothing); the written variance plane stays per-pixel.
        log.info(
            "detection image noise %.3f x its variance-plane prediction (correlated "
            "noise): threshold and S/N in measured-noise units",
            excess,
        )
        scaled = MaskedImage(
            detection_image.image,
            detection_image.variance * np.float32(excess**2),
            detection_image.mask,
            xy0=detection_image.xy0,
            mask_planes=detection_image.mask_planes,
            backend=detection_image.backend,
        )
        det = detect(scaled)
        det.catalog.meta.update(noise_excess=float(excess), noise_rescaled=True)
        return det

    def _mark_cosmic_rays(self, diff: MaskedImage, psf) -> MaskedImage:
        """Set the CR plane where the difference is sharper than its PSF (LSST finds and
        keeps CRs on the difference: masked, not interpolated)."""
        if not self.config.find_cosmic_rays:
            return diff
        return diff.with_plane_set("CR", find_cosmic_rays(diff, psf, backend=self.backend))

    def run(
        self, difference: Exposure, bright_sources: Table | None = None
    ) -> DetectAndMeasureResult:
        """Detect on ``difference`` and measure there.

        Parameters
        ----------
        difference : Exposure
            With a PSF.  Not modified.
        bright_sources : astropy Table, optional
            Stars of the science or template (parent ``x``, ``y`` and ``psf_flux`` or
            ``flux`` in the difference's units) whose halos flag DIA sources, in addition
            to the saturated footprints of the difference's SAT planes.
        """
        if difference.psf is None:
            raise InvalidInputError("the difference exposure has no PSF to detect and measure with")
        diff = self._mark_cosmic_rays(self._clean(difference), difference.psf)
        det = self._detect(diff, difference.psf)
        return self._finish(difference, diff, det, diff, bright_sources)

    def _finish(
        self,
        difference: Exposure,
        diff: MaskedImage,
        det,
        det_image: MaskedImage,
        bright_sources=None,
    ) -> DetectAndMeasureResult:
        cfg = self.config
        psf = difference.psf
        fwhm = float(psf.fwhm())
        streaks = None
        if cfg.find_streaks:
            # The score image's point sources are the PSF ⊗ PSF: √2 broader.
            sigma = float(det.catalog.meta.get("psf_sigma", fwhm / 2.3548)) * (
                1 if self.smooth else math.sqrt(2)
            )
            det_mi = MaskedImage(
                det_image.image,
                det_image.variance,
                det.mask,
                xy0=det_image.xy0,
                mask_planes=det.mask_planes,
                backend=det_image.backend,
            )
            streaks = find_streaks(
                det_mi,
                det.significance,
                sigma,
                threshold=cfg.streak_threshold,
                backend=self.backend,
            )
            if streaks.streaks:
                planes = det.mask_planes.copy()
                bit = np.int32(1 << planes.add("STREAK"))
                xp = self.backend.xp
                det.mask = xp.where(streaks.labels > 0, det.mask | bit, det.mask).astype(xp.int32)
                det.mask_planes = planes
        measured = Exposure(
            MaskedImage(
                diff.image,
                diff.variance,
                det.mask,
                xy0=diff.xy0,
                mask_planes=det.mask_planes,
                backend=diff.backend,
            ),
            psf,
            difference.wcs,
            difference.photo_calib,
            difference.metadata,
        )
        halos = bright_star_halos(measured, bright_sources, cfg, significance=det.significance)
        out = dia_catalog(det, measured, streaks, halos, cfg)
        return DetectAndMeasureResult(
            dia_sources=out,
            subtracted_measured_exposure=measured,
            streaks=None if streaks is None else streaks.streaks,
        )


class DetectAndMeasureScoreTask(DetectAndMeasureTask):
    """Detect on a preconvolved score image (no further smoothing), measure on the difference.

    The score's DETECTED, DETECTED_NEGATIVE and EDGE planes are copied onto the difference
    (docs/algorithms.md §4.3); PSF fluxes, their errors and ``snr`` are forced PSF photometry on the
    difference at the score's centroids, so they mean what they mean without
    preconvolution, and ``snr`` ≈ ``peak_significance`` (the score's S/N) for point sources.
    """

    smooth = False

    def run(
        self,
        difference: Exposure,
        score: Exposure | None = None,  # type: ignore[override]
        bright_sources: Table | None = None,
    ) -> DetectAndMeasureResult:
        """Detect on ``score`` and measure on ``difference`` (a plain, non-preconvolved
        difference of the same pair; not the score itself)."""
        if score is None:
            raise InvalidInputError("DetectAndMeasureScoreTask needs the score image")
        if score is difference:
            raise InvalidInputError(
                "DetectAndMeasureScoreTask measures on the difference: pass the "
                "plain difference and the score, not the score twice"
            )
        if score.bbox != difference.bbox:
            raise InvalidInputError(
                f"score box {score.bbox} differs from difference box {difference.bbox}"
            )
        if difference.psf is None:
            raise InvalidInputError("the difference exposure has no PSF to measure with")
        diff = self._mark_cosmic_rays(self._clean(difference), difference.psf)
        sc = self._clean(score)
        # Cosmic rays are found on the difference and ORed into the score mask (docs/algorithms.md
        # §4.3).
        cr = diff.mask_planes.bitmask_if_present("CR")
        if cr:
            planes = sc.mask_planes.merge(diff.mask_planes)
            xp = sc.backend.xp
            m = planes.conform(sc.mask, sc.mask_planes, xp) | planes.conform(
                diff.mask & cr, diff.mask_planes, xp
            )
            sc = MaskedImage(
                sc.image, sc.variance, m, xy0=sc.xy0, mask_planes=planes, backend=sc.backend
            )
        det = self._detect(sc, score.psf)
        if len(det.catalog):
            _measure_on_difference(det.catalog, diff, difference.psf, self.backend)
        planes = diff.mask_planes.merge(det.mask_planes)
        xp = diff.backend.xp
        copy = det.mask_planes.bitmask_if_present(["DETECTED", "DETECTED_NEGATIVE", "EDGE"])
        m = planes.conform(diff.mask, diff.mask_planes, xp) | planes.conform(
            det.mask & copy, det.mask_planes, xp
        )
        sc_mi = MaskedImage(
            sc.image,
            sc.variance,
            planes.conform(det.mask, det.mask_planes, xp),
            xy0=sc.xy0,
            mask_planes=planes,
            backend=sc.backend,
        )
        if len(det.catalog):
            # Pixel flags from the difference, where the measurement is made: the score's
            # own mask planes were grown by the preconvolution and matching kernels, and
            # flagged most transients (measured: 9 of 10 S/N ≥ 8 injections on a 1024²
            # realistic pair, none on the difference).
            dp = det.mask_planes
            pos = (det.mask & (1 << dp["DETECTED"])) != 0
            neg = (det.mask & (1 << dp["DETECTED_NEGATIVE"])) != 0
            # m: the difference's mask with the score's EDGE copied (docs/algorithms.md §4.3 step
            # 5).
            _mask_bits_on_difference(det.catalog, m, pos, neg, planes, diff)
        det.mask, det.mask_planes = m, planes
        return self._finish(difference, diff, det, sc_mi, bright_sources)


def detection_noise_excess(det, backend: Backend | str | None = None) -> float:
    """Robust std of a detection's significance image (its noise in units of the variance
    plane's prediction).

    1 for white noise whose variance plane is right; above 1 when neighbouring pixels'
    noise is correlated (resampling, drizzling), which a per-pixel variance plane cannot
    describe.  Pixels masked in any plane but the detection planes, or non-finite, are
    left out; at most ~2²⁰ regularly spaced pixels are used
    (the IQR of 10⁶ samples is known to ~0.1 %).

    Returns
    -------
    float
        ``0.7413 × IQR`` of the significance; NaN when fewer than 100 pixels are usable.
    """
    be = resolve_backend(backend)
    xp = be.xp
    sig = det.significance
    # Masked pixels (EDGE, NO_DATA, defects and their grown footprints) out; detection
    # footprints kept: with correlated noise they cover the noise's own upper tail (a 5σ
    # variance-plane threshold is ~2σ of noise 2.5× stronger), and leaving them out
    # truncated the distribution (measured: excess 2.41 for a true 2.58).  The quartiles
    # are insensitive to the few per cent of pixels that real sources cover.
    det_bits = det.mask_planes.bitmask_if_present(["DETECTED", "DETECTED_NEGATIVE"])
    ok = ((det.mask & ~det.mask.dtype.type(det_bits)) == 0) & xp.isfinite(sig)
    step = max(1, int(math.sqrt(sig.size / float(1 << 20))))
    v = sig[::step, ::step][ok[::step, ::step]]
    if int(v.size) < 100:
        return float("nan")
    q1, q3 = (float(x) for x in be.asnumpy(xp.percentile(v, [25.0, 75.0])))
    return 0.7413 * (q3 - q1)


def _measure_on_difference(cat: Table, diff: MaskedImage, psf, backend) -> None:
    """Forced PSF photometry on the difference at the catalog's centroids (in place)."""
    flux, err, flag = forced_psf_flux(diff, psf, cat["x"], cat["y"], backend=backend)
    cat["psf_flux"], cat["psf_flux_err"] = flux, err
    with np.errstate(divide="ignore", invalid="ignore"):
        cat["snr"] = flux / err
    cat["flag_psf_flux"] = np.asarray(cat["flag_psf_flux"], bool) | ~np.isfinite(flux) | flag


def _mask_bits_on_difference(cat: Table, diff_bits, pos, neg, planes, diff: MaskedImage) -> None:
    """``mask_center`` (OR over the 5×5 at the centroid) and ``mask_footprint`` (OR over
    the score footprint) from the difference's mask ``diff_bits``; in place."""
    from scipy import ndimage

    be = diff.backend
    dm = np.asarray(be.asnumpy(diff_bits)).astype(np.int64)
    H, W = dm.shape
    x0, y0 = diff.xy0
    rx = np.rint(np.asarray(cat["x"], float) - x0).astype(np.int64)
    ry = np.rint(np.asarray(cat["y"], float) - y0).astype(np.int64)
    mc = np.zeros(len(cat), np.int64)
    for dy in range(-2, 3):  # taps, not sources
        for dx in range(-2, 3):
            mc |= dm[np.clip(ry + dy, 0, H - 1), np.clip(rx + dx, 0, W - 1)]
    mf = np.zeros(len(cat), np.int64)
    negative = np.asarray(cat["flag_negative"], bool)
    py = np.asarray(cat["peak_y"], np.int64) - y0
    px = np.asarray(cat["peak_x"], np.int64) - x0
    for on, sel in ((pos, ~negative), (neg, negative)):
        if not sel.any():
            continue
        lab, k = ndimage.label(np.asarray(be.asnumpy(on)), structure=np.ones((3, 3), bool))
        hit = (lab > 0) & (dm != 0)
        li, mm = lab[hit], dm[hit]
        per = np.zeros(k + 1, np.int64)
        for b in range(32):  # bits, not sources
            per |= (np.bincount(li[(mm >> b) & 1 == 1], minlength=k + 1) > 0).astype(np.int64) << b
        mf[sel] = per[lab[np.clip(py[sel], 0, H - 1), np.clip(px[sel], 0, W - 1)]]
    cat["mask_center"], cat["mask_footprint"] = mc.astype(np.int32), mf.astype(np.int32)
    cat["flag_saturated"] = ((mc | mf) & planes.bitmask_if_present(["SAT"])) != 0


def bright_star_halos(
    exposure: Exposure,
    bright_sources: Table | None,
    config: DetectAndMeasureConfig | None = None,
    significance=None,
) -> np.ndarray:
    """Halo discs (n, 4) of bright stars: parent x, y, radius (pixels) and the star's flux
    (inf for a saturated footprint).

    From the saturated footprints of the exposure's SAT planes (radius
    ``halo_sat_factor`` × √(area/π) + FWHM) and from ``bright_sources`` (Moffat wing
    radius, see :class:`DetectAndMeasureConfig`).  With the detection ``significance``
    image, each radius is at least the measured extent of the star's residual: the
    outermost 1-px annulus (out to ``halo_max_factor`` × the model radius) in which more
    than ``halo_annulus_fraction`` of the pixels have |S/N| ≥ ``halo_annulus_snr``, plus a
    FWHM.  The model radius assumes a residual fraction; the measured one sees the actual
    residual, whose wings depend on how well the kernel matched them.
    """
    cfg = DetectAndMeasureConfig() if config is None else config
    mi = exposure.masked_image
    be = mi.backend
    fwhm = float(exposure.psf.fwhm())
    discs = []
    sat = mi.mask_planes.bitmask_if_present(list(_SAT_PLANES))
    if sat:
        on = (mi.mask & sat) != 0
        if bool(on.any()):
            nd, xp = be.ndimage, be.xp
            labels, n = nd.label(on, structure=be.asarray(np.ones((3, 3), dtype=bool)))
            n = int(n)
            ys, xs = xp.nonzero(labels)
            lab = labels[ys, xs]
            cnt = be.asnumpy(xp.bincount(lab, minlength=n + 1))[1:].astype(np.float64)
            sx = be.asnumpy(xp.bincount(lab, weights=xs.astype(xp.float64), minlength=n + 1))[1:]
            sy = be.asnumpy(xp.bincount(lab, weights=ys.astype(xp.float64), minlength=n + 1))[1:]
            r = cfg.halo_sat_factor * np.sqrt(cnt / np.pi) + fwhm
            # A saturated star's flux is unknown: its halo flags every record (inf).
            discs.append(np.c_[sx / cnt + mi.xy0[0], sy / cnt + mi.xy0[1], r, np.full(n, np.inf)])
    if bright_sources is not None and len(bright_sources):
        fcol = next((c for c in ("psf_flux", "flux") if c in bright_sources.colnames), None)
        if fcol is None or not {"x", "y"} <= set(bright_sources.colnames):
            raise InvalidInputError(
                "bright_sources needs x, y and psf_flux (or flux) columns, got "
                f"{bright_sources.colnames}"
            )
        f = np.abs(np.asarray(bright_sources[fcol], dtype=np.float64))
        ok = np.isfinite(f) & (f > 0)
        good = mi.good_pixels(("NO_DATA", "EDGE", "BAD", "SAT", "DETECTED", "DETECTED_NEGATIVE"))
        v = be.asnumpy(mi.variance[good]) if bool(good.any()) else np.ones(1)
        sky = math.sqrt(float(np.median(v))) if v.size else 1.0
        beta = cfg.halo_beta
        alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
        # Moffat I(r) = F (β−1)/(π α²) (1 + r²/α²)^−β; solve ε·I(r) = nσ for r.
        q = (
            cfg.halo_residual_fraction
            * f[ok]
            * (beta - 1)
            / (math.pi * alpha**2 * cfg.halo_nsigma * sky)
        )
        r = alpha * np.sqrt(np.maximum(q ** (1.0 / beta) - 1.0, 0.0))
        big = r > fwhm  # a halo inside the PSF core is the star itself, not a halo
        x = np.asarray(bright_sources["x"], float)[ok][big]
        y = np.asarray(bright_sources["y"], float)[ok][big]
        discs.append(np.c_[x, y, r[big], f[ok][big]])
    if not discs:
        return np.zeros((0, 4))
    discs = np.concatenate(discs)
    if significance is not None and len(discs):
        discs[:, 2] = np.maximum(
            discs[:, 2],
            _measured_halo_radius(be.asnumpy(significance), discs, mi.xy0, cfg, gap=fwhm) + fwhm,
        )
    return discs


def _measured_halo_radius(
    sig: np.ndarray, discs: np.ndarray, xy0, cfg, gap: float = 4.0
) -> np.ndarray:
    """Per disc, the outermost radius of the star's significantly non-noise annuli (see
    :func:`bright_star_halos`); 0 when none is.  Host work on one cutout per star.

    Busy annuli count while they continue the star's own: each within ``gap`` pixels of
    the model radius or of the previous busy one.  An unrelated structure farther out
    (another star's residual, a masked column, a trail) is not this star's halo: counting
    the outermost busy annulus anywhere grew saturated stars' halos from ~65 px to
    ~270 px on a 2048² realistic pair and flagged 35 of 254 S/N >= 8 injections."""
    H, W = sig.shape
    out = np.zeros(len(discs))
    for i, (x, y, r0) in enumerate(discs[:, :3]):  # stars, not pixels: a few per image
        rmax = int(math.ceil(cfg.halo_max_factor * r0))
        cx, cy = x - xy0[0], y - xy0[1]
        xa, xb = max(0, int(cx) - rmax), min(W, int(cx) + rmax + 1)
        ya, yb = max(0, int(cy) - rmax), min(H, int(cy) + rmax + 1)
        if xa >= xb or ya >= yb:
            continue
        cut = np.abs(sig[ya:yb, xa:xb])
        yy, xx = np.mgrid[ya:yb, xa:xb]
        r = np.hypot(xx - cx, yy - cy).astype(np.int64).ravel()
        n = np.bincount(r, minlength=rmax + 1)[: rmax + 1]
        hit = np.bincount(r, weights=(cut >= cfg.halo_annulus_snr).ravel(), minlength=rmax + 1)[
            : rmax + 1
        ]
        frac = np.where(n > 0, hit / np.maximum(n, 1), 0.0)
        # Noise alone puts ~1 % of pixels above 2.5σ: annuli at 10 % are the star's.
        reach, last = float(r0), 0.0
        for b in np.flatnonzero(frac > cfg.halo_annulus_fraction):
            if b > reach + gap:
                break
            reach, last = max(reach, float(b)), float(b)
        out[i] = last
    return out


def _in_discs(x: np.ndarray, y: np.ndarray, discs: np.ndarray, own=None) -> np.ndarray:
    """True where (x, y) lies inside any disc (n_src × n_disc, both small).

    With a 4th disc column (the star's flux) and ``own`` (per source: |flux| / the own-flux
    fraction), a disc whose star is not brighter than ``own`` does not count: the source
    carries most of that star's flux, so it is the change, not the star's residual.
    """
    if not len(discs) or not x.size:
        return np.zeros(x.size, dtype=bool)
    out = np.zeros(x.size, dtype=bool)
    for i in range(0, len(discs), 256):  # bounded temporaries
        d = discs[i : i + 256]
        hit = ((x[:, None] - d[None, :, 0]) ** 2 + (y[:, None] - d[None, :, 1]) ** 2) <= d[
            None, :, 2
        ] ** 2
        if own is not None and d.shape[1] > 3:
            hit &= d[None, :, 3] > np.asarray(own, float)[:, None]
        out |= hit.any(axis=1)
    return out


def _groups(cat: Table, streak_id: np.ndarray) -> np.ndarray:
    """Group key per peak: its streak (all peaks on one trail) or else its footprint."""
    fid = np.asarray(cat["footprint_id"], dtype=np.int64)
    return np.where(streak_id > 0, -streak_id, fid)


def _merge_groups(cat: Table, streak_id: np.ndarray, sep: float):
    """One record per group: (index of each group's brightest peak, group size, multi-peak
    flag (peaks farther than ``sep`` from the brightest), group's OR of a boolean)."""
    key = _groups(cat, streak_id)
    # The catalog is sorted by decreasing |peak_significance|: a group's first row is its
    # brightest peak.
    _, first, inv, count = np.unique(
        key, return_index=True, return_inverse=True, return_counts=True
    )
    inv = inv.reshape(-1)
    x, y = np.asarray(cat["x"], float), np.asarray(cat["y"], float)
    d2 = (x - x[first][inv]) ** 2 + (y - y[first][inv]) ** 2
    far = np.zeros(first.size, dtype=bool)
    np.logical_or.at(far, inv, d2 > sep * sep)

    def any_of(v):
        o = np.zeros(first.size, dtype=bool)
        np.logical_or.at(o, inv, np.asarray(v, dtype=bool))
        return o

    def or_bits(v):
        o = np.zeros(first.size, dtype=np.int64)
        np.bitwise_or.at(o, inv, np.asarray(v, dtype=np.int64))
        return o

    def total(v):
        return np.bincount(inv, weights=np.asarray(v, float), minlength=first.size)

    return first, count, far, any_of, or_bits, total, inv


#: (unit, description) of every DIA catalog column.
_DESCRIPTIONS = {
    "id": ("", "record number, 1-based"),
    "x": (
        "pix",
        "centroid column in the PARENT frame (array column + the image's xy0[0]; "
        "integer = pixel centre)",
    ),
    "y": ("pix", "centroid row in the PARENT frame (array row + the image's xy0[1])"),
    "x_array": (
        "pix",
        "centroid column in the array (0 = first column of the difference; x minus xy0[0])",
    ),
    "y_array": ("pix", "centroid row in the array (y minus xy0[1])"),
    "ra": ("deg", "right ascension of the centroid from the difference's WCS (NaN without a WCS)"),
    "dec": ("deg", "declination of the centroid from the difference's WCS (NaN without a WCS)"),
    "psf_flux": (
        "FLUX",
        "PSF flux measured on the difference (signed; the brightest peak's for a merged record)",
    ),
    "psf_flux_err": ("FLUX", "1σ error of psf_flux from the variance plane"),
    "snr": ("", "psf_flux / psf_flux_err"),
    "peak_significance": (
        "",
        "S/N of the detection image at the peak (PSF-smoothed difference, "
        "or the score image with --preconvolve)",
    ),
    "footprint_npix": ("pix2", "pixels in the detection footprint(s) of this record"),
    "n_peaks": (
        "",
        "detection peaks this record stands for (several: one footprint or one trail, merged)",
    ),
    "polarity": ("", "+1: brighter in the science, -1: brighter in the template"),
    "streak_id": (
        "",
        "1-based index of the trail this record lies on (0: none); see the STREAK mask plane",
    ),
    "masked_planes": (None, "mask planes (of the flagging set) in the footprint or central 5x5"),
    "flag_edge": ("", "PSF stamp leaves the image"),
    "flag_masked": (
        "",
        "a flagging mask plane (BAD, SAT, CR, EDGE, NO_DATA, SUSPECT, INTRP) in the "
        "central 5x5 (see masked_planes for the whole footprint)",
    ),
    "flag_saturated": ("", "SAT in the footprint or central 5x5"),
    "flag_cr": ("", "a cosmic ray (CR plane found on the difference) at the centre"),
    "flag_dipole": ("", "an opposite-polarity record within dipole_separation_fwhm x FWHM"),
    "flag_streak": ("", "on a linear trail (satellite): all its peaks merged into this record"),
    "flag_bright_star": (
        "",
        "inside the halo of a bright or saturated star, or of a bright star's residual",
    ),
    "flag_multi_peak": (
        "",
        "its footprint held peaks more than a FWHM apart (a residual, not one point source)",
    ),
    "flag_psf_flux": ("", "PSF flux failed (no usable pixels in the PSF core)"),
    "clean": ("", "no flag set: a candidate transient"),
}


def _flux_unit(metadata):
    bunit = metadata.get("BUNIT") if metadata is not None else None
    if bunit:
        try:
            return u.Unit(str(bunit).strip(), parse_strict="raise")
        except (ValueError, TypeError):
            pass
    return u.adu


def dia_catalog(
    det,
    measured: Exposure,
    streaks: StreakResult | None,
    halos: np.ndarray,
    cfg: DetectAndMeasureConfig,
) -> Table:
    """The DIA catalog from a detection: peaks merged per trail and per footprint, flags,
    sky positions, units and descriptions (see the module docstring)."""
    cat = det.catalog
    mi = measured.masked_image
    x0, y0 = mi.xy0
    fwhm = float(measured.psf.fwhm())
    n = len(cat)
    if streaks is not None and n:
        lab = streaks.labels
        px = np.clip(np.rint(np.asarray(cat["x"], float) - x0).astype(np.int64), 0, mi.shape[1] - 1)
        py = np.clip(np.rint(np.asarray(cat["y"], float) - y0).astype(np.int64), 0, mi.shape[0] - 1)
        sid = mi.backend.asnumpy(lab[mi.backend.asarray(py), mi.backend.asarray(px)]).astype(
            np.int64
        )
    else:
        sid = np.zeros(n, dtype=np.int64)
    first, count, far, any_of, or_bits, total, inv = (
        _merge_groups(cat, sid, cfg.multi_peak_separation_fwhm * fwhm)
        if n
        else (np.zeros(0, np.int64),) * 3 + (None,) * 4
    )
    out = Table()
    m = first.size
    out["id"] = np.arange(1, m + 1, dtype=np.int64)
    x, y = np.asarray(cat["x"], float)[first], np.asarray(cat["y"], float)[first]
    out["x"], out["y"] = x, y
    out["x_array"], out["y_array"] = x - x0, y - y0
    ra = dec = np.full(m, np.nan)
    if measured.wcs is not None and m:
        # The WCS maps array pixels (Exposure convention).
        ra, dec = (
            np.asarray(v, dtype=np.float64)
            for v in measured.wcs.pixel_to_world_values(x - x0, y - y0)
        )
    out["ra"], out["dec"] = ra, dec
    for c in ("psf_flux", "psf_flux_err", "snr", "peak_significance"):
        out[c] = np.asarray(cat[c], dtype=np.float64)[first]
    out["footprint_npix"] = (
        np.asarray(total(_unique_footprint_npix(cat)), dtype=np.int64)
        if m
        else np.zeros(0, np.int64)
    )
    out["n_peaks"] = np.asarray(count, dtype=np.int64)
    out["polarity"] = np.where(
        np.asarray(cat["peak_significance"], float)[first] >= 0, 1, -1
    ).astype(np.int8)
    out["streak_id"] = sid[first] if m else np.zeros(0, np.int64)
    planes = det.mask_planes
    if m:
        bits = or_bits(np.asarray(cat["mask_center"]) | np.asarray(cat["mask_footprint"]))
        fl = bits & planes.bitmask_if_present(list(cfg.flag_planes))
        names = np.empty(m, dtype=object)
        for v in np.unique(fl):  # distinct bit patterns, not sources
            names[fl == v] = ",".join(planes.interpret(int(v)))
        out["masked_planes"] = names.astype(str)
        out["flag_edge"] = any_of(cat["flag_edge"])
        # A defect (or what a kernel spread from it: the planes are grown by each kernel's
        # footprint) that reached the source's centre.  Bits elsewhere in the footprint
        # are listed in masked_planes but do not flag: a bright transient's footprint
        # reaches 10-20 px, and a template bad column's plane is grown by the matching
        # kernel to ~20 px, so footprint flags cost 11 of 44 S/N >= 8 injections of a
        # realistic 2048² pair (none of them affected by the defect).
        centre = or_bits(np.asarray(cat["mask_center"]))
        out["flag_masked"] = (centre & planes.bitmask_if_present(list(cfg.flag_planes))) != 0
        out["flag_saturated"] = any_of(cat["flag_saturated"])
        cr = planes.bitmask_if_present("CR")
        out["flag_cr"] = (
            (np.asarray(cat["mask_center"])[first] & cr) != 0 if cr else np.zeros(m, bool)
        )
    else:
        out["masked_planes"] = np.zeros(0, dtype=str)
        for c in ("flag_edge", "flag_masked", "flag_saturated", "flag_cr"):
            out[c] = np.zeros(0, bool)
    out["flag_dipole"] = _dipoles(out, fwhm * cfg.dipole_separation_fwhm)
    out["flag_streak"] = np.asarray(out["streak_id"]) > 0
    out["flag_bright_star"] = _in_discs(
        x, y, halos, np.abs(np.asarray(out["psf_flux"], float)) / cfg.halo_own_flux_fraction
    )
    out["flag_multi_peak"] = far & (np.asarray(out["streak_id"]) == 0) if m else np.zeros(0, bool)
    if m and det.significance is not None:
        # A bright star's residual that is not a point source (a ring, a dipole, a sharp
        # core) has a halo of its own: fainter records around it are its pieces.
        # Measured from the detection image as for saturated stars (DECam cutouts: the
        # clean false sources were 2–4 FWHM from such residuals).
        bad = out["flag_multi_peak"] | out["flag_dipole"] | out["flag_cr"] | out["flag_masked"]
        src = bad & (np.abs(np.asarray(out["peak_significance"], float)) >= cfg.halo_residual_snr)
        if src.any():
            r0 = 2.0 * fwhm
            d = np.c_[x[src], y[src], np.full(int(src.sum()), r0)]
            d[:, 2] = np.maximum(
                r0,
                _measured_halo_radius(
                    mi.backend.asnumpy(det.significance), d, mi.xy0, cfg, gap=fwhm
                )
                + fwhm,
            )
            inside = _in_discs(x, y, d)
            out["flag_bright_star"] |= inside & ~src
    out["flag_psf_flux"] = (
        any_of(cat["flag_psf_flux"]) if m else np.zeros(0, bool)
    ) | ~np.isfinite(np.asarray(out["psf_flux"], float))
    out["clean"] = (
        ~np.any([np.asarray(out[f], bool) for f in DIA_FLAGS], axis=0) if m else np.zeros(0, bool)
    )
    funit = _flux_unit(measured.metadata)
    for name in out.colnames:
        unit, desc = _DESCRIPTIONS[name]
        out[name].unit = funit if unit == "FLUX" else (u.Unit(unit) if unit is not None else None)
        out[name].description = desc
    out.meta.update(
        {
            "x0": int(x0),
            "y0": int(y0),
            "threshold": float(cfg.threshold),
            "n_streaks": 0 if streaks is None else len(streaks.streaks),
            "n_bright_star_halos": int(len(halos)),
            # > 1: threshold and S/N in units of the measured (correlated) noise.
            "noise_excess": float(cat.meta.get("noise_excess", float("nan"))),
            "noise_rescaled": bool(cat.meta.get("noise_rescaled", False)),
        }
    )
    return out


def _unique_footprint_npix(cat: Table) -> np.ndarray:
    """Each footprint's pixel count on its first peak only, so group sums count it once."""
    fid = np.asarray(cat["footprint_id"], dtype=np.int64)
    _, first = np.unique(fid, return_index=True)
    v = np.zeros(len(cat), dtype=np.float64)
    v[first] = np.asarray(cat["footprint_npix"], dtype=np.float64)[first]
    return v


def _dipoles(cat: Table, radius: float) -> np.ndarray:
    """True for sources with an opposite-polarity neighbour closer than ``radius``."""
    n = len(cat)
    if n < 2:
        return np.zeros(n, dtype=bool)
    x, y, p = np.asarray(cat["x"]), np.asarray(cat["y"]), np.asarray(cat["polarity"])
    d2 = (x[:, None] - x[None, :]) ** 2 + (y[:, None] - y[None, :]) ** 2
    opposite = p[:, None] != p[None, :]
    return ((d2 < radius * radius) & opposite).any(axis=1)
