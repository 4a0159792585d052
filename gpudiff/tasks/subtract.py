"""AlardLuptonSubtractTask: difference an exposure against a template
(docs/algorithms.md §4.1–§4.2).

The order of operations follows LSST's ``subtractImages.py``: validate, template coverage,
variance scaling, mask updates, PSF sizes, the choice of which image to convolve, kernel
source selection, the kernel fit, the convolution, the subtraction in the **science**
exposure's flux units, and decorrelation.  Tasks never touch files.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy.table import Table

from ..backend import Backend, resolve_backend
from ..backend.fallback import with_memory_fallback
from ..backend.threads import run_concurrently
from ..configfield import option, validate_config
from ..errors import (
    AllMaskedError,
    InsufficientKernelSourcesError,
    InvalidInputError,
    NoWorkFound,
    PsfError,
    ShapeMismatchError,
)
from ..image import Box, Exposure, GridPsf, ImagePsf, MaskedImage, evaluate_mean_fwhm
from ..ops.convolution import correlate
from ..ops.cosmic_rays import find_cosmic_rays
from ..ops.detection import detect_sources, select_kernel_sources
from ..ops.interpolate import DEFAULT_INTERPOLATE_PLANES, defect_pixels, interpolate_over_defects
from ..psfmatch import PsfMatchConfig, fit_spatial_kernel, make_candidates, make_kernel_basis
from ..psfmatch.candidates import (
    reclassify_extended,
    selection_counts,
    template_presence_snr,
)
from ..psfmatch.fit import KernelFit
from ..psfmatch.spatial import SpatialKernel
from .decorrelate import DecorrelateALKernelConfig, DecorrelateALKernelTask
from .masks import convolve_preserving, mask_non_finite, template_coverage, update_masks
from .scale_variance import ScaleVarianceConfig, ScaleVarianceTask

__all__ = [
    "AlardLuptonSubtractConfig",
    "SubtractionResult",
    "AlardLuptonSubtractTask",
    "choose_convolution_method",
    "decorrelated_psf",
    "psf_fwhm",
    "residual_background",
]

log = logging.getLogger("gpudiff.tasks.subtract")

_MODES = ("convolveTemplate", "convolveScience", "auto")


def _default_make_kernel() -> PsfMatchConfig:
    # AlardLuptonSubtractTask.setDefaults (docs/algorithms.md §1.1 "Important").
    return PsfMatchConfig(fit_for_background=True, spatial_kernel_order=1, spatial_bg_order=2)


@dataclass(frozen=True)
class AlardLuptonSubtractConfig:
    """``AlardLuptonSubtractConfig`` (docs/algorithms.md §4.1), snake_case, LSST defaults.

    The kernel-source selector is LSST's ``ScienceSourceSelector``: unresolved, isolated,
    S/N in [``source_snr_min``, ``source_snr_max``] from PSF flux.

    Two departures from LSST's defaults, both for inputs that are not LSST calexps:

    - ``do_subtract_background`` is **True**: the differential background fitted with the
      kernel is subtracted from the difference (in every mode, and from the score image
      of the preconvolution task).  LSST's default is False because its calexps are
      sky-subtracted by the calibration pipeline; a plain FITS image rarely is perfectly,
      and a residual sky plane of 0.3σ then stays in the difference (measured: PSF fluxes
      of transients 23 % high).  A low-order residual background measured on the
      difference itself is subtracted too (:func:`residual_background`).  Set it False to
      mirror LSST exactly.
    - ``interpolate_mask_planes`` (NO_DATA, BAD, SAT, CR, EDGE) and every non-finite pixel
      of **both** inputs are interpolated (:func:`gpudiff.ops.interpolate_over_defects`)
      before detection, kernel fitting, convolution and decorrelation, and flagged INTRP
      (LSST's calexps arrive interpolated; raw data's garbage would otherwise be spread by
      the kernel into ±stripes).  An empty tuple switches it off (non-finite pixels are
      then zero-filled by the convolution, as before).
    """

    mode: str = option(
        "convolveTemplate",
        doc="Which image is convolved with the matching kernel (auto: the one with the "
        "narrower PSF).",
        choices=_MODES,
    )
    make_kernel: PsfMatchConfig = option(
        doc="The PSF-matching kernel fit (LSST's setDefaults: spatial kernel order 1, "
        "background order 2, fitted).",
        default_factory=_default_make_kernel,
    )
    do_decorrelation: bool = option(
        True, doc="Whiten the difference's noise (DecorrelateALKernelTask)."
    )
    required_template_fraction: float = option(
        0.1,
        doc="Smallest fraction of the science image the template must cover (else NoWorkFound).",
        min=0,
        max=1,
    )
    min_template_fraction_for_expected_success: float = option(
        0.2,
        doc="When the kernel fit fails on a template covering less than this fraction, "
        "NoWorkFound is raised instead of the fit's error.",
    )
    do_scale_variance: bool = option(
        True, doc="Rescale both variance planes to the pixel noise (ScaleVarianceTask)."
    )
    # LSST: False (its calexps are sky-subtracted); see the class docstring.
    do_subtract_background: bool = option(
        True,
        doc="Subtract the fitted differential background (and a residual one) from the "
        "difference; LSST's default is False.",
    )
    interpolate_mask_planes: tuple[str, ...] = option(
        DEFAULT_INTERPOLATE_PLANES,
        doc="Planes of both inputs interpolated over (with non-finite pixels) before "
        "detection, fitting and convolution; empty: off.",
        gpudiff_only=True,
    )
    restrict_kernel_edge_sources: bool = option(
        True,
        doc="Keep kernel sources a kernel stamp away from the science image's edges.",
    )
    max_kernel_sources: int = option(
        1000,
        doc="Keep at most this many kernel sources, the highest S/N (<= 0: no limit).",
    )
    min_kernel_sources: int = option(3, doc="Fewer kernel sources than this is an error.", min=1)
    exclude_mask_planes: tuple[str, ...] = option(
        ("NO_DATA", "BAD", "SAT", "EDGE", "FAKE", "HIGH_VARIANCE"),
        doc="Kernel candidates whose stamp has any of these planes are excluded.",
    )
    bad_mask_planes: tuple[str, ...] = option(
        ("NO_DATA", "BAD", "SAT", "EDGE"),
        doc="Pixels with these planes count as unusable when the inputs are validated "
        "(their variance is not checked).",
    )
    preserve_template_mask: tuple[str, ...] = option(
        ("NO_DATA", "BAD", "HIGH_VARIANCE"),
        doc="Template mask planes kept; the others are cleared (the renamed *_TEMPLATE "
        "planes stay too).",
    )
    rename_template_mask: tuple[str, ...] = option(
        ("SAT", "INJECTED", "INJECTED_CORE"),
        doc="Template mask planes copied to NAME_TEMPLATE (so they reach the difference).",
    )
    preserve_mask_planes: tuple[str, ...] = option(
        ("INJECTED", "INJECTED_CORE", "INJECTED_TEMPLATE", "INJECTED_CORE_TEMPLATE"),
        doc="Planes restored unspread after the convolution (injection markers).",
    )
    allow_kernel_source_detection: bool = option(
        False,
        doc="LSST: re-detect kernel sources when the kernel fit fails; accepted for "
        "compatibility, no effect in gpudiff (sources are detected when none are given).",
    )
    find_science_cosmic_rays: bool = option(
        True,
        doc="Find cosmic rays on the science image not flagged yet (CR), then interpolate "
        "them when CR is in interpolate_mask_planes.",
        gpudiff_only=True,
    )
    #: LSST's templates are coadds, where cosmic rays were rejected; a single-exposure
    #: template is not, and each of its rays becomes a clean negative DIA source
    #: (measured: 12 of the 23 clean false sources of the 20 same-epoch DECam cutout pairs).
    find_template_cosmic_rays: bool = option(
        True,
        doc="Find cosmic rays on the template too (flagged CR, then interpolated before the "
        "kernel fit and the convolution).",
        gpudiff_only=True,
    )
    #: A source new in the science (transient, moving object) has nothing to match, and
    #: where such sources are common among the candidates LSST's clipping lets them pull
    #: the kernel sum down (see :func:`gpudiff.psfmatch.candidates.template_presence_snr`).
    template_source_snr_min: float | None = option(
        3.0,
        doc="A kernel source must also be a source in the template at this S/N (PSF-weighted, "
        "above the local background; None: no test, as LSST).",
        gpudiff_only=True,
    )
    source_snr_min: float = option(
        10.0,
        doc="Smallest PSF-flux S/N of a kernel source.",
        lsst="sourceSelector.signalToNoise.minimum",
    )
    source_snr_max: float = option(
        500.0,
        doc="Largest PSF-flux S/N of a kernel source.",
        lsst="sourceSelector.signalToNoise.maximum",
    )
    detection_threshold: float = option(
        5.0,
        doc="Threshold (sigma) of the detection of kernel sources on the science image "
        "when no catalog is given.",
        gpudiff_only=True,
    )
    #: ScaleVarianceTask on at most this many regularly spaced pixels (None: every pixel,
    #: as LSST).  The factor's quartile scatter at 2²² samples is ~0.1 %, while every pixel
    #: of a 4096² pair costs ~4 s of the 2-core budget; images up to 2048² are unaffected.
    scale_variance_max_samples: int | None = option(
        1 << 22,
        doc="Variance rescaling on at most this many regularly spaced pixels (None: all, as LSST).",
        gpudiff_only=True,
    )

    def __post_init__(self):
        # Every rule is a single-field one (the field options).
        validate_config(self)


@dataclass
class SubtractionResult:
    """LSST's output ``Struct`` (snake_case) plus diagnostics.

    Attributes
    ----------
    difference : Exposure
        In the science exposure's flux units; PSF = science PSF (convolveTemplate) or
        template PSF (convolveScience), convolved with the decorrelation filter when
        decorrelating; WCS and calibration of the science exposure.
    matched_template, matched_science : Exposure
    background_model : SpatialKernel or None
        The fitted differential background (None unless subtracted, as LSST).
    psf_matching_kernel : SpatialKernel
    kernel_sources : astropy Table
        Every kernel candidate with its status (GOOD/BAD), whether it was used, and why
        it was rejected.
    mode : str
        "convolveTemplate" or "convolveScience" (after ``auto``).
    metadata : dict
        Scale factors, kernel sum, candidates used/rejected, template coverage, timings.
    science_sources : astropy Table or None
        The sources detected on the science image (x, y, psf_flux, ...) when gpudiff
        detected them itself (inputs without a DETECTED plane); the DIA detection uses
        them to flag residuals inside bright stars' halos (``bright_sources``).
    """

    difference: Exposure
    matched_template: Exposure
    matched_science: Exposure
    background_model: SpatialKernel | None
    psf_matching_kernel: SpatialKernel
    kernel_sources: Table
    mode: str
    kernel_fit: KernelFit
    metadata: dict = field(default_factory=dict)
    science_sources: Table | None = None


def psf_fwhm(exposure: Exposure, name: str, average: bool = True):
    """The PSF FWHM (trace radius, or per axis) at the average position, falling back to
    the mean over a 10×10 grid (docs/algorithms.md §1.2 ``_checkPsfWidths``)."""
    if exposure.psf is None:
        raise PsfError(
            f"the {name} exposure has no PSF; attach one or estimate it (gpudiff.estimate_psf)"
        )
    try:
        return exposure.psf.fwhm() if average else exposure.psf.fwhm_xy()
    except PsfError:
        log.warning(
            "Unable to evaluate the %s PSF at the average position; using the grid mean", name
        )
        f = evaluate_mean_fwhm(exposure.psf, exposure.bbox)
        return f if average else (f, f)


def choose_convolution_method(template: Exposure, science: Exposure) -> bool:
    """``auto`` mode (docs/algorithms.md §4.2 step 7): True = convolve the template.

    Convolve the science image only if the template PSF is strictly wider on **both**
    axes: convolveTemplate = (T_x ≤ S_x) OR (T_y ≤ S_y).
    """
    try:
        tx, ty = template.psf.fwhm_xy()
        sx, sy = science.psf.fwhm_xy()
        return (tx <= sx) or (ty <= sy)
    except PsfError:
        return psf_fwhm(template, "template") <= psf_fwhm(science, "science")


class AlardLuptonSubtractTask:
    """Subtract a template from a science exposure with Alard–Lupton PSF matching.

    Parameters
    ----------
    config : AlardLuptonSubtractConfig, optional
    backend : Backend or str, optional
    """

    def __init__(
        self, config: AlardLuptonSubtractConfig | None = None, backend: Backend | str | None = None
    ):
        self.config = AlardLuptonSubtractConfig() if config is None else config
        self.backend = resolve_backend(backend)

    # --- inputs ------------------------------------------------------------------------
    def _prepare(self, template: Exposure, science: Exposure) -> tuple[Exposure, Exposure, dict]:
        cfg, be = self.config, self.backend
        if not template.bbox.contains(science.bbox):
            raise ShapeMismatchError(
                f"the template box {template.bbox} must contain the science box {science.bbox}; "
                "warp the template onto the science pixel grid first (gpudiff.ops.warp_exposure)"
            )
        bands = [e.metadata.get("BAND", e.metadata.get("FILTER")) for e in (science, template)]
        if None not in bands and str(bands[0]).strip() != str(bands[1]).strip():
            raise InvalidInputError(
                f"science band {bands[0]!r} and template band {bands[1]!r} differ"
            )
        for name, exp in (("science", science), ("template", template)):
            if exp.psf is None:
                raise PsfError(
                    f"the {name} exposure has no PSF and gpudiff does not guess one "
                    "silently; attach one or call gpudiff.estimate_psf"
                )
        # Non-finite pixels are no data (LSST's convention); a usable pixel must have a
        # positive, finite variance, else every weight and S/N downstream is wrong.
        template = mask_non_finite(template.to_backend(be))
        science = mask_non_finite(science.to_backend(be))
        science.masked_image.validate("science", bad_planes=cfg.bad_mask_planes)
        try:
            template.masked_image.validate("template", bad_planes=cfg.bad_mask_planes)
        except AllMaskedError:
            pass  # no template data at all: LSST's NoWorkFound from the coverage check below
        meta: dict[str, Any] = {}
        # Defects are interpolated before anything looks at the pixels (detection, variance
        # scaling, kernel fit, convolution, decorrelation).  The template is filled before
        # update_masks clears its SAT/CR planes; its INTRP marks are restored after.
        if cfg.find_template_cosmic_rays:
            # Before the interpolation, which then fills the rays like the other defects.
            template = self._mask_cosmic_rays(template)
        template, t_filled = self._interpolate(template)
        science, _ = self._interpolate(science)
        cov = template_coverage(template, science)
        meta["template_coverage"] = cov
        if cov < cfg.required_template_fraction:
            raise NoWorkFound(
                f"template covers {cov:.1%} of the science image (pixels where neither image "
                f"is NO_DATA), less than required_template_fraction="
                f"{cfg.required_template_fraction:.0%}"
            )
        if cfg.do_scale_variance:
            # The two images are independent: on the CPU each gets a core.
            (template, tfac, _), (science, sfac, cat) = run_concurrently(
                lambda: self._scale_variance(template, need_catalog=False),
                lambda: self._scale_variance(science, need_catalog=True),
                parallel=not self.backend.is_gpu,
            )
            # Reused for kernel-source selection (one detection of the science, not two).
            meta["science_detections"] = cat
            meta["scale_template_variance_factor"] = tfac
            meta["scale_science_variance_factor"] = sfac
        template, science = update_masks(
            template, science, cfg.rename_template_mask, cfg.preserve_template_mask
        )
        if t_filled is not None:
            template = Exposure(
                template.masked_image.with_plane_set("INTRP", t_filled),
                template.psf,
                template.wcs,
                template.photo_calib,
                template.metadata,
            )
        if cfg.find_science_cosmic_rays:
            science = self._mask_cosmic_rays(science)
            if "CR" in cfg.interpolate_mask_planes:
                # Cosmic rays found just now: filled like the defects that came flagged.
                science, _ = self._interpolate(science, ("CR",))
        for name, exp in (("template", template), ("science", science)):
            intrp = exp.masked_image.mask_planes.bitmask_if_present("INTRP")
            meta[f"n_interpolated_{name}"] = (
                int(be.xp.count_nonzero(exp.masked_image.mask & intrp)) if intrp else 0
            )
        return template, science, meta

    def _interpolate(self, exp: Exposure, planes=None) -> tuple[Exposure, Any]:
        """``exp`` with its defects interpolated (``interpolate_mask_planes`` or ``planes``,
        plus non-finite pixels) and flagged INTRP, and the boolean array of the filled
        pixels (None when nothing was filled or interpolation is off)."""
        planes = self.config.interpolate_mask_planes if planes is None else tuple(planes)
        if not planes:
            return exp, None
        mi = exp.masked_image
        bad = defect_pixels(mi, planes)
        if not bool(bad.any()):
            return exp, None
        try:
            fwhm = float(exp.psf.fwhm())
        except PsfError:
            fwhm = 3.0  # only sets the smoothing scale of the large-blob fallback
        filled = interpolate_over_defects(mi, planes, fwhm=fwhm, backend=self.backend)
        return Exposure(filled, exp.psf, exp.wcs, exp.photo_calib, exp.metadata), bad

    def _mask_cosmic_rays(self, science: Exposure) -> Exposure:
        """Set the CR plane on the cosmic rays of an image (the science, or a
        single-exposure template) not flagged yet.

        LSST's calexps come with cosmic rays found (and interpolated) by
        calibrateImage; a plain FITS or a simulation does not, or not all of them.  Once the
        science is convolved (convolveScience) a cosmic ray is smeared into a PSF-like blob that no
        sharpness test can recognise, so they are found here, before any convolution,
        and the CR bits travel (dilated) into the difference.
        """
        mi = science.masked_image
        cr = find_cosmic_rays(mi, science.psf, backend=self.backend)
        cr_bit = mi.mask_planes.bitmask_if_present("CR")
        if cr_bit:
            # A CR plane that came with the image is kept and completed: a repair step that
            # found some rays (issue 14's raw pairs: half of them) leaves the rest, which
            # convolveScience would smear into PSF-like false sources.
            cr &= (mi.mask & cr_bit) == 0
        if not bool(cr.any()):
            return science
        return Exposure(
            mi.with_plane_set("CR", cr),
            science.psf,
            science.wcs,
            science.photo_calib,
            science.metadata,
        )

    def _scale_variance(
        self, exp: Exposure, need_catalog: bool
    ) -> tuple[Exposure, float, Table | None]:
        """ScaleVarianceTask's factor, applied to a copy of the exposure.

        LSST inputs carry DETECTED masks, which ScaleVariance ignores.  When an input has no
        DETECTED pixel at all (a plain FITS, a simulation) the sources would bias the
        factor upwards (measured +6 to +9 % on a crowded field), so gpudiff detects them at
        5σ for this estimate only (a documented departure: LSST would use the unmasked
        image as it comes).
        """
        mi = exp.masked_image
        probe, catalog = mi, None
        det_bit = mi.mask_planes.bitmask_if_present("DETECTED")
        if (not det_bit or not bool((mi.mask & det_bit).any())) and need_catalog:
            # The science's detections are reused for kernel-source selection.
            det = detect_sources(
                mi,
                exp.psf,
                threshold=self.config.detection_threshold,
                polarity="both",
                background="estimate",
                backend=self.backend,
            )
            probe = MaskedImage(
                mi.image,
                mi.variance,
                det.mask,
                xy0=mi.xy0,
                mask_planes=det.mask_planes,
                backend=self.backend,
            )
            catalog = det.catalog
        elif not det_bit or not bool((mi.mask & det_bit).any()):
            probe = _with_source_mask(mi, exp.psf)
        sv_config = ScaleVarianceConfig(max_samples=self.config.scale_variance_max_samples)
        factor = float(ScaleVarianceTask(sv_config, backend=self.backend).run(probe))
        scaled = MaskedImage(
            mi.image,
            mi.variance * np.float32(factor),
            mi.mask,
            xy0=mi.xy0,
            mask_planes=mi.mask_planes,
            backend=self.backend,
        )
        if catalog is not None and len(catalog):
            # Measured with the unscaled variance: put the errors on the scaled footing.
            root = float(np.sqrt(factor))
            catalog["psf_flux_err"] = np.asarray(catalog["psf_flux_err"]) * root
            catalog["snr"] = np.asarray(catalog["snr"]) / root
        return Exposure(scaled, exp.psf, exp.wcs, exp.photo_calib, exp.metadata), factor, catalog

    # --- sources -----------------------------------------------------------------------
    def select_sources(
        self,
        science: Exposure,
        template: Exposure,
        sources: Any,
        kernel_size: int,
        edge_buffer: int,
    ) -> Table:
        """Kernel sources (docs/algorithms.md §4.2 step 9): the selector, then the box and mask
        test.

        ``sources`` is a table with ``x``, ``y`` and ``psf_flux``/``psf_flux_err`` (or
        ``flux``/``flux_err``, or ``snr``) columns; ``None`` detects on the science image.
        """
        cfg = self.config
        if sources is None:
            det = detect_sources(
                science.masked_image,
                science.psf,
                threshold=cfg.detection_threshold,
                polarity="positive",
                background="estimate",
                backend=self.backend,
            )
            sources = det.catalog
        table = _flag_center_planes(_normalize_sources(sources), science.masked_image)
        table = reclassify_extended(table)  # PSF model vs the stars
        if cfg.template_source_snr_min is not None and len(table):
            table = self._flag_not_in_template(table, template)
        box = science.bbox
        if cfg.restrict_kernel_edge_sources:
            box = Box(
                box.x0 + edge_buffer,
                box.y0 + edge_buffer,
                box.x1 - edge_buffer,
                box.y1 - edge_buffer,
            )
        selected = select_kernel_sources(
            table,
            box,
            snr_min=cfg.source_snr_min,
            snr_max=cfg.source_snr_max,
            max_sources=None,
            edge_buffer=kernel_size,
            require_isolated="isolated" in table.colnames,
            require_unresolved="is_extended" in table.colnames,
            exclude_flags=[c for c in table.colnames if c.startswith("flag")],
        )
        if cfg.max_kernel_sources > 0 and len(selected) > cfg.max_kernel_sources:
            order = np.argsort(-np.asarray(selected["snr"]), kind="stable")
            selected = selected[np.sort(order[: cfg.max_kernel_sources])]
        if len(selected) < cfg.min_kernel_sources:
            removed = selection_counts(
                table,
                box,
                snr_min=cfg.source_snr_min,
                snr_max=cfg.source_snr_max,
                edge_buffer=kernel_size,
                exclude_flags=[c for c in table.colnames if c.startswith("flag")],
            )
            raise InsufficientKernelSourcesError(
                f"{len(selected)} kernel source(s) pass the selection (S/N {cfg.source_snr_min:g}–"
                f"{cfg.source_snr_max:g}, isolated, unresolved, inside the kernel-edge box) out of "
                f"{len(table)}; at least min_kernel_sources={cfg.min_kernel_sources} are needed; "
                f"removed "
                f"by each test: {removed}"
            )
        return selected

    def _flag_not_in_template(self, table: Table, template: Exposure) -> Table:
        """``table`` with ``template_snr`` and ``flag_not_in_template`` (S/N below
        ``template_source_snr_min``) for the rows in the selector's S/N range."""
        cfg = self.config
        snr = np.asarray(table["snr"], dtype=np.float64)
        rows = np.flatnonzero((snr >= cfg.source_snr_min) & (snr <= cfg.source_snr_max))
        tsnr = np.full(len(table), np.nan)
        tsnr[rows] = template_presence_snr(
            template.masked_image,
            template.psf.kernel_image(),
            np.asarray(table["x"], dtype=np.float64)[rows],
            np.asarray(table["y"], dtype=np.float64)[rows],
            psf_fwhm(template, "template"),
        )
        table = table.copy(copy_data=False)
        table["template_snr"] = tsnr
        flag = np.zeros(len(table), dtype=bool)
        flag[rows] = ~(tsnr[rows] >= cfg.template_source_snr_min)
        table["flag_not_in_template"] = flag
        return table

    # --- run ---------------------------------------------------------------------------
    def run(self, template: Exposure, science: Exposure, sources: Any = None) -> SubtractionResult:
        """Subtract ``template`` from ``science``.

        On a GPU that runs out of memory the whole subtraction is re-run on the NumPy
        backend with a :class:`~gpudiff.errors.GpudiffFallbackWarning`
        (:func:`~gpudiff.backend.fallback.with_memory_fallback`; the fit is global, so
        there is no banded retry); the result's exposures are then NumPy arrays.
        Non-finite image pixels of either input are treated as NO_DATA.

        Parameters
        ----------
        template : Exposure
            On the science pixel grid, covering at least the science box.
        science : Exposure
        sources : table, optional
            Kernel sources (see :meth:`select_sources`); detected on the science image
            when omitted.

        Raises
        ------
        NoWorkFound
            Template coverage below ``required_template_fraction`` (or below
            ``min_template_fraction_for_expected_success`` when the kernel fit fails).
        InsufficientKernelSourcesError, PsfError, ShapeMismatchError
        AllMaskedError
            Every science pixel is masked (NO_DATA, BAD, SAT, EDGE) or non-finite.
        InvalidVarianceError
            A usable pixel (none of ``bad_mask_planes``) has zero, negative or non-finite
            variance.
        DeviceMemoryError
            Out of memory on the GPU and on the CPU fallback.
        """
        return with_memory_fallback(
            f"{type(self).__name__}.run",
            lambda be: self._on(be)._run(template, science, sources),
            self.backend,
        )

    def _on(self, backend: Backend) -> "AlardLuptonSubtractTask":
        """This task, or a copy with the same config on ``backend``."""
        return self if backend is self.backend else type(self)(self.config, backend=backend)

    def _run(self, template: Exposure, science: Exposure, sources: Any = None) -> SubtractionResult:
        cfg = self.config
        t0 = time.perf_counter()
        template, science, meta = self._prepare(template, science)
        t_fwhm, s_fwhm = psf_fwhm(template, "template"), psf_fwhm(science, "science")
        if cfg.mode == "auto":
            conv_template = choose_convolution_method(template, science)
        else:
            conv_template = cfg.mode == "convolveTemplate"
        mode = "convolveTemplate" if conv_template else "convolveScience"
        meta["science_sharper_than_template"] = False
        if conv_template and not choose_convolution_method(template, science):
            # The template is strictly wider on both axes: matching it to the science
            # needs a deconvolution, which the kernel can only approximate (ringing,
            # amplified noise).  Not an error (LSST does it when told to), but said.
            meta["science_sharper_than_template"] = True
            log.warning(
                "the science PSF (FWHM %.2f px) is sharper than the template's (%.2f px) "
                "under convolveTemplate: the kernel must deconvolve; use mode='auto' or "
                "'convolveScience'",
                s_fwhm,
                t_fwhm,
            )
        matched_size = s_fwhm if conv_template else t_fwhm
        # Stamp size from the basis LSST would build (docs/algorithms.md §4.2 step 9.2).
        k_size = make_kernel_basis(cfg.make_kernel, t_fwhm, matched_size).size
        t1 = time.perf_counter()
        science_sources = meta.pop("science_detections", None)
        if sources is None:
            sources = science_sources
        sel = self.select_sources(science, template, sources, k_size, k_size)
        meta["time_source_selection"] = time.perf_counter() - t1
        tmpl_on_sci = template.subimage(science.bbox)
        conv, ref = (tmpl_on_sci, science) if conv_template else (science, tmpl_on_sci)
        fwhms = (t_fwhm, s_fwhm) if conv_template else (s_fwhm, t_fwhm)
        t1 = time.perf_counter()
        fit = self._fit(conv, ref, sel, fwhms, template, science)
        meta["time_kernel_fit"] = time.perf_counter() - t1
        kernel = fit.kernel
        t1 = time.perf_counter()
        be = self.backend
        if conv_template:
            matched = convolve_preserving(kernel, template.masked_image, cfg.preserve_mask_planes)
            matched = matched.subimage(science.bbox)
            matched_template = Exposure(
                matched, science.psf, science.wcs, science.photo_calib, template.metadata
            )
            matched_science = science
            minuend = science.masked_image
            diff = minuend.subtract(matched)
            psf = science.psf
        else:
            norm = kernel.kernel_sum()
            ms = convolve_preserving(kernel, science.masked_image, cfg.preserve_mask_planes)
            ms = MaskedImage(
                ms.image / np.float32(norm),
                ms.variance / np.float32(norm * norm),
                ms.mask,
                xy0=ms.xy0,
                mask_planes=ms.mask_planes,
                backend=be,
            )
            matched_science = Exposure(
                ms, template.psf, science.wcs, science.photo_calib, science.metadata
            )
            # K maps science to template flux units (ΣK = template/science flux ratio), so
            # the template is divided by ΣK too: D = (S⊗K − T)/ΣK is in science units, as in
            # the legacy ImagePsfMatchTask.  (LSST's subtractImages subtracts T as it is,
            # which is right only for ΣK ≈ 1, i.e. calibrated inputs; its decorrelation
            # formula, docs/algorithms.md §5.2, assumes D = (S⊗K − T)/ΣK.)
            t = tmpl_on_sci.masked_image
            t = MaskedImage(
                t.image / np.float32(norm),
                t.variance / np.float32(norm * norm),
                t.mask,
                xy0=t.xy0,
                mask_planes=t.mask_planes,
                backend=be,
            )
            matched_template = Exposure(
                t, template.psf, science.wcs, science.photo_calib, template.metadata
            )
            diff = ms.subtract(t)
            psf = template.psf
        if cfg.do_subtract_background:
            sign = 1.0 if conv_template else -1.0 / kernel.kernel_sum()
            bg = kernel.background_image(science.bbox, be) * np.float32(sign)
            diff = MaskedImage(
                diff.image - bg,
                diff.variance,
                diff.mask,
                xy0=diff.xy0,
                mask_planes=diff.mask_planes,
                backend=be,
            )
            diff, meta["residual_background_rms"] = residual_background(
                diff, psf, cfg.make_kernel.spatial_bg_order
            )
        diff = _no_data_nan(diff)
        meta["time_convolution"] = time.perf_counter() - t1
        # LSST returns the background with all parameters negated when the science was
        # convolved (docs/algorithms.md §4.2 step 13): it is then a model of template − science.
        background_model = (
            kernel
            if conv_template or kernel.background_coefficients is None
            else dataclasses.replace(
                kernel, background_coefficients=-kernel.background_coefficients
            )
        )
        difference = Exposure(diff, psf, science.wcs, science.photo_calib, science.metadata)
        if cfg.do_decorrelation:
            t1 = time.perf_counter()
            dec = DecorrelateALKernelTask(self._decorrelation_config(), backend=be).run(
                science, tmpl_on_sci, difference, kernel, template_matched=conv_template
            )
            difference = dec.corrected_exposure
            if dec.correction_kernel is not None:
                difference = Exposure(
                    difference.masked_image,
                    decorrelated_psf(psf, dec.correction_kernel),
                    difference.wcs,
                    difference.photo_calib,
                    difference.metadata,
                )
            meta["time_decorrelation"] = time.perf_counter() - t1
        meta.update(
            mode=mode,
            kernel_sum=kernel.kernel_sum(),
            n_kernel_sources=len(sel),
            n_candidates_used=fit.n_used,
            n_candidates_rejected=int((fit.candidate_table()["status"] == "BAD").sum()),
            template_fwhm=t_fwhm,
            science_fwhm=s_fwhm,
            time_total=time.perf_counter() - t0,
        )
        meta.update(fit.quality_metadata())  # spatial orders used, kernel-sum photometric check
        return SubtractionResult(
            difference=difference,
            matched_template=matched_template,
            matched_science=matched_science,
            background_model=background_model if cfg.do_subtract_background else None,
            psf_matching_kernel=kernel,
            kernel_sources=fit.candidate_table(),
            mode=mode,
            kernel_fit=fit,
            metadata=meta,
            science_sources=science_sources,
        )

    def _decorrelation_config(self) -> DecorrelateALKernelConfig:
        """Decorrelation that grows the defect planes by its filter's footprint (so that no
        unflagged pixel holds what the filter spread from a defect)."""
        # EDGE is left out: its pixels hold copied data, not defects, and the tasks size
        # their EDGE frames themselves (the preconvolution's frame was measured).
        planes = tuple(
            p
            for p in dict.fromkeys(
                (
                    *self.config.interpolate_mask_planes,
                    *self.config.bad_mask_planes,
                    "INTRP",
                    "SAT_TEMPLATE",
                )
            )
            if p != "EDGE"
        )
        return DecorrelateALKernelConfig(grow_mask_planes=planes)

    def _fit(
        self,
        conv: Exposure,
        ref: Exposure,
        sel: Table,
        fwhms,
        template: Exposure,
        science: Exposure,
    ) -> KernelFit:
        cfg = self.config
        basis = make_kernel_basis(cfg.make_kernel, *fwhms)
        try:
            cands = make_candidates(
                conv.masked_image,
                ref.masked_image,
                sel["x"],
                sel["y"],
                kernel_size=basis.size,
                bad_mask_planes=cfg.exclude_mask_planes,
                rating=sel["snr"],
                size_cell_x=cfg.make_kernel.size_cell_x,
                size_cell_y=cfg.make_kernel.size_cell_y,
            )
            return fit_spatial_kernel(cands, basis, cfg.make_kernel, ref.bbox, self.backend)
        except InsufficientKernelSourcesError:
            cov = template_coverage(template, science)
            if cov < cfg.min_template_fraction_for_expected_success:
                raise NoWorkFound(
                    f"the kernel fit failed and the template covers only {cov:.1%} of the science "
                    f"image (< {cfg.min_template_fraction_for_expected_success:.0%})"
                ) from None
            raise


