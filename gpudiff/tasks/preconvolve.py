"""AlardLuptonPreconvolveSubtractTask: the score image for maximum-likelihood detection
(docs/algorithms.md §4.3).

The science image is first correlated with its own PSF (a matched filter); the template is
then PSF-matched to that preconvolved image and subtracted.  After decorrelation in
"preconvolution mode" (docs/algorithms.md §5.3) the result is a score image whose pixels are the
likelihood-ratio statistic of a point source there; its variance plane makes
``score / sqrt(variance)`` the detection S/N.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from ..configfield import option
from ..errors import InsufficientKernelSourcesError, InvalidInputError, PsfError
from ..image import Box, Exposure, MaskedImage
from ..ops.convolution import convolve_masked_image
from ..psfmatch import make_kernel_basis
from ..psfmatch.fit import KernelFit
from ..psfmatch.spatial import SpatialKernel
from .decorrelate import DecorrelateALKernelTask
from .masks import convolve_preserving
from .subtract import AlardLuptonSubtractConfig, AlardLuptonSubtractTask
from .subtract_finalize import no_data_nan, residual_background
from .subtract_inputs import psf_fwhm

__all__ = [
    "AlardLuptonPreconvolveSubtractConfig",
    "PreconvolveResult",
    "AlardLuptonPreconvolveSubtractTask",
    "preconvolution_kernel",
]


@dataclass(frozen=True)
class AlardLuptonPreconvolveSubtractConfig(AlardLuptonSubtractConfig):
    """As :class:`AlardLuptonSubtractConfig`; the ``interpolate_mask_planes`` of both inputs
    are interpolated (:func:`gpudiff.ops.interpolate_over_defects`) before the
    preconvolution and the matching convolution, where LSST fills ``bad_mask_planes`` with
    the image median (docs/algorithms.md §4.2 step 11), a fill that leaves a step at every defect's
    edge which the two convolutions turn into ±stripes.  The fitted background is subtracted from
    the score image (``do_subtract_background``, True by default here, see
    :class:`AlardLuptonSubtractConfig`).  ``compute_difference``: also
    return the plain difference, on which DetectAndMeasureScoreTask measures (as LSST)."""

    compute_difference: bool = option(
        True,
        doc="Also return the plain difference, on which DetectAndMeasureScoreTask measures "
        "(as LSST).",
        gpudiff_only=True,
    )


@dataclass
class PreconvolveResult:
    """LSST's output ``Struct``: score_exposure and friends (docs/algorithms.md §4.3 step 11)."""

    score_exposure: Exposure
    matched_template: Exposure
    matched_science: Exposure
    background_model: SpatialKernel
    psf_matching_kernel: SpatialKernel
    kernel_sources: object
    kernel_fit: KernelFit
    metadata: dict = field(default_factory=dict)
    difference: Exposure | None = None
    #: Sources detected on the science image (see ``SubtractionResult.science_sources``).
    science_sources: object = None


def decorrelation_reach(correction_kernel: np.ndarray, fraction: float = 0.01) -> int:
    """Half-width (pixels, Chebyshev) of the decorrelation filter where
    |c| ≥ ``fraction`` × its peak: how far it carries a pixel's value."""
    a = np.abs(np.asarray(correction_kernel, dtype=np.float64))
    ys, xs = np.nonzero(a >= fraction * a.max())
    cy, cx = (a.shape[0] - 1) // 2, (a.shape[1] - 1) // 2
    return int(max(np.abs(ys - cy).max(), np.abs(xs - cx).max()))


def preconvolution_kernel(exposure: Exposure) -> np.ndarray:
    """P̃: the PSF at its average position, unit sum, **reflected** (docs/algorithms.md §4.3 step
    2), so that afw "convolution" (a correlation) with it is a convolution with the PSF."""
    k = np.asarray(exposure.psf.kernel_image(), dtype=np.float64)
    if k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
        raise PsfError(f"the preconvolution kernel must have odd dimensions, got {k.shape}")
    return (k / k.sum())[::-1, ::-1].copy()


