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
    InsufficientKernelSourcesError,
    InvalidInputError,
    KernelTooLargeError,
    PsfError,
)
from ..image import (
    Box,
    DoubleGaussianPsf,
    Exposure,
    GaussianPsf,
    GridPsf,
    ImagePsf,
    MaskedImage,
    MoffatPsf,
    Psf,
)
from ..image.psf import FWHM_PER_SIGMA
from ..ops.convolution import kernel_centre, process_in_row_bands
from ..ops.stats import adaptive_moments_batch
from ..psfmatch.basis import KernelBasis, make_kernel_basis
from ..psfmatch.candidates import KernelCandidates, cell_index
from ..psfmatch.config import PsfMatchConfig
from ..psfmatch.fit import KernelFit, fit_spatial_kernel
from ..psfmatch.solve import good_region, valid_correlate
from ..psfmatch.spatial import SpatialKernel

__all__ = [
    "CellSet",
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


@dataclass
class CellSet:
    """The realized PSF grid (LSST ``_buildCellSet``): candidates, basis and sizes."""

    candidates: KernelCandidates
    basis: KernelBasis
    region: Box
    reference_psf: Psf
    native_size: int
    psf_size: int
    padding: int
    n_cells_x: int
    n_cells_y: int
    science_fwhm: float | None
    reference_fwhm: float | None


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


def next_odd_integer(x: float) -> int:
    """LSST ``nextOddInteger``: ceil(x), plus one if even."""
    n = int(math.ceil(x))
    return n + 1 if n % 2 == 0 else n


def _centred(img: np.ndarray, size: int) -> np.ndarray:
    """Crop or zero-pad the last two axes of an odd-square stack to odd ``size``, centred.

    Every gpudiff PSF image is an odd square, so the centres line up exactly.
    """
    n = img.shape[-1]
    if n >= size:
        c = (n - size) // 2
        return img[..., c : c + size, c : c + size]
    out = np.zeros(img.shape[:-2] + (size, size), dtype=img.dtype)
    c = (size - n) // 2
    out[..., c : c + n, c : c + n] = img
    return out


def resized_psf(psf: Psf, size: int) -> Psf:
    """LSST ``Psf.resized``: the same model with ``size``² kernel images.

    Analytic models are rebuilt with the new size (so they keep their parameters);
    pixelized ones are centre-cropped or zero-padded and renormalized.  A model of
    another type becomes a constant :class:`ImagePsf` of its image at its average
    position (LSST's fallback: the image zero-padded or clipped with centring).
    """
    size = int(size)
    if psf.size == size:
        return psf
    pos = psf.average_position
    t = type(psf)
    if t is GaussianPsf:
        return GaussianPsf(
            sigma=psf.sigma,
            sigma_y=psf.sigma_y,
            theta=psf.theta,
            size=size,
            oversample=psf.oversample,
            average_position=pos,
        )
    if t is DoubleGaussianPsf:
        return DoubleGaussianPsf(
            psf.sigma1,
            psf.sigma2,
            psf.b,
            size=size,
            oversample=psf.oversample,
            average_position=pos,
        )
    if t is MoffatPsf:
        return MoffatPsf(
            psf.profile_fwhm,
            beta=psf.beta,
            size=size,
            oversample=psf.oversample,
            average_position=pos,
        )
    if t is ImagePsf:
        return ImagePsf(_centred(psf.image, size), average_position=pos)
    if t is GridPsf:
        return GridPsf(_centred(psf.images, size), psf.xs, psf.ys)
    log.info("resizing a %s by centring its image at %s into %d px", t.__name__, pos, size)
    return ImagePsf(_centred(psf.kernel_image(*pos), size), average_position=pos)


def _realize(psf: Psf, xs: np.ndarray, ys: np.ndarray, what: str) -> list[np.ndarray]:
    """Kernel images of ``psf`` at every grid point (row-major: y outer, x inner)."""
    try:
        if type(psf) in (
            GaussianPsf,
            DoubleGaussianPsf,
            MoffatPsf,
            ImagePsf,
        ):  # position-independent
            img = psf.kernel_image(float(xs[0]), float(ys[0]))
            return [img] * (xs.size * ys.size)
        # a loop over the ~10x10 cells, not over pixels: each call is one small image
        return [psf.kernel_image(float(x), float(y)) for y in ys for x in xs]
    except PsfError as exc:
        raise PsfError(f"cannot realize the {what} PSF on the cell grid: {exc}") from exc


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

    def cell_grid(self, bbox: Box) -> tuple[Box, np.ndarray, np.ndarray]:
        """The region (bbox grown by one cell on each side) and the cell centres (docs/algorithms.md
        §7.2)."""
        kc = self.config.kernel
        sx, sy = int(kc.size_cell_x), int(kc.size_cell_y)
        region = Box(bbox.x0 - sx, bbox.y0 - sy, bbox.x1 + sx, bbox.y1 + sy)
        ncx, ncy = region.width // sx, region.height // sy  # >= 2: the region is grown by a cell
        xs = sx * np.arange(ncx) + sx // 2 + region.x0
        ys = sy * np.arange(ncy) + sy // 2 + region.y0
        return region, xs.astype(np.float64), ys.astype(np.float64)

    def _psf_size(self, native: int, kernel_size: int) -> tuple[int, int]:
        """(padded PSF size, padding) per docs/algorithms.md §7.4–§7.5; raises
        KernelTooLargeError."""
        cfg = self.config
        if cfg.do_auto_pad_psf:
            pad = max(0, next_odd_integer(kernel_size * cfg.auto_pad_psf_to) - native)
        else:
            if cfg.pad_psf_by % 2:
                raise InvalidInputError(
                    f"pad_psf_by ({cfg.pad_psf_by} pixels) must be an even number"
                )
            pad = int(cfg.pad_psf_by)
        size = native + pad
        max_kernel = size - 1 if (size - 1) % 2 else size - 2  # the largest odd number < size
        if kernel_size > max_kernel:
            raise KernelTooLargeError(
                f"the {kernel_size}-px matching kernel is too big for {size}-px PSF images (at "
                "most "
                f"{max_kernel} px fits): reduce kernel_size, enable do_auto_pad_psf or raise "
                "pad_psf_by"
            )
        return size, pad

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
        fit, kernel = self.fit_kernel(cell_set, kernel_sum)
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
        §7.2–§7.8)."""
        if not isinstance(exposure, Exposure):
            raise InvalidInputError(f"exposure must be an Exposure, got {type(exposure).__name__}")
        if not isinstance(reference_psf, Psf):
            raise InvalidInputError(
                f"reference_psf must be a gpudiff Psf, got {type(reference_psf).__name__}"
            )
        if exposure.psf is None:
            raise PsfError(
                "the exposure has no PSF to match; attach one (e.g. gpudiff.image.estimate_psf)"
            )
        kc = self.config.kernel
        # Basis first: its size sets the padding (with scale_by_fwhm off, as by default,
        # it is kernel_size, exactly LSST's order of checks).
        sci_fwhm, ref_fwhm = _fwhm(exposure.psf), _fwhm(reference_psf)
        basis = make_kernel_basis(kc, sci_fwhm, ref_fwhm)
        if basis.size > min(exposure.shape):
            raise KernelTooLargeError(
                f"the {basis.size}-px kernel is larger than the image {exposure.shape}"
            )
        region, xs, ys = self.cell_grid(exposure.bbox)
        if xs.size * ys.size < kc.n_spatial_kernel_terms:
            # LSST would solve this underdetermined system by pseudo-inverse; the fit here
            # refuses fewer candidates than spatial terms rather than invent a kernel.
            raise InsufficientKernelSourcesError(
                f"a {exposure.shape[1]}x{exposure.shape[0]} exposure gives only "
                f"{xs.size}x{ys.size} cells of "
                f"{kc.size_cell_x}x{kc.size_cell_y} px for a spatial kernel model with "
                f"{kc.n_spatial_kernel_terms} terms; lower spatial_kernel_order or size_cell_x/y"
            )
        sci_imgs = _realize(exposure.psf, xs, ys, "exposure")
        native = max(max(im.shape) for im in sci_imgs)
        size, pad = self._psf_size(native, basis.size)
        ref = resized_psf(reference_psf, size)
        ref_imgs = _realize(ref, xs, ys, "reference")
        template = np.stack([_centred(im, size) for im in sci_imgs])
        science = np.stack([_centred(im, size) for im in ref_imgs])
        gx, gy = np.meshgrid(xs, ys)
        cands = _candidates(
            self.backend, template, science, gx.ravel(), gy.ravel(), region, kc, basis.size
        )
        return CellSet(
            candidates=cands,
            basis=basis,
            region=region,
            reference_psf=ref,
            native_size=native,
            psf_size=size,
            padding=pad,
            n_cells_x=xs.size,
            n_cells_y=ys.size,
            science_fwhm=sci_fwhm,
            reference_fwhm=ref_fwhm,
        )

    def fit_kernel(
        self, cell_set: CellSet, kernel_sum: float = 1.0
    ) -> tuple[KernelFit, SpatialKernel]:
        """Solve K(x, y) without clipping and force its sum (docs/algorithms.md §7.9–§7.10)."""
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
        return fit, replace(fit.kernel, coefficients=coeffs)

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


def _fwhm(psf: Psf) -> float | None:
    """Determinant-radius FWHM at the model's average position (docs/algorithms.md §7.8); None if it
    fails."""
    try:
        return FWHM_PER_SIGMA * psf.determinant_radius()
    except PsfError:  # only used to scale the basis, and LSST falls back to the config then
        return None


def _candidates(
    be: Backend,
    template: np.ndarray,
    science: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    region: Box,
    kc: PsfMatchConfig,
    kernel_size: int,
) -> KernelCandidates:
    """One candidate per cell: mask 0 and variance 1 everywhere (docs/algorithms.md §7.7)."""
    xp = be.xp
    S = template.shape[-1]
    c, r = S // 2, min(3, S // 2)
    # afw's position-only rating: mean of image/√var over the central (2r+1)² pixels.
    rating = science[:, c - r : c + r + 1, c - r : c + r + 1].mean(axis=(1, 2))
    cell, n_cells = cell_index(x, y, region, kc.size_cell_x, kc.size_cell_y)
    ones = xp.ones(template.shape, dtype=np.float64)
    return KernelCandidates(
        x=x,
        y=y,
        rating=rating,
        source_index=np.arange(x.size),
        template=be.asarray(template, dtype=np.float64),
        science=be.asarray(science, dtype=np.float64),
        template_var=ones,
        science_var=ones.copy(),
        cell=cell,
        n_cells=n_cells,
        kernel_size=int(kernel_size),
    )


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
