"""AlardLuptonSubtractTask: difference an exposure against a template
(docs/algorithms.md §4.1–§4.2).

The order of operations follows LSST's ``subtractImages.py``: validate, template coverage,
variance scaling, mask updates, PSF sizes, the choice of which image to convolve, kernel
source selection, the kernel fit, the convolution, the subtraction in the **science**
exposure's flux units, and decorrelation.  Tasks never touch files.

The seams are LSST's: the inputs are prepared (:mod:`~gpudiff.tasks.subtract_inputs`), the
kernel sources selected (:mod:`~gpudiff.tasks.subtract_sources`) and the kernel fitted,
then :meth:`AlardLuptonSubtractTask.run_convolve_template` or
:meth:`~AlardLuptonSubtractTask.run_convolve_science` matches one image to the other and
subtracts, and :meth:`~AlardLuptonSubtractTask.finalize` removes the backgrounds, blanks
NO_DATA and decorrelates (:mod:`~gpudiff.tasks.subtract_finalize`).
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
from ..errors import (
    InsufficientKernelSourcesError,
    NoWorkFound,
)
from ..image import Exposure, MaskedImage
from ..psfmatch import fit_spatial_kernel, make_candidates, make_kernel_basis
from ..psfmatch.fit import KernelFit
from ..psfmatch.spatial import SpatialKernel
from .decorrelate import DecorrelateALKernelConfig, DecorrelateALKernelTask
from .masks import convolve_preserving, template_coverage
from .subtract_config import AlardLuptonSubtractConfig
from .subtract_finalize import (
    ConvolutionResult,
    FinalizedDifference,
    decorrelated_psf,
    decorrelation_config,
    no_data_nan,
    residual_background,
)
from .subtract_inputs import PreparedInputs, choose_convolution_method, prepare_inputs, psf_fwhm

# Re-exported: importable from here as before the split (tests/test_kernel_sum.py).
from .subtract_sources import _flag_center_planes as _flag_center_planes
from .subtract_sources import select_sources

__all__ = [
    "AlardLuptonSubtractConfig",
    "SubtractionResult",
    "AlardLuptonSubtractTask",
    "ConvolutionResult",
    "FinalizedDifference",
    "PreparedInputs",
    "choose_convolution_method",
    "decorrelated_psf",
    "psf_fwhm",
    "residual_background",
]

log = logging.getLogger("gpudiff.tasks.subtract")


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
    def _prepare(self, template: Exposure, science: Exposure) -> PreparedInputs:
        """The validated, conditioned pair and the science detections made on the way
        (:func:`~gpudiff.tasks.subtract_inputs.prepare_inputs`)."""
        return prepare_inputs(template, science, self.config, self.backend)

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
        See :func:`gpudiff.tasks.subtract_sources.select_sources`.
        """
        return select_sources(
            science, template, sources, kernel_size, edge_buffer, self.config, self.backend
        )

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
        prepared = self._prepare(template, science)
        template, science, meta = prepared.template, prepared.science, prepared.metadata
        t_fwhm, s_fwhm = psf_fwhm(template, "template"), psf_fwhm(science, "science")
        if cfg.mode == "auto":
            conv_template = choose_convolution_method(template, science)
        else:
            conv_template = cfg.mode == "convolveTemplate"
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
        if sources is None:
            sources = prepared.science_sources
        sel = self.select_sources(science, template, sources, k_size, k_size)
        meta["time_source_selection"] = time.perf_counter() - t1
        tmpl_on_sci = template.subimage(science.bbox)
        conv, ref = (tmpl_on_sci, science) if conv_template else (science, tmpl_on_sci)
        fwhms = (t_fwhm, s_fwhm) if conv_template else (s_fwhm, t_fwhm)
        t1 = time.perf_counter()
        fit = self._fit(conv, ref, sel, fwhms, template, science)
        meta["time_kernel_fit"] = time.perf_counter() - t1
        kernel = fit.kernel
        if conv_template:
            convolved = self.run_convolve_template(template, science, kernel)
        else:
            convolved = self.run_convolve_science(template, science, kernel)
        final = self.finalize(template, science, convolved, kernel)
        meta.update(final.metadata)
        meta.update(
            mode=convolved.mode,
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
            difference=final.difference,
            matched_template=convolved.matched_template,
            matched_science=convolved.matched_science,
            background_model=final.background_model,
            psf_matching_kernel=kernel,
            kernel_sources=fit.candidate_table(),
            mode=convolved.mode,
            kernel_fit=fit,
            metadata=meta,
            science_sources=prepared.science_sources,
        )

    # --- the two convolution modes and the finish (LSST's runConvolveTemplate,
    # runConvolveScience and finalize) --------------------------------------------------
    def run_convolve_template(
        self, template: Exposure, science: Exposure, kernel: SpatialKernel
    ) -> ConvolutionResult:
        """Convolve the template with the matching kernel and subtract it from the science
        (docs/algorithms.md §4.2 steps 11–12, ``runConvolveTemplate``).

        Parameters
        ----------
        template, science : Exposure
            The prepared pair (:meth:`_prepare`); the template's box contains the science's
            (its border feeds the convolution).
        kernel : SpatialKernel
            Fitted to map the template onto the science.

        Returns
        -------
        ConvolutionResult
            ``difference`` = S − K⊗T; the matched template carries the science's PSF and
            the template's metadata; the matched science is ``science``.
        """
        t0 = time.perf_counter()
        matched = convolve_preserving(
            kernel, template.masked_image, self.config.preserve_mask_planes
        )
        matched = matched.subimage(science.bbox)
        matched_template = Exposure(
            matched, science.psf, science.wcs, science.photo_calib, template.metadata
        )
        diff = science.masked_image.subtract(matched)
        return ConvolutionResult(
            diff,
            matched_template,
            science,
            science.psf,
            "convolveTemplate",
            time.perf_counter() - t0,
        )

    def run_convolve_science(
        self, template: Exposure, science: Exposure, kernel: SpatialKernel
    ) -> ConvolutionResult:
        """Convolve the science with the matching kernel and subtract the template
        (docs/algorithms.md §4.2 steps 11–12, ``runConvolveScience``).

        Parameters
        ----------
        template, science : Exposure
            The prepared pair (:meth:`_prepare`).
        kernel : SpatialKernel
            Fitted to map the science onto the template.

        Returns
        -------
        ConvolutionResult
            ``difference`` = (K⊗S − T)/ΣK, in the science's flux units; both matched
            images are divided by ΣK and carry the template's PSF.
        """
        t0 = time.perf_counter()
        norm = kernel.kernel_sum()
        ms = convolve_preserving(
            kernel, science.masked_image, self.config.preserve_mask_planes
        ).divided_by(norm)
        matched_science = Exposure(
            ms, template.psf, science.wcs, science.photo_calib, science.metadata
        )
        # K maps science to template flux units (ΣK = template/science flux ratio), so
        # the template is divided by ΣK too: D = (S⊗K − T)/ΣK is in science units, as in
        # the legacy ImagePsfMatchTask.  (LSST's subtractImages subtracts T as it is,
        # which is right only for ΣK ≈ 1, i.e. calibrated inputs; its decorrelation
        # formula, docs/algorithms.md §5.2, assumes D = (S⊗K − T)/ΣK.)
        t = template.subimage(science.bbox).masked_image.divided_by(norm)
        matched_template = Exposure(
            t, template.psf, science.wcs, science.photo_calib, template.metadata
        )
        return ConvolutionResult(
            ms.subtract(t),
            matched_template,
            matched_science,
            template.psf,
            "convolveScience",
            time.perf_counter() - t0,
        )

    def finalize(
        self,
        template: Exposure,
        science: Exposure,
        convolved: ConvolutionResult,
        kernel: SpatialKernel,
    ) -> FinalizedDifference:
        """The difference as returned: backgrounds out, NO_DATA blank, decorrelated
        (LSST's ``finalize``, with gpudiff's background steps before it).

        Parameters
        ----------
        template, science : Exposure
            The prepared pair (:meth:`_prepare`).
        convolved : ConvolutionResult
            From :meth:`run_convolve_template` or :meth:`run_convolve_science`.
        kernel : SpatialKernel
            The matching kernel, with its fitted background.

        Returns
        -------
        FinalizedDifference
        """
        cfg, be = self.config, self.backend
        conv_template = convolved.mode == "convolveTemplate"
        meta: dict[str, Any] = {}
        t0 = time.perf_counter()
        diff, psf = convolved.difference, convolved.psf
        if cfg.do_subtract_background:
            # The fit models the reference as K⊗conv + B.  convolveTemplate: S − K⊗T
            # holds +B.  convolveScience: (K⊗S − T)/ΣK holds −B/ΣK.
            sign = 1.0 if conv_template else -1.0 / kernel.kernel_sum()
            bg = kernel.background_image(science.bbox, be) * np.float32(sign)
            # The convolution's difference is this method's own: a new image plane and the
            # others held as they are (no copies).
            diff = MaskedImage._adopt(
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
        diff = no_data_nan(diff)
        # As before the seams were cut: the convolution stage's time includes the
        # background steps (bench/bench_subtract.py reports it so).
        meta["time_convolution"] = convolved.seconds + (time.perf_counter() - t0)
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
                science,
                template.subimage(science.bbox),
                difference,
                kernel,
                template_matched=conv_template,
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
        return FinalizedDifference(
            difference, background_model if cfg.do_subtract_background else None, meta
        )

    def _decorrelation_config(self) -> DecorrelateALKernelConfig:
        """The decorrelation's config
        (:func:`~gpudiff.tasks.subtract_finalize.decorrelation_config`)."""
        return decorrelation_config(self.config)

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