class AlardLuptonPreconvolveSubtractTask(AlardLuptonSubtractTask):
    """The score image of a science exposure against a template (docs/algorithms.md §4.3)."""

    def __init__(self, config: AlardLuptonPreconvolveSubtractConfig | None = None, backend=None):
        super().__init__(config or AlardLuptonPreconvolveSubtractConfig(), backend)

    def run(self, template: Exposure, science: Exposure, sources=None) -> PreconvolveResult:  # type: ignore[override]
        """The preconvolved score image; see the module docstring.  Out of GPU memory it
        is re-run on the CPU, as :meth:`AlardLuptonSubtractTask.run`."""
        return super().run(template, science, sources)  # type: ignore[return-value]

    def _run(self, template: Exposure, science: Exposure, sources=None) -> PreconvolveResult:  # type: ignore[override]
        cfg, be = self.config, self.backend
        t0 = time.perf_counter()
        plain = (
            AlardLuptonSubtractTask._run(self, template, science, sources).difference
            if cfg.compute_difference
            else None
        )
        prepared = self._prepare(template, science)
        template, science, meta = prepared.template, prepared.science, prepared.metadata
        pk = preconvolution_kernel(science)
        half = pk.shape[0] // 2
        # _prepare interpolated the defects of both inputs (flagged INTRP, original planes
        # kept); the preconvolution grows those planes by the PSF's footprint.
        ms = convolve_masked_image(science.masked_image, pk, do_copy_edge=True)
        matched_science = Exposure(
            ms, science.psf, science.wcs, science.photo_calib, science.metadata
        )
        t_fwhm = psf_fwhm(template, "template")
        s_fwhm = psf_fwhm(science, "science")
        matched_size = math.sqrt(2.0) * s_fwhm
        k_size = make_kernel_basis(cfg.make_kernel, t_fwhm, matched_size).size
        # Sources are detected and measured on the science image itself (LSST passes a catalog
        # measured there); the preconvolved image is broader than its PSF attribute.
        science_sources = prepared.science_sources
        if sources is None:
            sources = science_sources
        try:
            sel = self.select_sources(science, template, sources, k_size, 2 * k_size)
        except InsufficientKernelSourcesError:
            # LSST keeps kernel sources 3 kernel sizes from the edge in preconvolution mode;
            # on a small cutout (DECam 256², kSize 35) that leaves none.  The stamps only
            # need kSize inside the PSF-trimmed box the fit uses (issue 14).
            logging.getLogger(__name__).warning(
                "no kernel sources 3 kernel sizes from the edge; using %d px", k_size + half
            )
            sel = self.select_sources(science, template, sources, k_size, half)
        box = science.bbox
        inner = Box(box.x0 + half, box.y0 + half, box.x1 - half, box.y1 - half)
        if inner.width <= 0 or inner.height <= 0:
            raise InvalidInputError(
                f"the PSF ({pk.shape}) is larger than the science image {science.shape}"
            )
        t_inner = template.subimage(inner)
        s_inner = matched_science.subimage(inner)
        fit = self._fit(t_inner, s_inner, sel, (t_fwhm, matched_size), template, science)
        kernel = fit.kernel
        mt = convolve_preserving(kernel, template.masked_image, cfg.preserve_mask_planes).subimage(
            box
        )
        matched_template = Exposure(
            mt, science.psf, science.wcs, science.photo_calib, template.metadata
        )
        # The fit modelled the preconvolved science as K⊗T + B, so S' − K⊗T − B is free of
        # the differential background (the same sign as convolveTemplate).
        bg = kernel.background_image(box, be) if cfg.do_subtract_background else None
        score = ms.subtract(mt, bg)
        if cfg.do_subtract_background:
            score, meta["residual_background_rms"] = residual_background(
                score, science.psf, cfg.make_kernel.spatial_bg_order
            )
        score = no_data_nan(score)
        score_exp = Exposure(score, science.psf, science.wcs, science.photo_calib, science.metadata)
        if cfg.do_decorrelation:
            dec = DecorrelateALKernelTask(self._decorrelation_config(), backend=be).run(
                science,
                template.subimage(box),
                score_exp,
                kernel,
                template_matched=True,
                pre_conv_mode=True,
                pre_conv_kernel=pk,
            )
            out = dec.corrected_exposure.masked_image
        else:
            out = score
        # EDGE outside the region where the matched filter saw the whole PSF (step 10) and
        # the matched template its whole kernel (both copy their unconvolved edge), grown
        # by the decorrelation filter's reach (its pixels at ≥ 1 % of its peak): the filter
        # carries the copied edge that far inwards, where it made false 5σ detections
        # (measured: all false detections of a 1024² test lay 16–17 px from the border
        # with a 16-px PSF half-width).  A departure from LSST's PSF-half-width frame.  The
        # frame was the PSF's *plus* the kernel's half-width (35–40 px on a realistic
        # 2048² pair, ~7 % of the image): 5 of its S/N ≥ 8 injections lay in it.
        xp = be.xp
        edge = out.mask_planes.bitmask("EDGE")
        frame = xp.ones(out.shape, dtype=bool)
        w = max(half, kernel.shape[0] // 2) + (
            decorrelation_reach(dec.correction_kernel) if cfg.do_decorrelation else 0
        )
        frame[w : out.shape[0] - w, w : out.shape[1] - w] = False
        out = MaskedImage(
            out.image,
            out.variance,
            xp.where(frame, out.mask | edge, out.mask),
            xy0=out.xy0,
            mask_planes=out.mask_planes,
            backend=be,
        )
        score_exp = Exposure(out, science.psf, science.wcs, science.photo_calib, science.metadata)
        meta.update(
            mode="convolveTemplate",
            score_edge_width=int(w),
            kernel_sum=kernel.kernel_sum(),
            n_kernel_sources=len(sel),
            n_candidates_used=fit.n_used,
            template_fwhm=t_fwhm,
            science_fwhm=s_fwhm,
            time_total=time.perf_counter() - t0,
        )
        meta.update(fit.quality_metadata())  # spatial orders used, kernel-sum photometric check
        return PreconvolveResult(
            score_exposure=score_exp,
            matched_template=matched_template,
            matched_science=matched_science,
            background_model=kernel,
            psf_matching_kernel=kernel,
            kernel_sources=fit.candidate_table(),
            kernel_fit=fit,
            metadata=meta,
            difference=plain,
            science_sources=science_sources,
        )
