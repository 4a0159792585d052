"""ImagePsfMatchTask: match one image's PSF to another's with a spatially varying kernel.

LSST's legacy ``ImagePsfMatchTask`` (docs/algorithms.md §8; removed from ip_diffim main but
the engine of the modern subtraction).  The task takes images already in memory and never touches
files; the CLI and batch layers do I/O.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.table import Table

from ..backend import Backend, resolve_backend
from ..configfield import option, validate_config
from ..errors import InsufficientKernelSourcesError, InvalidInputError, PsfError, ShapeMismatchError
from ..image import Exposure, MaskedImage, estimate_psf
from ..ops.detection import detect_sources
from ..ops.warp import check_overlap, warp_exposure, wcs_equal
from ..psfmatch.basis import KernelBasis, make_kernel_basis
from ..psfmatch.candidates import KernelCandidates, make_candidates, reclassify_extended
from ..psfmatch.config import PsfMatchConfig
from ..psfmatch.fit import KernelFit, fit_spatial_kernel
from ..psfmatch.spatial import SpatialKernel

__all__ = ["ImagePsfMatchConfig", "ImagePsfMatchResult", "ImagePsfMatchTask", "sources_from_table"]

log = logging.getLogger("gpudiff.tasks.image_psf_match")


@dataclass(frozen=True)
class ImagePsfMatchConfig:
    """Configuration of :class:`ImagePsfMatchTask` (docs/algorithms.md §1.1, §2.1, §8).

    Attributes
    ----------
    kernel : PsfMatchConfig
        The kernel-fit configuration (LSST ``kernel.active``), AL by default.
    det_threshold : float
        Detection threshold (σ of the PSF-smoothed image) for kernel sources when no
        candidate list is given (legacy ``detThreshold`` = 10).
    bad_mask_planes : tuple of str
        Mask planes that exclude a candidate stamp (legacy ``badMaskPlanes``).
    warping_kernel : str
        Resampling kernel for ``match_exposures`` when the WCSs differ.
    interp_length : int
        Spacing (px) of exact WCS evaluations when warping (afw ``interpLength``).
    """

    kernel: PsfMatchConfig = option(
        doc="The kernel-fit configuration (Alard-Lupton by default).",
        lsst="kernel.active",
        default_factory=PsfMatchConfig,
    )
    det_threshold: float = option(
        10.0,
        doc="Detection threshold (sigma of the PSF-smoothed image) of the kernel sources "
        "found when no candidate list is given.",
        min=3,
        lsst="kernel.active.detectionConfig.detThreshold",
    )
    bad_mask_planes: tuple[str, ...] = option(
        ("NO_DATA", "EDGE", "SAT"),
        doc="Mask planes that exclude a kernel-candidate stamp.",
        lsst="kernel.active.detectionConfig.badMaskPlanes",
    )
    warping_kernel: str = option(
        "lanczos3",
        doc="Resampling kernel of match_exposures when the two WCSs differ.",
        lsst="warpingConfig.warpingKernelName",
    )
    interp_length: int = option(
        10,
        doc="Spacing in pixels of the exact WCS evaluations when warping (<= 1: every pixel).",
        lsst="warpingConfig.interpLength",
    )

    def __post_init__(self):
        validate_config(self)


@dataclass
class ImagePsfMatchResult:
    """What :class:`ImagePsfMatchTask` returns (LSST ``Struct`` field names, snake_case).

    Attributes
    ----------
    matched_image : MaskedImage
        The convolved image (template ⊗ K, or science ⊗ K when convolving the science).
    psf_matching_kernel : SpatialKernel
    background_model : SpatialKernel background (callable via ``psf_matching_kernel``)
        and its image on the matched image's box.
    kernel_fit : KernelFit
        Candidates used and rejected (with reasons), iterations, condition number.
    difference : MaskedImage or None
        Set by the ``subtract_*`` methods.
    matched_exposure, warped_exposure : Exposure or None
        Set by the exposure methods.
    """

    matched_image: MaskedImage
    psf_matching_kernel: SpatialKernel
    background_model: Any
    kernel_fit: KernelFit
    difference: MaskedImage | None = None
    matched_exposure: Exposure | None = None
    warped_exposure: Exposure | None = None
    subtracted_exposure: Exposure | None = None

    @property
    def candidates(self) -> Table:
        """The kernel candidates (used and rejected, with reasons)."""
        return self.kernel_fit.candidate_table()


def sources_from_table(table: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """(x, y, rating or None, keep) from a source table with ``x``, ``y`` and optional
    ``flux`` (used as the rating) and boolean ``flag*`` columns (flagged rows dropped)."""
    if isinstance(table, Table):
        cols = table.colnames
        get = table.__getitem__
    elif isinstance(table, dict):
        cols = list(table)
        get = table.__getitem__
    elif isinstance(table, np.ndarray) and table.dtype.names:
        cols = list(table.dtype.names)
        get = table.__getitem__
    else:
        raise InvalidInputError(
            f"kernel sources must be a Table, dict or record array, got {type(table).__name__}"
        )
    for c in ("x", "y"):
        if c not in cols:
            raise InvalidInputError(f"kernel source table has no {c!r} column (columns: {cols})")
    x = np.asarray(get("x"), dtype=np.float64)
    y = np.asarray(get("y"), dtype=np.float64)
    flux = None
    for name in ("flux", "psf_flux", "inst_flux"):
        if name in cols:
            flux = np.asarray(get(name), dtype=np.float64)
            break
    keep = np.ones(x.size, dtype=bool)
    for c in cols:
        if c.lower().startswith("flag"):
            col = np.asarray(get(c))
            if col.dtype == bool:
                keep &= ~col
    return x, y, flux, keep


class ImagePsfMatchTask:
    """Solve and apply a spatially varying PSF-matching kernel between two images.

    Parameters
    ----------
    config : ImagePsfMatchConfig, optional
    backend : Backend or str, optional
        Where the work runs; images on another backend are moved there.

    Examples
    --------
    >>> task = ImagePsfMatchTask()                                   # doctest: +SKIP
    >>> res = task.subtract_exposures(template, science)             # doctest: +SKIP
    >>> res.difference, res.psf_matching_kernel.kernel_sum()         # doctest: +SKIP
    """

    def __init__(
        self, config: ImagePsfMatchConfig | None = None, backend: Backend | str | None = None
    ):
        self.config = ImagePsfMatchConfig() if config is None else config
        self.backend = resolve_backend(backend)

    # --- sources and candidates --------------------------------------------------------
    def get_select_sources(self, exposure: Exposure) -> Table:
        """Detect kernel sources: background fit and subtraction, PSF-smoothed detection
        at ``det_threshold``, measurement (docs/algorithms.md §8 ``getSelectSources``).
        Sources that are flagged (edge, masked, saturated, extended, not isolated) are dropped."""
        mi = exposure.masked_image.to_backend(self.backend)
        psf = exposure.psf if exposure.psf is not None else estimate_psf(exposure)
        det = detect_sources(
            mi,
            psf,
            threshold=self.config.det_threshold,
            polarity="positive",
            background="estimate",
            backend=self.backend,
        )
        # A PSF model that disagrees with the image's stars (a WebbPSF model on a drizzled
        # mosaic) would mark every star extended: judge against the stars instead.
        cat = reclassify_extended(det.catalog)
        keep = np.ones(len(cat), dtype=bool)
        for name in ("flag_edge", "flag_masked", "flag_saturated", "is_extended"):
            if name in cat.colnames:
                keep &= ~np.asarray(cat[name], dtype=bool)
        if "isolated" in cat.colnames:
            keep &= np.asarray(cat["isolated"], dtype=bool)
        out = cat[keep]
        if "psf_flux" in out.colnames and "flux" not in out.colnames:
            out["flux"] = out["psf_flux"]
        return out

    def make_candidate_list(
        self, template: MaskedImage, science: MaskedImage, kernel_size: int, candidate_list: Any
    ) -> KernelCandidates:
        """Kernel candidates from a source list (docs/algorithms.md §2.1): (2·kernel_size+1)²
        stamps."""
        x, y, flux, keep = sources_from_table(candidate_list)
        if not keep.any():
            raise InsufficientKernelSourcesError("every source in the candidate list is flagged")
        kc = self.config.kernel
        cands = make_candidates(
            template,
            science,
            x[keep],
            y[keep],
            kernel_size=kernel_size,
            bad_mask_planes=self.config.bad_mask_planes,
            rating=None if flux is None else flux[keep],
            size_cell_x=kc.size_cell_x,
            size_cell_y=kc.size_cell_y,
        )
        # Report indices in the caller's table, flagged rows included.
        orig = np.flatnonzero(keep)
        cands.source_index = orig[cands.source_index]
        cands.rejected = [(int(orig[i]), r) for i, r in cands.rejected] + [
            (int(i), "flagged in the source table") for i in np.flatnonzero(~keep)
        ]
        return cands

    # --- masked images -----------------------------------------------------------------
    def _basis(self, target_fwhm, reference_fwhm) -> KernelBasis:
        return make_kernel_basis(self.config.kernel, target_fwhm, reference_fwhm)

    def match_masked_images(
        self,
        template: MaskedImage,
        science: MaskedImage,
        candidate_list: Any,
        template_fwhm: float | None = None,
        science_fwhm: float | None = None,
    ) -> ImagePsfMatchResult:
        """Convolve ``template`` so its PSF matches ``science``'s (docs/algorithms.md §8).

        Parameters
        ----------
        template, science : MaskedImage
            Same box.  The template is the image convolved.
        candidate_list : table
            Kernel sources (``x``, ``y`` parent coordinates, optional ``flux``, ``flag*``).
        template_fwhm, science_fwhm : float, optional
            PSF FWHMs (px) that scale the AL basis; ``None`` uses the configured widths.
        """
        be = self.backend
        if template.shape != science.shape or template.xy0 != science.xy0:
            raise ShapeMismatchError(
                f"template {template.shape} at {template.xy0} and science {science.shape} at "
                f"{science.xy0} must cover the same pixels"
            )
        template = template.to_backend(be) if template.backend.name != be.name else template
        science = science.to_backend(be) if science.backend.name != be.name else science
        basis = self._basis(template_fwhm, science_fwhm)
        if 2 * basis.size + 1 > min(template.shape):
            raise InvalidInputError(
                f"the {basis.size}-px kernel needs stamps of {2 * basis.size + 1} px, larger "
                f"than the image {template.shape}"
            )
        cands = self.make_candidate_list(template, science, basis.size, candidate_list)
        fit = fit_spatial_kernel(cands, basis, self.config.kernel, template.bbox, be)
        matched = fit.kernel.convolve(template)
        bg = fit.kernel.background_image(template.bbox, be)
        return ImagePsfMatchResult(
            matched_image=matched,
            psf_matching_kernel=fit.kernel,
            background_model=bg,
            kernel_fit=fit,
        )

    def subtract_masked_images(
        self,
        template: MaskedImage,
        science: MaskedImage,
        candidate_list: Any,
        template_fwhm: float | None = None,
        science_fwhm: float | None = None,
    ) -> ImagePsfMatchResult:
        """D = S − (T ⊗ K) − bg(x, y) (docs/algorithms.md §8 ``subtractMaskedImages``).

        The variance is var_S + var_T ⊗ K²; the mask is the OR of the science mask and the
        dilated template mask.
        """
        res = self.match_masked_images(
            template, science, candidate_list, template_fwhm, science_fwhm
        )
        sci = (
            science.to_backend(self.backend)
            if science.backend.name != self.backend.name
            else science
        )
        res.difference = sci.subtract(res.matched_image, res.background_model)
        return res

    # --- exposures ---------------------------------------------------------------------
    def _align(
        self, template: Exposure, science: Exposure, do_warping: bool
    ) -> tuple[Exposure, Exposure | None]:
        """The template on the science pixel grid (docs/algorithms.md §8 step 1)."""
        if template.wcs is None or science.wcs is None:
            if template.bbox != science.bbox:
                raise ShapeMismatchError(
                    f"template box {template.bbox} and science box {science.bbox} differ and "
                    "at least one exposure has no WCS to warp with"
                )
            return template, None
        check_overlap(
            template.wcs,
            template.bbox,
            science.wcs,
            science.bbox,
            name_a="template",
            name_b="science",
        )
        if template.bbox == science.bbox and wcs_equal(
            template.wcs, template.bbox, science.wcs, science.bbox
        ):
            return template, None
        if not do_warping:
            raise InvalidInputError("template and science WCSs differ and do_warping is False")
        warped = warp_exposure(
            template,
            science.wcs,
            science.bbox,
            kernel=self.config.warping_kernel,
            interp_length=self.config.interp_length,
            name="template",
            dest_name="science",
            backend=self.backend,
        )
        return warped, warped

    @staticmethod
    def _fwhm(exposure: Exposure, name: str) -> float:
        if exposure.psf is None:
            raise PsfError(f"the {name} exposure has no PSF; attach one or give its FWHM")
        return exposure.psf.fwhm()

    def match_exposures(
        self,
        template: Exposure,
        science: Exposure,
        template_fwhm: float | None = None,
        science_fwhm: float | None = None,
        candidate_list: Any = None,
        do_warping: bool = True,
        convolve_template: bool = True,
    ) -> ImagePsfMatchResult:
        """Warp the template onto the science grid if needed, then PSF-match
        (docs/algorithms.md §8).

        With ``convolve_template`` the template is convolved to the science PSF; otherwise
        the science is convolved to the template PSF.  With no ``candidate_list``, sources
        are detected on the image that is not convolved.
        """
        aligned, warped = self._align(template, science, do_warping)
        t_fwhm = template_fwhm if template_fwhm is not None else self._fwhm(template, "template")
        s_fwhm = science_fwhm if science_fwhm is not None else self._fwhm(science, "science")
        if convolve_template:
            conv, ref, fwhms = aligned, science, (t_fwhm, s_fwhm)
        else:
            conv, ref, fwhms = science, aligned, (s_fwhm, t_fwhm)
        if candidate_list is None:
            candidate_list = self.get_select_sources(ref)
        res = self.match_masked_images(conv.masked_image, ref.masked_image, candidate_list, *fwhms)
        res.warped_exposure = warped
        res.matched_exposure = Exposure(
            res.matched_image,
            psf=ref.psf,
            wcs=science.wcs,
            photo_calib=science.photo_calib,
            metadata=conv.metadata,
        )
        return res

    def subtract_exposures(
        self,
        template: Exposure,
        science: Exposure,
        template_fwhm: float | None = None,
        science_fwhm: float | None = None,
        candidate_list: Any = None,
        do_warping: bool = True,
        convolve_template: bool = True,
    ) -> ImagePsfMatchResult:
        """The difference exposure, in the science exposure's flux units (docs/algorithms.md §8).

        convolveTemplate: D = S − T ⊗ K − bg.  Otherwise D = −(T − S ⊗ K − bg)/ΣK, so that
        the difference stays in science units; ΣK is the kernel sum at the centre of the
        image (constant for AL, whereas legacy LSST evaluated it at the origin).
        """
        res = self.match_exposures(
            template,
            science,
            template_fwhm,
            science_fwhm,
            candidate_list,
            do_warping,
            convolve_template,
        )
        be = self.backend
        if convolve_template:
            sci = science.masked_image.to_backend(be)
            diff = sci.subtract(res.matched_image, res.background_model)
            psf = science.psf
        else:
            tmpl = (res.warped_exposure or template).masked_image.to_backend(be)
            d = tmpl.subtract(res.matched_image, res.background_model)
            ksum = res.psf_matching_kernel.kernel_sum()
            diff = d.divided_by(-ksum)  # D = (S⊗K − T)/ΣK
            psf = (res.warped_exposure or template).psf
        res.difference = diff
        res.subtracted_exposure = Exposure(
            diff,
            psf=psf,
            wcs=science.wcs,
            photo_calib=science.photo_calib,
            metadata=science.metadata,
        )
        return res