def _with_source_mask(mi: MaskedImage, psf) -> MaskedImage:
    """``mi`` with DETECTED set on pixels more than 5σ from the median, grown by ~2 FWHM:
    a cheap source mask, enough for ScaleVariance (which only needs sources excluded)."""
    xp = mi.backend.xp
    finite = xp.isfinite(mi.image) & xp.isfinite(mi.variance) & (mi.variance > 0)
    med = xp.median(mi.image[finite]) if bool(finite.any()) else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        on = finite & (xp.abs(mi.image - med) > 5.0 * xp.sqrt(mi.variance))
    r = max(2, int(round(2 * psf.fwhm())))
    grown = mi.backend.ndimage.maximum_filter(on.astype(np.uint8), size=2 * r + 1) > 0
    return mi.with_plane_set("DETECTED", grown)


def residual_background(
    mi: MaskedImage, psf, order: int, bin_size: int = 64
) -> tuple[MaskedImage, float]:
    """``mi`` minus a polynomial (total degree ``order``) fitted to the clipped means of
    its source-free bins, and the rms of that polynomial over the image.

    A departure from LSST, part of ``do_subtract_background``: the kernel fit's background
    term is constrained only by the kernel stamps (a dozen on a 1024² field) and absorbs
    the parts of bright stars' wings the kernel cannot match, so it leaves a residual sky
    of a few hundredths of σ (measured −0.05σ in one quadrant of a 1024² raw pair).  The
    difference itself has every sky pixel: sources (> 5σ, grown by 2 FWHM) and defect
    planes are left out, each ``bin_size``² bin gives a 3σ-clipped mean, and the
    polynomial is weighted by the usable pixels of each bin.
    """
    from ..ops.background import BACKGROUND_BAD_PLANES, bin_background
    from ..errors import AllMaskedError

    xp = mi.backend.xp
    probe = _with_source_mask(mi, psf)
    try:
        bins = bin_background(probe, bin_size, bad_planes=BACKGROUND_BAD_PLANES)
    except AllMaskedError:
        return mi, 0.0
    ok = bins.good & np.isfinite(bins.raw)
    n_terms = (order + 1) * (order + 2) // 2
    if int(ok.sum()) < 2 * n_terms:
        return mi, 0.0
    H, W = mi.shape
    yc, xc = np.meshgrid(bins.y_centres, bins.x_centres, indexing="ij")

    def design(u, v):
        return [u**i * v**j for i in range(order + 1) for j in range(order + 1 - i)]

    def norm(c, n):
        return (c - 0.5 * (n - 1)) / max(0.5 * (n - 1), 1.0)

    a = np.stack([t.ravel() for t in design(norm(xc[ok], W), norm(yc[ok], H))], axis=1)
    w = np.sqrt(bins.n_valid[ok].astype(np.float64))
    coef, *_ = np.linalg.lstsq(a * w[:, None], bins.raw[ok] * w, rcond=None)
    u = xp.asarray(norm(np.arange(W, dtype=np.float64), W))[None, :]
    v = xp.asarray(norm(np.arange(H, dtype=np.float64), H))[:, None]
    model = sum(float(c) * t for c, t in zip(coef, design(u, v)))
    model = xp.broadcast_to(xp.asarray(model, dtype=np.float64), (H, W))
    rms = float(xp.sqrt(xp.mean(model * model)))
    out = MaskedImage(
        (mi.image - model).astype(np.float32),
        mi.variance,
        mi.mask,
        xy0=mi.xy0,
        mask_planes=mi.mask_planes,
        backend=mi.backend,
    )
    return out, rms


