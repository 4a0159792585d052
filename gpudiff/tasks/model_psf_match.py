"""ModelPsfMatchTask: match an exposure's PSF to a reference PSF *model* (docs/algorithms.md §7).

This is the step that makes PSF-matched warps for coadds.  Instead of stars, the kernel
candidates are the two PSF models themselves, realized on a grid of cells over the
exposure: the exposure's PSF is the image to convolve ("template") and the reference PSF
the target ("science"), so the fitted kernel K satisfies PSF_exposure ⊗ K ≈ PSF_reference
everywhere.  Clipping is off (the stamps are noiseless), the kernel sum is forced to the
requested value, and the exposure is convolved with per-pixel normalization, so its flux
scale is unchanged whatever the kernel sum.  The task takes images in memory and never
touches files.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from astropy.table import Table

from ..backend import Backend, resolve_backend
from ..backend.fallback import with_memory_fallback
from ..configfield import option, validate_config
from ..errors import (
    InvalidInputError,
)
from ..image import (
    Box,
    Exposure,
    MaskedImage,
    Psf,
)
from ..image.psf import FWHM_PER_SIGMA
from ..ops.convolution import kernel_centre, process_in_row_bands
from ..ops.stats import adaptive_moments_batch
from ..psfmatch.candidates import KernelCandidates
from ..psfmatch.config import PsfMatchConfig
from ..psfmatch.fit import KernelFit, fit_spatial_kernel
from ..psfmatch.solve import good_region, valid_correlate
from ..psfmatch.spatial import SpatialKernel
from .model_psf_grid import (
    CellGrid,
    CellSet,
    build_cell_set,
    cell_grid,
    next_odd_integer,
    resized_psf,
)

__all__ = [
    "CellGrid",
    "CellSet",
    "FittedKernel",
    "ModelPsfMatchConfig",
    "ModelPsfMatchResult",
    "ModelPsfMatchTask",
    "model_psf_match_kernel_config",
    "next_odd_integer",
    "resized_psf",
]

log = logging.getLogger("gpudiff.tasks.model_psf_match")

#: Relative tolerance below which a reference is "narrower" than the exposure's PSF (so
#: that identical models, realized identically, never warn).
_NARROWER_RTOL = 1e-3
#: Cells per axis whose PSF widths are measured for that check.
_WIDTH_GRID = 12


def model_psf_match_kernel_config(**overrides: Any) -> PsfMatchConfig:
    """LSST ``ModelPsfMatchConfig.setDefaults`` applied to the AL ``PsfMatchConfig``
    (docs/algorithms.md §7).

    No clipping or condition check (noiseless PSF stamps: residual statistics mean
    nothing), constant variance weighting, no FWHM scaling: the basis is the configured
    (0.7, 1.5, 3.0) px Gaussians of degrees (4, 2, 2) on a ``kernel_size`` (21) px kernel.
    """
    base = dict(
        single_kernel_clipping=False,
        kernel_sum_clipping=False,
        spatial_kernel_clipping=False,
        check_condition_number=False,
        constant_variance_weighting=True,
        scale_by_fwhm=False,
    )
    base.update(overrides)
    return PsfMatchConfig(**base)


@dataclass(frozen=True)
class ModelPsfMatchConfig:
    """Configuration of :class:`ModelPsfMatchTask` (LSST ``ModelPsfMatchConfig``, docs/algorithms.md
    §7).

    Attributes
    ----------
    kernel : PsfMatchConfig
        The kernel fit, Alard–Lupton only; default :func:`model_psf_match_kernel_config`
        (spatial order 2, 128 px cells, no background, no clipping, no FWHM scaling).
    do_auto_pad_psf : bool
        Pad the PSF images to at least ``kernel_size · auto_pad_psf_to`` (next odd
        integer) so the kernel fits in them with room for a good region.
    auto_pad_psf_to : float
        In [1.0, 2.0] (LSST range); default 1.4.
    pad_psf_by : int
        Even number of pixels added to the PSF images when ``do_auto_pad_psf`` is off.
    """

    kernel: PsfMatchConfig = option(
        doc="The kernel fit, Alard-Lupton only (no clipping, no FWHM scaling, spatial order 2).",
        lsst="kernel.active",
        default_factory=model_psf_match_kernel_config,
    )
    do_auto_pad_psf: bool = option(
        True,
        doc="Pad the PSF images to at least kernel_size x auto_pad_psf_to (next odd "
        "integer) so the kernel fits in them with room for a good region.",
    )
    auto_pad_psf_to: float = option(
        1.4,
        doc="Minimum PSF image size as a multiple of the kernel size (do_auto_pad_psf).",
        min=1.0,
        max=2.0,
    )
    pad_psf_by: int = option(
        0,
        doc="Even number of pixels added to the PSF images when do_auto_pad_psf is off.",
        min=0,
    )

    def __post_init__(self):
        validate_config(self)
        if self.kernel.kernel_basis_set != "alard-lupton":
            # LSST's kernel ConfigChoiceField offers AL only; forcing the kernel sum relies
            # on ΣB_0 = 1 and ΣB_i = 0 (docs/algorithms.md §1.3).
            raise InvalidInputError("ModelPsfMatchConfig.kernel must use the 'alard-lupton' basis")


@dataclass(frozen=True)
class FittedKernel:
    """What :meth:`ModelPsfMatchTask.fit_kernel` returns.

    Attributes
    ----------
    fit : KernelFit
        The fit as solved (its kernel with the fitted sum).
    kernel : SpatialKernel
        The fitted kernel with its sum forced to the requested value.
    """

    fit: KernelFit
    kernel: SpatialKernel


@dataclass
class ModelPsfMatchResult:
    """What :meth:`ModelPsfMatchTask.run` returns (LSST ``Struct`` fields, snake_case).

    Attributes
    ----------
    psf_matched_exposure : Exposure
        The exposure convolved with K (normalized per pixel), on the task's backend, with
        the (resized) reference PSF attached and the WCS, calibration and metadata kept.
    psf_matching_kernel : SpatialKernel
        K(x, y) with its sum forced to ``kernel_sum``.
    kernel_cell_set : KernelCandidates
        One candidate per cell: positions, cells, PSF stamps, final status.
    kernel_fit : KernelFit
        The fit (iterations, condition number, per-candidate figures).
    metadata : dict
        Sizes, padding, grid, FWHMs, kernel sums, condition number, and the relative
        residual of PSF_exposure ⊗ K/ΣK against the reference (max and median over cells).
    """

    psf_matched_exposure: Exposure
    psf_matching_kernel: SpatialKernel
    kernel_cell_set: KernelCandidates
    kernel_fit: KernelFit
    metadata: dict

    @property
    def candidates(self) -> Table:
        """One row per cell: position, status, single-kernel figures."""
        return self.kernel_fit.candidate_table()


class ModelPsfMatchTask:
    """Convolve an exposure so that its PSF becomes a given reference PSF model.

    Parameters
    ----------
    config : ModelPsfMatchConfig, optional
    backend : Backend or str, optional
        Where the fit and the convolution run; the exposure is moved there.

    Notes
    -----
    When the reference is narrower than the exposure's PSF anywhere on the grid the
    least-squares fit still runs, as in LSST (docs/algorithms.md §7): the kernel has to sharpen,
    which the Gaussian-times-polynomial basis does only approximately (negative lobes), so the
    output PSF only approximates the reference and its noise is amplified.  LSST is silent about it;
    this task issues a ``UserWarning``.  Typical use:
    ``ModelPsfMatchTask().run(exposure, GaussianPsf(fwhm=5.0)).psf_matched_exposure``.
    """

    def __init__(
        self, config: ModelPsfMatchConfig | None = None, backend: Backend | str | None = None
    ):
        self.config = ModelPsfMatchConfig() if config is None else config
        if not isinstance(self.config, ModelPsfMatchConfig):
            raise InvalidInputError(
                f"config must be a ModelPsfMatchConfig, got {type(self.config).__name__}"
            )
        self.backend = resolve_backend(backend)

    def cell_grid(self, bbox: Box) -> CellGrid:
        """The region (bbox grown by one cell on each side) and the cell centres
        (docs/algorithms.md §7.2; :func:`~gpudiff.tasks.model_psf_grid.cell_grid`).

        Returns
        -------
        CellGrid
        """
        return cell_grid(self.config.kernel, bbox)

    def run(
        self, exposure: Exposure, reference_psf: Psf, kernel_sum: float = 1.0
    ) -> ModelPsfMatchResult:
        """PSF-match ``exposure`` to ``reference_psf`` (docs/algorithms.md §7).

        Parameters
        ----------
        exposure : Exposure
            Must carry a PSF (any gpudiff model, spatially varying ones included).
        reference_psf : Psf
            The PSF to match to (Gaussian, double Gaussian, Moffat, image or grid).
        kernel_sum : float
            Sum forced on the returned kernel.  The convolution is normalized per pixel,
            so it does not change the output image (as in LSST).

        Returns
        -------
        ModelPsfMatchResult

        Raises
        ------
        PsfError
            The exposure has no PSF, or a PSF cannot be realized on the grid.
        KernelTooLargeError
            The kernel does not fit in the (padded) PSF images, or in the image.
        InsufficientKernelSourcesError
            Fewer cells than spatial terms (an exposure under one cell, at spatial order 2).
        InvalidInputError
            Bad arguments, or an odd ``pad_psf_by`` without auto-padding.
        DeviceMemoryError
            Out of memory on the GPU, in row bands and on the CPU fallback.

        Notes
        -----
        Out of GPU memory, the convolution is retried in row bands, and the whole task
        then re-run on the NumPy backend with a
        :class:`~gpudiff.errors.GpudiffFallbackWarning`
        (:func:`~gpudiff.backend.fallback.with_memory_fallback`).
        """
        return with_memory_fallback(
            f"{type(self).__name__}.run",
            lambda be: self._on(be)._run(exposure, reference_psf, kernel_sum),
            self.backend,
        )

    def _on(self, backend: Backend) -> "ModelPsfMatchTask":
        """This task, or a copy with the same config on ``backend``."""
        return self if backend is self.backend else type(self)(self.config, backend=backend)

    def _run(
        self, exposure: Exposure, reference_psf: Psf, kernel_sum: float
    ) -> ModelPsfMatchResult:
        kernel_sum = float(kernel_sum)
        if not (math.isfinite(kernel_sum) and kernel_sum != 0.0):
            raise InvalidInputError(f"kernel_sum must be finite and non-zero, got {kernel_sum}")
        cell_set = self.build_cell_set(exposure, reference_psf)
        cands = cell_set.candidates
        widths = self._check_widths(cell_set)
        fitted = self.fit_kernel(cell_set, kernel_sum)
        fit, kernel = fitted.fit, fitted.kernel
        cy, cx = kernel_centre(kernel.shape)
        matched = with_memory_fallback(
            f"{type(self).__name__}.apply_kernel",
            lambda be: self._on(be).apply_kernel(exposure, kernel),
            self.backend,
            banded=lambda be, n: process_in_row_bands(
                exposure.masked_image.to_backend(be),
                lambda band: kernel.convolve(band, do_normalize=True),
                n,
                (cy, kernel.shape[0] - 1 - cy),
            ),
        )
        out = Exposure(
            matched,
            psf=cell_set.reference_psf,
            wcs=copy.deepcopy(exposure.wcs),
            photo_calib=exposure.photo_calib,
            metadata=exposure.metadata,
        )
        fitted_sum = fit.kernel.kernel_sum()
        resid = _relative_residuals(self.backend, cands, kernel, 1.0 / kernel_sum)
        basis = cell_set.basis
        meta = dict(
            kernel_size=basis.size,
            basis_sigmas=basis.sigmas,
            basis_degrees=basis.degrees,
            spatial_kernel_order=self.config.kernel.spatial_kernel_order,
            psf_native_size=cell_set.native_size,
            psf_size=cell_set.psf_size,
            psf_padding=cell_set.padding,
            n_cells_x=cell_set.n_cells_x,
            n_cells_y=cell_set.n_cells_y,
            n_candidates=fit.n_used,
            n_iterations=fit.n_iterations,
            spatial_condition_number=fit.spatial_condition,
            fitted_kernel_sum=fitted_sum,
            kernel_sum=kernel.kernel_sum(),
            science_fwhm=cell_set.science_fwhm,
            reference_fwhm=cell_set.reference_fwhm,
            **widths,
            residual_max=float(np.max(resid)),
            residual_median=float(np.median(resid)),
        )
        log.info(
            "ModelPsfMatch: %dx%d cells, %d-px kernel in %d-px PSF images (pad %d), fitted kernel "
            "sum %.5g, relative residual max %.3g",
            cell_set.n_cells_x,
            cell_set.n_cells_y,
            basis.size,
            cell_set.psf_size,
            cell_set.padding,
            fitted_sum,
            meta["residual_max"],
        )
        return ModelPsfMatchResult(
            psf_matched_exposure=out,
            psf_matching_kernel=kernel,
            kernel_cell_set=cands,
            kernel_fit=fit,
            metadata=meta,
        )

    # --- the three steps of run(), public for benchmarks and diagnostics --------------------
    def build_cell_set(self, exposure: Exposure, reference_psf: Psf) -> CellSet:
        """Realize both PSFs on the cell grid and make one candidate per cell (docs/algorithms.md
        §7.2–§7.8; :func:`~gpudiff.tasks.model_psf_grid.build_cell_set`)."""
        return build_cell_set(self.config, self.backend, exposure, reference_psf)

    def fit_kernel(self, cell_set: CellSet, kernel_sum: float = 1.0) -> FittedKernel:
        """Solve K(x, y) without clipping and force its sum (docs/algorithms.md §7.9–§7.10).

        Returns
        -------
        FittedKernel
        """
        with warnings.catch_warnings():
            # Noiseless, smooth PSF stamps leave some AL bases unconstrained, so the spatial
            # system is routinely (near-)singular; the pseudo-inverse then gives the
            # minimum-norm kernel, which is what LSST uses too (it only logs this).  The
            # condition number goes into the metadata instead of a warning on every run.
            warnings.filterwarnings(
                "ignore",
                message="spatial kernel system is ill-conditioned",
                category=RuntimeWarning,
            )
            fit = fit_spatial_kernel(
                cell_set.candidates,
                cell_set.basis,
                self.config.kernel,
                cell_set.region,
                self.backend,
            )
        coeffs = np.array(fit.kernel.coefficients, dtype=np.float64, copy=True)
        # B_0 sums to 1 and every other basis to 0, so this sets ΣK everywhere.
        coeffs[0, 0] = float(kernel_sum)
        return FittedKernel(fit, replace(fit.kernel, coefficients=coeffs))

    def apply_kernel(self, exposure: Exposure, kernel: SpatialKernel) -> MaskedImage:
        """Convolve the exposure's pixels with K normalized per pixel (docs/algorithms.md §7.11)."""
        mi = exposure.masked_image
        mi = mi.to_backend(self.backend) if mi.backend.name != self.backend.name else mi
        return kernel.convolve(mi, do_normalize=True)

    def _check_widths(self, cell_set: CellSet) -> dict:
        """Determinant-radius FWHMs of the realized stamps; warn where the reference is narrower.

        PSF widths vary smoothly, so a sub-grid of at most 12×12 cells (edges included)
        is measured: adaptive moments of every cell of a 4096² exposure would cost more
        than the whole fit.
        """
        be, xp = self.backend, self.backend.xp
        cands, ncx, ncy = cell_set.candidates, cell_set.n_cells_x, cell_set.n_cells_y
        ix = np.unique(np.round(np.linspace(0, ncx - 1, min(ncx, _WIDTH_GRID))).astype(int))
        iy = np.unique(np.round(np.linspace(0, ncy - 1, min(ncy, _WIDTH_GRID))).astype(int))
        sel = xp.asarray((iy[:, None] * ncx + ix[None, :]).ravel())  # candidates are row-major
        n = int(sel.size)
        stamps = xp.concatenate([cands.template[sel], cands.science[sel]])
        _, _, ixx, iyy, ixy, ok = adaptive_moments_batch(
            be, stamps, xp.ones(stamps.shape, dtype=bool), 4.0
        )
        det = be.asnumpy(ixx * iyy - ixy * ixy)
        ok = be.asnumpy(ok) & (det > 0)
        fw = FWHM_PER_SIGMA * np.where(ok, np.abs(det), np.nan) ** 0.25
        f_sci, f_ref = fw[:n], fw[n:]
        narrower = np.isfinite(f_sci) & np.isfinite(f_ref) & (f_ref < f_sci * (1 - _NARROWER_RTOL))

        with warnings.catch_warnings():  # all-NaN slices (moments failed everywhere) give NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            out = dict(
                science_fwhm_min=float(np.nanmin(f_sci)),
                science_fwhm_max=float(np.nanmax(f_sci)),
                reference_fwhm_grid=float(np.nanmedian(f_ref)),
                n_cells_checked=n,
                n_cells_narrower=int(narrower.sum()),
            )
        if narrower.any():
            warnings.warn(
                f"the reference PSF (FWHM {np.nanmin(f_ref[narrower]):.3g} px) is narrower than "
                "the exposure's "
                f"PSF (FWHM up to {np.nanmax(f_sci[narrower]):.3g} px) in {int(narrower.sum())} of "
                f"{n} cells "
                "checked: the kernel must sharpen (a deconvolution-like fit), so the output PSF "
                "only "
                "approximates the reference and the noise is amplified",
                UserWarning,
                stacklevel=3,
            )
        return out


def _relative_residuals(
    be: Backend, cands: KernelCandidates, kernel: SpatialKernel, scale: float
) -> np.ndarray:
    """‖PSF_ref − PSF_exp ⊗ scale·K(x_c, y_c)‖₂ / ‖PSF_ref‖₂ over each cell's good region.

    With scale = 1/ΣK this is the kernel the normalized convolution applies, so it says
    how far the output PSF is from the reference PSF attached to the output.
    """
    xp = be.xp
    kimg = np.stack([kernel.kernel_image(xc, yc) for xc, yc in zip(cands.x, cands.y)]) * scale
    conv = valid_correlate(be, cands.template, be.asarray(kimg, dtype=np.float64), per_stamp=True)
    target = good_region(cands.science, kimg.shape[1:])
    d = target - conv.reshape(target.shape)
    return be.asnumpy(xp.sqrt((d * d).sum(axis=1) / (target * target).sum(axis=1)))
