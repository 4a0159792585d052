"""DetectAndMeasureTask and DetectAndMeasureScoreTask: DIA sources on a difference image.

Detection runs on the difference with PSF smoothing (or on the preconvolved score image
without smoothing), at 5σ, both polarities (spec §4.3 "DetectAndMeasureScoreTask"); the
DIA source catalog is measured on the difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Table

from ..backend import Backend, resolve_backend
from ..errors import InvalidInputError
from ..image import Exposure, MaskedImage
from ..ops.cosmic_rays import find_cosmic_rays
from ..ops.detection import detect_sources
from ..ops.photometry import forced_psf_flux

__all__ = ["DetectAndMeasureConfig", "DetectAndMeasureResult", "DetectAndMeasureTask",
           "DetectAndMeasureScoreTask"]

_CLEARED = ("DETECTED", "DETECTED_NEGATIVE", "NOT_DEBLENDED", "STREAK")


@dataclass(frozen=True)
class DetectAndMeasureConfig:
    """Detection threshold (σ of the detection image), polarity, and the dipole rule.

    A positive and a negative detection closer than ``dipole_separation_fwhm`` × FWHM are
    flagged ``flag_dipole`` (a misaligned or mis-matched star, not two transients).
    ``do_subtract_background`` removes a binned background from the detection image first
    (LSST's detectAndMeasure does so too): differences keep any differential background
    that was fitted but not subtracted.
    """

    threshold: float = 5.0
    polarity: str = "both"
    do_subtract_background: bool = True
    dipole_separation_fwhm: float = 1.5
    find_cosmic_rays: bool = True
    flag_planes: tuple[str, ...] = ("BAD", "SAT", "CR", "EDGE", "NO_DATA", "SUSPECT", "INTRP")

    def __post_init__(self):
        if self.threshold <= 0:
            raise InvalidInputError(f"threshold must be > 0, got {self.threshold}")
        if self.polarity not in ("positive", "negative", "both"):
            raise InvalidInputError(f"polarity must be positive, negative or both, got {self.polarity!r}")


@dataclass
class DetectAndMeasureResult:
    """``dia_sources`` (astropy Table) and the difference with DETECTED* planes set."""

    dia_sources: Table
    subtracted_measured_exposure: Exposure


class DetectAndMeasureTask:
    """Detect and measure DIA sources on a difference image (PSF-smoothed, 5σ, ±)."""

    smooth = True

    def __init__(self, config: DetectAndMeasureConfig | None = None, backend: Backend | str | None = None):
        self.config = DetectAndMeasureConfig() if config is None else config
        self.backend = resolve_backend(backend)

    def _clean(self, exp: Exposure) -> MaskedImage:
        return exp.masked_image.to_backend(self.backend).with_planes_cleared(_CLEARED)

    def _detect(self, detection_image: MaskedImage, psf):
        cfg = self.config
        # EDGE pixels hold copied, unconvolved input (doCopyEdge) or an incomplete matched
        # filter: not searched, so they cannot produce detections.
        return detect_sources(detection_image, psf, threshold=cfg.threshold, polarity=cfg.polarity,
                              smooth=self.smooth, bad_planes=("NO_DATA", "EDGE"), background="estimate" if cfg.do_subtract_background else None,
                              flag_planes=cfg.flag_planes, backend=self.backend)

    def _mark_cosmic_rays(self, diff: MaskedImage, psf) -> MaskedImage:
        """Set the CR plane where the difference is sharper than its PSF (LSST finds and
        keeps CRs on the difference: masked, not interpolated)."""
        if not self.config.find_cosmic_rays:
            return diff
        return diff.with_plane_set("CR", find_cosmic_rays(diff, psf, backend=self.backend))

    def run(self, difference: Exposure) -> DetectAndMeasureResult:
        """Detect on ``difference`` and measure there."""
        if difference.psf is None:
            raise InvalidInputError("the difference exposure has no PSF to detect and measure with")
        diff = self._mark_cosmic_rays(self._clean(difference), difference.psf)
        det = self._detect(diff, difference.psf)
        return self._finish(difference, diff, det)

    def _finish(self, difference: Exposure, diff: MaskedImage, det) -> DetectAndMeasureResult:
        cat = det.catalog
        out = Table()
        out["id"] = np.arange(len(cat), dtype=np.int64)
        for c in ("x", "y", "psf_flux", "psf_flux_err", "snr", "footprint_npix", "peak_significance"):
            out[c] = cat[c]
        out["polarity"] = np.where(np.asarray(cat["psf_flux"]) >= 0, 1, -1).astype(np.int8)
        out["flag_edge"] = cat["flag_edge"]
        out["flag_masked"] = cat["flag_masked"]
        out["flag_saturated"] = cat["flag_saturated"]
        out["masked_planes"] = cat["masked_planes"]
        cr_bit = det.mask_planes.bitmask_if_present("CR")
        out["flag_cr"] = (np.asarray(cat["mask_center"]) & cr_bit) != 0 if cr_bit else np.zeros(len(cat), bool)
        out["flag_dipole"] = _dipoles(out, difference.psf.fwhm() * self.config.dipole_separation_fwhm)
        measured = Exposure(MaskedImage(diff.image, diff.variance, det.mask, xy0=diff.xy0,
                                        mask_planes=det.mask_planes, backend=diff.backend),
                            difference.psf, difference.wcs, difference.photo_calib, difference.metadata)
        return DetectAndMeasureResult(dia_sources=out, subtracted_measured_exposure=measured)


class DetectAndMeasureScoreTask(DetectAndMeasureTask):
    """Detect on a preconvolved score image (no further smoothing), measure on the difference.

    The score's DETECTED, DETECTED_NEGATIVE and EDGE planes are copied onto the difference
    (spec §4.3).
    """

    smooth = False

    def run(self, difference: Exposure, score: Exposure | None = None) -> DetectAndMeasureResult:  # type: ignore[override]
        """Detect on ``score`` and measure on ``difference``."""
        if score is None:
            raise InvalidInputError("DetectAndMeasureScoreTask needs the score image")
        if score.bbox != difference.bbox:
            raise InvalidInputError(f"score box {score.bbox} differs from difference box {difference.bbox}")
        diff = self._mark_cosmic_rays(self._clean(difference), difference.psf)
        sc = self._clean(score)
        # Cosmic rays are found on the difference and ORed into the score mask (spec §4.3).
        cr = diff.mask_planes.bitmask_if_present("CR")
        if cr:
            planes = sc.mask_planes.merge(diff.mask_planes)
            xp = sc.backend.xp
            m = planes.conform(sc.mask, sc.mask_planes, xp) | planes.conform(diff.mask & cr, diff.mask_planes, xp)
            sc = MaskedImage(sc.image, sc.variance, m, xy0=sc.xy0, mask_planes=planes, backend=sc.backend)
        det = self._detect(sc, score.psf)
        # Measure on the difference: forced PSF photometry at the score's peaks.
        if len(det.catalog):
            flux, err, _ = forced_psf_flux(diff, difference.psf, det.catalog["x"], det.catalog["y"],
                                           backend=self.backend)
            det.catalog["psf_flux"], det.catalog["psf_flux_err"] = flux, err
            with np.errstate(divide="ignore", invalid="ignore"):
                det.catalog["snr"] = flux / err
        planes = diff.mask_planes.merge(det.mask_planes)
        xp = diff.backend.xp
        copy = det.mask_planes.bitmask_if_present(["DETECTED", "DETECTED_NEGATIVE", "EDGE"])
        m = planes.conform(diff.mask, diff.mask_planes, xp) | planes.conform(det.mask & copy, det.mask_planes, xp)
        det.mask, det.mask_planes = m, planes
        return self._finish(difference, diff, det)


def _dipoles(cat: Table, radius: float) -> np.ndarray:
    """True for sources with an opposite-polarity neighbour closer than ``radius``."""
    n = len(cat)
    if n < 2:
        return np.zeros(n, dtype=bool)
    x, y, p = np.asarray(cat["x"]), np.asarray(cat["y"]), np.asarray(cat["polarity"])
    d2 = (x[:, None] - x[None, :]) ** 2 + (y[:, None] - y[None, :]) ** 2
    opposite = p[:, None] != p[None, :]
    return ((d2 < radius * radius) & opposite).any(axis=1)