def _no_data_nan(mi: MaskedImage) -> MaskedImage:
    """NO_DATA pixels as NaN image / +inf variance (the convention of
    :func:`~gpudiff.tasks.masks.mask_non_finite`): the inputs' NO_DATA pixels were
    interpolated so that no convolution spreads garbage, but a difference there is no
    measurement."""
    xp = mi.backend.xp
    nd = mi.mask_planes.bitmask_if_present("NO_DATA")
    if not nd:
        return mi
    bad = (mi.mask & nd) != 0
    if not bool(bad.any()):
        return mi
    return MaskedImage(
        xp.where(bad, xp.float32(np.nan), mi.image),
        xp.where(bad, xp.float32(np.inf), mi.variance),
        mi.mask,
        xy0=mi.xy0,
        mask_planes=mi.mask_planes,
        backend=mi.backend,
    )


def decorrelated_psf(psf, correction_kernel: np.ndarray):
    """The PSF of the decorrelated difference: PSF ⊗ correction filter, unit sum.

    Departure from current LSST (docs/algorithms.md §5.4, where the update is disabled pending
    DM-47461): decorrelation sharpens point sources, and PSF photometry with the
    undecorrelated PSF then overestimates fluxes (measured +13 % for equal template and
    science depths).  The filter is real and even, so correlating with it is convolving.
    A spatially varying :class:`~gpudiff.image.GridPsf` stays one (each node filtered);
    any other model becomes an :class:`~gpudiff.image.ImagePsf` at its average position.
    """
    h = correction_kernel.shape[0] // 2

    def filt(img):
        new = np.asarray(
            correlate(
                np.pad(np.asarray(img, np.float64), h), correction_kernel, "numpy", dtype=np.float64
            )
        )
        return new / new.sum()

    if isinstance(psf, GridPsf):
        imgs = np.array([[filt(im) for im in row] for row in psf.images])
        return GridPsf(imgs, psf.xs, psf.ys)
    return ImagePsf(filt(psf.kernel_image()), average_position=psf.average_position)


