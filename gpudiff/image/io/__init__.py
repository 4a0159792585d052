"""FITS and ``CCDData`` I/O for exposures and PSFs, one small module per file layout.

:func:`read_exposure` recognizes the layout (:func:`detect_layout`; the table in
:mod:`gpudiff.image.io.registry`) and hands the file to its reader:

- :mod:`.lsst_images` — Rubin's afw-free ``lsst-images`` files (``MSKN/MSKM/MSKD`` planes,
  tile-compressed HDUs, 'A' WCS, Gaussian / Piff / cell-coadd PSFs);
- :mod:`.afw` — afw ``Exposure`` files before 2021 (``EXTTYPE``) and after (``EXTNAME``);
- :mod:`.jwst` — JWST ``cal``/``i2d`` files (``SCI``, ``ERR``, ``DQ``, ``VAR_*``, ``WHT``);
- :mod:`.native` — gpudiff's own LSST-style layout, which :func:`write_exposure` writes;
- :mod:`.ccddata` — astropy ``CCDData`` files and objects;
- :mod:`.plain` — any other image (variance estimated).

What a reader has to assume, or cannot read, it says with a :class:`FormatWarning`.
Arrays leave this package native-endian; astropy objects never hold device arrays.
"""

from __future__ import annotations

from .. import exposure as _exposure
from ._common import (
    PHOTCAL_ERR_KEY,
    PHOTCAL_KEY,
    FormatWarning,
    VarianceEstimatedWarning,
    atomic_write_hdus,
    fget,
    fset,
    read_photocalib,
    read_wcs,
    read_xy0,
    write_xy0,
)
from .ccddata import exposure_from_ccddata, exposure_to_ccddata
from .jwst import DQ_FLAGS, DQ_TO_PLANES
from .native import write_exposure
from .plain import estimate_variance
from .psf_io import PSF_EXTNAME, PSFGRID_EXTNAME, psf_from_hdus, psf_to_hdus, read_psf, write_psf
from .psf_models import CellPsf, PiffPsf, piff_available
from .registry import LAYOUTS, detect_layout, read_exposure

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
    "LAYOUTS",
    "read_xy0",
    "write_xy0",
    "read_wcs",
    "read_photocalib",
    "atomic_write_hdus",
    "fset",
    "fget",
    "FormatWarning",
    "VarianceEstimatedWarning",
    "PiffPsf",
    "CellPsf",
    "piff_available",
    "DQ_FLAGS",
    "DQ_TO_PLANES",
    "PHOTCAL_KEY",
    "PHOTCAL_ERR_KEY",
    "PSF_EXTNAME",
    "PSFGRID_EXTNAME",
]

# Exposure.read/write/from_ccddata/to_ccddata delegate here (exposure.py never imports this
# package).
_exposure._IO.update(
    read_exposure=read_exposure,
    write_exposure=write_exposure,
    exposure_from_ccddata=exposure_from_ccddata,
    exposure_to_ccddata=exposure_to_ccddata,
)
