"""ModelPsfMatch's cell grid: both PSF models realized on a grid of cells over the exposure,
one kernel candidate per cell (LSST ``ModelPsfMatchTask._buildCellSet``, docs/algorithms.md
§7.2–§7.8).

:func:`build_cell_set` is the first step of
:meth:`~gpudiff.tasks.model_psf_match.ModelPsfMatchTask.run`: the exposure's PSF is the
"template" stamp of each cell and the (resized) reference PSF its "science" stamp, both
padded (:func:`padded_psf_size`) so the kernel fits in them with room for a good region.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..backend import Backend
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
    MoffatPsf,
    Psf,
)
from ..image.psf import FWHM_PER_SIGMA
from ..psfmatch.basis import KernelBasis, make_kernel_basis
from ..psfmatch.candidates import KernelCandidates, cell_index
from ..psfmatch.config import PsfMatchConfig

if TYPE_CHECKING:  # only for annotations: model_psf_match imports this module
    from .model_psf_match import ModelPsfMatchConfig

__all__ = [
    "CellGrid",
    "CellSet",
    "PsfPadding",
    "build_cell_set",
    "cell_grid",
    "next_odd_integer",
    "padded_psf_size",
    "resized_psf",
]

# the task's logger: these steps log as part of ModelPsfMatchTask.run
log = logging.getLogger("gpudiff.tasks.model_psf_match")


@dataclass(frozen=True)
class CellGrid:
    """The cells of :func:`cell_grid`.

    Attributes
    ----------
    region : Box
        The exposure's box grown by one cell on each side.
    xs, ys : float64 arrays
        The cell centres along x and along y (parent pixel coordinates).
    """

    region: Box
    xs: np.ndarray
    ys: np.ndarray


@dataclass(frozen=True)
class PsfPadding:
    """The PSF image size of :func:`padded_psf_size`.

    Attributes
    ----------
    size : int
        The padded size of the PSF images (odd).
    padding : int
        Pixels added to the native size.
    """

    size: int
    padding: int


@dataclass
class CellSet:
    """The realized PSF grid (LSST ``_buildCellSet``): candidates, basis and sizes.

    Attributes
    ----------
    candidates : KernelCandidates
        One candidate per cell (row-major: y outer, x inner).
    basis : KernelBasis
    region : Box
        The exposure's box grown by one cell on each side.
    reference_psf : Psf
        The reference resized to ``psf_size``.
    native_size, psf_size, padding : int
        The largest realized PSF image, its padded size, and the padding.
    n_cells_x, n_cells_y : int
    science_fwhm, reference_fwhm : float or None
        Determinant-radius FWHMs at the models' average positions.
    """

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


def cell_grid(kc: PsfMatchConfig, bbox: Box) -> CellGrid:
    """The region (``bbox`` grown by one cell on each side) and the cell centres
    (docs/algorithms.md §7.2).

    Parameters
    ----------
    kc : PsfMatchConfig
        ``size_cell_x`` and ``size_cell_y``.
    bbox : Box
        The exposure's box.

    Returns
    -------
    CellGrid
    """
    sx, sy = int(kc.size_cell_x), int(kc.size_cell_y)
    region = Box(bbox.x0 - sx, bbox.y0 - sy, bbox.x1 + sx, bbox.y1 + sy)
    ncx, ncy = region.width // sx, region.height // sy  # >= 2: the region is grown by a cell
    xs = sx * np.arange(ncx) + sx // 2 + region.x0
    ys = sy * np.arange(ncy) + sy // 2 + region.y0
    return CellGrid(region, xs.astype(np.float64), ys.astype(np.float64))


def padded_psf_size(cfg: ModelPsfMatchConfig, native: int, kernel_size: int) -> PsfPadding:
    """The PSF image size for a ``kernel_size`` kernel (docs/algorithms.md §7.4–§7.5).

    Parameters
    ----------
    cfg : ModelPsfMatchConfig
        ``do_auto_pad_psf``, ``auto_pad_psf_to``, ``pad_psf_by``.
    native : int
        The largest realized PSF image.
    kernel_size : int

    Returns
    -------
    PsfPadding

    Raises
    ------
    InvalidInputError
        An odd ``pad_psf_by`` without auto-padding.
    KernelTooLargeError
        The kernel does not fit in the padded PSF images.
    """
    if cfg.do_auto_pad_psf:
        pad = max(0, next_odd_integer(kernel_size * cfg.auto_pad_psf_to) - native)
    else:
        if cfg.pad_psf_by % 2:
            raise InvalidInputError(f"pad_psf_by ({cfg.pad_psf_by} pixels) must be an even number")
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
    return PsfPadding(size, pad)


def build_cell_set(
    cfg: ModelPsfMatchConfig, backend: Backend, exposure: Exposure, reference_psf: Psf
) -> CellSet:
    """Realize both PSFs on the cell grid and make one candidate per cell
    (docs/algorithms.md §7.2–§7.8).

    Parameters
    ----------
    cfg : ModelPsfMatchConfig
    backend : Backend
        Where the candidates' stamps go.
    exposure : Exposure
        Must carry a PSF.
    reference_psf : Psf

    Returns
    -------
    CellSet

    Raises
    ------
    InvalidInputError, PsfError, KernelTooLargeError, InsufficientKernelSourcesError
        See :meth:`~gpudiff.tasks.model_psf_match.ModelPsfMatchTask.run`.
    """
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
    kc = cfg.kernel
    # Basis first: its size sets the padding (with scale_by_fwhm off, as by default,
    # it is kernel_size, exactly LSST's order of checks).
    sci_fwhm, ref_fwhm = _fwhm(exposure.psf), _fwhm(reference_psf)
    basis = make_kernel_basis(kc, sci_fwhm, ref_fwhm)
    if basis.size > min(exposure.shape):
        raise KernelTooLargeError(
            f"the {basis.size}-px kernel is larger than the image {exposure.shape}"
        )
    grid = cell_grid(kc, exposure.bbox)
    xs, ys = grid.xs, grid.ys
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
    padded = padded_psf_size(cfg, native, basis.size)
    size = padded.size
    ref = resized_psf(reference_psf, size)
    ref_imgs = _realize(ref, xs, ys, "reference")
    template = np.stack([_centred(im, size) for im in sci_imgs])
    science = np.stack([_centred(im, size) for im in ref_imgs])
    gx, gy = np.meshgrid(xs, ys)
    cands = _candidates(
        backend, template, science, gx.ravel(), gy.ravel(), grid.region, kc, basis.size
    )
    return CellSet(
        candidates=cands,
        basis=basis,
        region=grid.region,
        reference_psf=ref,
        native_size=native,
        psf_size=size,
        padding=padded.padding,
        n_cells_x=xs.size,
        n_cells_y=ys.size,
        science_fwhm=sci_fwhm,
        reference_fwhm=ref_fwhm,
    )


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