#: Planes whose bit within 1 px of a source's centre excludes it from the kernel sources.
#: A departure from LSST (its production selector does not test pixel flags): LSST's
#: sources are measured on calexps whose cosmic rays were found and interpolated before
#: detection, so none of them is a ray; gpudiff detects before it finds the rays.
_CENTER_FLAG_PLANES = {"flag_cr_center": "CR"}


def _flag_center_planes(table: Table, mi: MaskedImage) -> Table:
    """``table`` with a boolean ``flag_cr_center`` column: a CR bit in the 3×3 pixels
    around the source's centre in ``mi`` (added only when absent and ``mi`` has a CR plane).

    The science detections are made before the cosmic rays are found, and a ray that was
    not flagged on input is detected as a compact source of S/N 50–100.  Its pixels are
    interpolated before the fit, so its stamp holds no source (a kernel-sum outlier at best),
    and a few such rays below the stars' size once dragged the stellar locus of
    :func:`~gpudiff.psfmatch.candidates.reclassify_extended` to 0.61 × the PSF's trace:
    every star was judged extended and the kernel sum came out 0.71 for a true 1.00
    (issue 14, 2048² raw pairs).  Flagged rows are dropped by the selector (every
    ``flag*`` column) and left out of the stellar locus.
    """
    planes = {
        c: p
        for c, p in _CENTER_FLAG_PLANES.items()
        if c not in table.colnames and mi.mask_planes.bitmask_if_present((p,))
    }
    if not planes or len(table) == 0:
        return table
    mask = mi.backend.asnumpy(mi.mask)
    h, w = mask.shape
    with np.errstate(invalid="ignore"):
        xi = np.rint(np.asarray(table["x"], float) - mi.xy0[0])
        yi = np.rint(np.asarray(table["y"], float) - mi.xy0[1])
    ok = np.isfinite(xi) & np.isfinite(yi)
    xi = np.where(ok, xi, 0).astype(np.int64)
    yi = np.where(ok, yi, 0).astype(np.int64)
    out = table.copy(copy_data=False)
    for col, plane in planes.items():
        bit = mi.mask_planes.bitmask_if_present((plane,))
        hit = np.zeros(len(table), dtype=bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = yi + dy, xi + dx
                inside = ok & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
                v = np.zeros(len(table), dtype=mask.dtype)
                v[inside] = mask[yy[inside], xx[inside]]
                hit |= (v & bit) != 0
        out[col] = hit
    return out


def _normalize_sources(sources: Any) -> Table:
    """A Table with x, y and snr from any supported source table."""
    t = Table(sources) if not isinstance(sources, Table) else sources.copy(copy_data=False)
    for c in ("x", "y"):
        if c not in t.colnames:
            raise InvalidInputError(
                f"kernel source table has no {c!r} column (columns: {t.colnames})"
            )
    if "n_peaks" in t.colnames:
        # LSST's doIsolated means "not blended" (parent == 0 and no deblended children):
        # a footprint with a single peak.  Neighbours inside a stamp are in both images
        # and are matched by the kernel like the star itself.
        t["isolated"] = np.asarray(t["n_peaks"]) == 1
    if "snr" not in t.colnames:
        for f, e in (
            ("psf_flux", "psf_flux_err"),
            ("flux", "flux_err"),
            ("inst_flux", "inst_flux_err"),
        ):
            if f in t.colnames and e in t.colnames:
                with np.errstate(divide="ignore", invalid="ignore"):
                    t["snr"] = np.asarray(t[f], float) / np.asarray(t[e], float)
                break
        else:
            raise InvalidInputError(
                "kernel source table needs an 'snr' column or flux and flux-error "
                "columns (psf_flux/psf_flux_err or flux/flux_err)"
            )
    if "psf_flux" not in t.colnames or "psf_flux_err" not in t.colnames:
        # The selector ranks and cuts on S/N only; give it flux columns that carry it.
        t["psf_flux"], t["psf_flux_err"] = np.asarray(t["snr"], dtype=float), np.ones(len(t))
    return t
