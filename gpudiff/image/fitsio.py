"""The FITS layer's former single module, kept so that ``gpudiff.image.fitsio`` imports go on
working: every name here is :mod:`gpudiff.image.io`'s (one module per file layout there)."""

from __future__ import annotations

from .io import (
    PHOTCAL_ERR_KEY,
    PHOTCAL_KEY,
    PSF_EXTNAME,
    PSFGRID_EXTNAME,
    FormatWarning,
    atomic_write_hdus,
    detect_layout,
    estimate_variance,
    exposure_from_ccddata,
    exposure_to_ccddata,
    fget,
    fset,
    psf_from_hdus,
    psf_to_hdus,
    read_exposure,
    read_photocalib,
    read_psf,
    read_wcs,
    read_xy0,
    write_exposure,
    write_psf,
    write_xy0,
)

__all__ = [
    "read_exposure",
    "write_exposure",
    "read_psf",
    "write_psf",
    "psf_to_hdus",
    "psf_from_hdus",
    "exposure_from_ccddata",
    "exposure_to_ccddata",
    "estimate_variance",
    "detect_layout",
    "FormatWarning",
    "PHOTCAL_KEY",
    "PHOTCAL_ERR_KEY",
    "PSF_EXTNAME",
    "PSFGRID_EXTNAME",
]

# The private names other modules used before gpudiff.image.io existed (aliases).
_read_xy0 = read_xy0
_write_xy0 = write_xy0
_read_wcs = read_wcs
_read_photocalib = read_photocalib
_atomic_write = atomic_write_hdus
_fset = fset
_fget = fget
