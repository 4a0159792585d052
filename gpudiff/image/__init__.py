"""The data model: mask planes, masked images, exposures, PSF models and FITS I/O."""

from .exposure import Exposure, PhotoCalib
from .masked_image import Box, MaskedImage
from .maskplanes import DEFAULT_MASK_PLANES, MASK_PLANE_ALIASES, MaskPlanes
from .io import FormatWarning, detect_layout, read_exposure, read_psf, write_exposure, write_psf
from .tract import TractGrid
from .psf_estimate import estimate_psf
from .psf import (
    FWHM_PER_SIGMA,
    DoubleGaussianPsf,
    GaussianPsf,
    GridPsf,
    ImagePsf,
    MoffatPsf,
    Psf,
    adaptive_moments,
    evaluate_mean_fwhm,
)

__all__ = [
    "TractGrid",
    "Box",
    "DEFAULT_MASK_PLANES",
    "FormatWarning",
    "MASK_PLANE_ALIASES",
    "DoubleGaussianPsf",
    "Exposure",
    "FWHM_PER_SIGMA",
    "GaussianPsf",
    "GridPsf",
    "ImagePsf",
    "MaskPlanes",
    "MaskedImage",
    "MoffatPsf",
    "PhotoCalib",
    "Psf",
    "adaptive_moments",
    "detect_layout",
    "estimate_psf",
    "evaluate_mean_fwhm",
    "read_exposure",
    "read_psf",
    "write_exposure",
    "write_psf",
]
