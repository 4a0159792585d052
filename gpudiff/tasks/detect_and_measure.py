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
from astropy.table import Table

from ..backend import Backend, resolve_backend
from ..configfield import option, validate_config
from ..errors import InvalidInputError
from ..image import Exposure, MaskedImage
from ..ops.cosmic_rays import find_cosmic_rays
from ..ops.detection import detect_sources
from ..ops.photometry import forced_psf_flux
from ..ops.selection import _quantiles
from ..ops.streaks import find_streaks
from .dia_catalog import DIA_FLAGS, dia_catalog, flag_line_sources
from .halos import BusyMap, bright_star_halos

__all__ = [
    "DetectAndMeasureConfig",
    "DetectAndMeasureResult",
    "DetectAndMeasureTask",
    "DetectAndMeasureScoreTask",
    "DIA_FLAGS",
    "bright_star_halos",
    "dia_catalog",
    "detection_noise_excess",
]

log = logging.getLogger("gpudiff.tasks.detect_and_measure")

_CLEARED = ("DETECTED", "DETECTED_NEGATIVE", "NOT_DEBLENDED", "STREAK")


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
    r_sat = √(area/π) flags sources within the measured extent of its residual (below),
    and at least within ``halo_sat_factor`` × r_sat + FWHM.  A Moffat wing (β ≈ 2–2.5)
    falls from the saturation level (~5000σ of sky) to where a 10 % residual is
    detectable within (5000 × 0.1)^(1/(2β)) ≈ 3.5–4.7 × r_sat, but the residual is what
    the kernel did not match: a floor of 4 × r_sat flagged 3–4 S/N ≥ 8 injections of each
    realistic 2048² pair 37–57 px from saturated stars whose measured residual stopped
    short of them; at 2 (and at 1) they are clean and no false source is added there or
    on the 20 DECam same-epoch pairs.  A catalog star of flux F (no
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
    #: find_cosmic_rays' default (6σ) misses faint science cosmic rays, which convolveTemplate
    #: keeps sharp: on a realistic 2048² pair 8 of the 9 clean false sources were such rays
    #: once the well-filled template columns stopped hiding them (docs/algorithms.md §14).
    #: At 5σ one more is flagged and no S/N >= 8 injection is lost; 4.5σ and 4σ gained none.
    cr_min_sigma: float = option(
        5.0,
        doc="A cosmic-ray pixel of the difference is at least this many sigma (variance "
        "plane) above zero (find_cosmic_rays' min_sigma).",
        min=0,
        inclusive_min=False,
        gpudiff_only=True,
    )
    flag_planes: tuple[str, ...] = option(
        ("BAD", "SAT", "CR", "EDGE", "NO_DATA", "SUSPECT", "INTRP"),
        doc="Mask planes that flag a source (flag_masked) when set in the central 5x5 pixels "
        "(mask_center), or for |S/N| < masked_footprint_snr anywhere in its footprint (all "
        "found are listed in masked_planes).",
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
    deblend_separation_fwhm: float | None = option(
        3.0,
        doc="Peaks of one footprint (no trail through it) farther apart than this x FWHM, "
        "single linkage, are separate records; None: one record per footprint.",
        gpudiff_only=True,
    )
    multi_peak_separation_fwhm: float = option(
        1.0,
        doc="Peaks of one footprint further apart than this x FWHM set flag_multi_peak.",
        gpudiff_only=True,
    )
    halo_sat_factor: float = option(
        2.0,
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
    #: A faint source's footprint is its core (a few to ~25 px): a defect-reached pixel
    #: inside it is at the source, and on the DECam cutouts such records were the
    #: unrepaired ends of cosmic-ray tracks beside the repaired part.  A bright source's
    #: footprint reaches 10-20 px into its wings, where a grown defect plane does not
    #: make it suspect (11 of 44 S/N >= 8 injections of a 2048² pair were lost so).
    masked_footprint_snr: float = option(
        10.0,
        doc="Records with |S/N| below this are flagged flag_masked when a flagging plane "
        "lies anywhere in their footprint; brighter ones only when it reaches their centre.",
        min=0.0,
        gpudiff_only=True,
    )

    #: A cosmic ray too faint for the per-pixel test (a track of 3–7σ pixels) that the
    #: inputs' finder left in the science image: convolveScience smooths it into a
    #: PSF-sized blob in the difference, but on the science image it is still one pixel
    #: wide (gpudiff.ops.sharpness).  Measured on the sharper realistic 2048² pair
    #: (docs/algorithms.md §14): transients give T ≤ 2.9 below S/N 20 and ≤ 4.7 above, and
    #: a line excess L/P − ρ ≤ 0.21 below S/N 20 and ≤ 0.05 above; the cosmic-ray records
    #: T up to 10.7 with excess 0.15–0.63.  Both thresholds together flag 3 of the 6 clean
    #: false records on cosmic rays and no transient.
    sharp_line_sigma: float | None = option(
        3.5,
        doc="A record is flagged flag_cr when the science image (positive records) or the "
        "template (negative ones), given to run, holds more light along a 1-px line through "
        "it than its PSF predicts by this many sigma (and by sharp_line_excess); None: off, "
        "as LSST.",
        gpudiff_only=True,
    )
    sharp_line_excess: float = option(
        0.25,
        doc="With sharp_line_sigma: the line-to-PSF filter ratio L/P must exceed the PSF's "
        "own (rho) by this much too (a bright star's PSF-model error raises the "
        "significance, not the ratio).",
        min=0.0,
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
        return diff.with_plane_set(
            "CR",
            find_cosmic_rays(diff, psf, min_sigma=self.config.cr_min_sigma, backend=self.backend),
        )

    def run(
        self,
        difference: Exposure,
        bright_sources: Table | None = None,
        science: Exposure | None = None,
        template: Exposure | None = None,
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
        science, template : Exposure, optional
            The science exposure and the template (each with its PSF, on the difference's
            pixel frame): faint cosmic-ray tracks left in them flag their records, positive
            ones by the science, negative ones by the template (``sharp_line_sigma``).
        """
        if difference.psf is None:
            raise InvalidInputError("the difference exposure has no PSF to detect and measure with")
        diff = self._mark_cosmic_rays(self._clean(difference), difference.psf)
        det = self._detect(diff, difference.psf)
        return self._finish(difference, diff, det, diff, bright_sources, science, template)

    def _finish(
        self,
        difference: Exposure,
        diff: MaskedImage,
        det,
        det_image: MaskedImage,
        bright_sources=None,
        science: Exposure | None = None,
        template: Exposure | None = None,
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
        # The busy-pixel map the halos' measured extents read crosses to the host once,
        # with the halos' own arrays.
        busy = BusyMap(det.significance, cfg, self.backend)
        halos = bright_star_halos(
            measured, bright_sources, cfg, significance=det.significance, busy=busy
        )
        out = dia_catalog(det, measured, streaks, halos, cfg, busy=busy)
        if cfg.sharp_line_sigma is not None and len(out):
            flag_line_sources(out, ((science, 1), (template, -1)), cfg, self.backend)
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
        science: Exposure | None = None,
        template: Exposure | None = None,
    ) -> DetectAndMeasureResult:
        """Detect on ``score`` and measure on ``difference`` (a plain, non-preconvolved
        difference of the same pair; not the score itself); ``bright_sources``,
        ``science`` and ``template`` as :meth:`DetectAndMeasureTask.run`."""
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
            # 5).  For the flags only, the score's NO_DATA too: detection leaves those pixels
            # out, so a source whose core lies there is found as the rim of its footprint
            # outside them, off its true position and unflagged (a S/N 54 injection 16 px
            # from a realistic 2048² pair's template no-data strip, whose score plane the
            # preconvolution and matching kernels had grown over it, became a clean record
            # 3.4 px off at S/N 14).  The other score planes stay out (see above).
            nd = planes.conform(sc.mask, sc.mask_planes, xp) & planes.bitmask_if_present("NO_DATA")
            _mask_bits_on_difference(det.catalog, m | nd, pos, neg, planes, diff)
        det.mask, det.mask_planes = m, planes
        return self._finish(difference, diff, det, sc_mi, bright_sources, science, template)


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
    sub, ok = sig[::step, ::step], ok[::step, ::step]
    # Sort-free quartiles (selection), and the count, in one transfer.
    q = _quantiles(be, [sub.astype(xp.float32)], ok, [(0.25, 0.75)])
    q1, q3, n = be.asnumpy(xp.concatenate([q, xp.count_nonzero(ok).reshape(1).astype(q.dtype)]))
    return 0.7413 * float(q3 - q1) if n >= 100 else float("nan")


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
