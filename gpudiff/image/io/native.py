"""gpudiff's own layout, LSST-style: what :func:`write_exposure` writes and reads back.

A data-less primary HDU (metadata, ``PHOTCAL`` = nJy per image unit, ``PHOTCALE``); ``IMAGE``
(float32, with the WCS and xy0 as ``LTV1/LTV2`` = −x0, −y0 and as LSST's 'A' pixel WCS:
``CTYPE1A = 'LINEAR'``, ``CRVAL1A`` = x0); ``MASK`` (int32; afw's ``MP_<NAME> = bit`` cards,
``HIERARCH`` when long, and lsst-images' ``MSKNnnnn``/``MSKMnnnn``/``MSKDnnnn`` cards, so both
afw-style readers and lsst-images read the planes; a mask with planes past bit 30 is split
into ``MASK`` HDUs of 31 planes, ``EXTVER`` 1, 2, … as lsst-images does); ``VARIANCE``
(float32); ``PSF`` (+ ``PSFGRID``, see :func:`~gpudiff.image.io.psf_to_hdus`).
"""

from __future__ import annotations

import warnings

import numpy as np
from astropy.io import fits

from ...errors import FitsReadError, InvalidInputError
from ...backend import resolve_backend
from ..exposure import Exposure
from ..masked_image import MaskedImage
from ..maskplanes import mask_dtype
from ._common import (
    PHOTCAL_ERR_KEY,
    PHOTCAL_KEY,
    Hdus,
    atomic_write_hdus,
    fset,
    plane,
    read_photocalib,
    read_wcs,
    read_xy0,
    strip,
    write_xy0,
)
from .masks import mask_hdus, read_mask
from .psf_io import gpudiff_psf, psf_to_hdus

__all__ = ["detect", "read", "write_exposure"]

NAME = "gpudiff"


def detect(hdus: Hdus) -> bool:
    """An ``IMAGE`` HDU named by EXTNAME (afw's EXTTYPE-only files and lsst-images files are
    recognized before this layout)."""
    return "IMAGE" in [str(h.name).upper() for h in hdus.hdul]


def read(hdus: Hdus, backend) -> Exposure:
    path = hdus.path
    if "VARIANCE" not in hdus:
        raise FitsReadError(
            f"{path}[IMAGE]: an IMAGE HDU without a VARIANCE HDU (the LSST layout "
            f"needs IMAGE, MASK, VARIANCE); the HDUs are {hdus.listing()}"
        )
    img_hdu = hdus.get("IMAGE")
    image = plane(path, img_hdu, "IMAGE", np.float32)
    variance = plane(path, hdus.get("VARIANCE"), "VARIANCE", np.float32, shape=image.shape)
    masks = hdus.all("MASK")
    if masks:
        mask, planes = read_mask(path, masks, image.shape, foreign=False)
    else:
        from ..maskplanes import MaskPlanes

        mask, planes = np.zeros(image.shape, np.int32), MaskPlanes()
    # The planes are fresh native copies nobody else holds: adopted as they are (the
    # public constructor would copy each once more), the mask narrowed to its dtype first.
    be = resolve_backend(backend)
    mi = MaskedImage._adopt(
        be.asarray(image),
        be.asarray(variance),
        be.asarray(mask.astype(mask_dtype(planes), copy=False)),
        xy0=read_xy0(img_hdu.header),
        mask_planes=planes,
        backend=be,
    )
    return Exposure(
        mi,
        psf=gpudiff_psf(hdus.hdul),
        wcs=read_wcs(path, img_hdu.header, hdus.hdul),
        photo_calib=read_photocalib(hdus.primary, img_hdu.header),
        metadata=strip(hdus.primary),
    )


def write_exposure(path, exposure: Exposure, overwrite: bool = False) -> None:
    """Write ``exposure`` in gpudiff's LSST-style layout (module docstring), atomically.

    ``IMAGE``, ``MASK`` and ``VARIANCE`` each carry the WCS and xy0 cards; device arrays
    are copied to the host.  The file is written under a temporary name beside ``path``
    and renamed into place, so ``path`` is never left half-written.  astropy, ds9, afw-style
    readers (``MP_*``) and lsst-images (``MSK*`` cards, ``MaskedImage.read_legacy``) read it.

    Raises
    ------
    FitsWriteError
        ``path`` exists and not ``overwrite``, its folder is missing or unwritable, or the
        write failed; the message names ``path``.
    """
    if not isinstance(exposure, Exposure):
        raise InvalidInputError(f"write_exposure needs an Exposure, got {type(exposure).__name__}")
    be = exposure.backend
    primary = fits.PrimaryHDU()
    for card in strip(exposure.metadata).cards:
        primary.header.append(card, end=True)  # extend() would regroup COMMENT/HISTORY cards
    fset(primary.header, PHOTCAL_KEY, exposure.photo_calib.calibration_mean, "[nJy/unit]")
    fset(primary.header, PHOTCAL_ERR_KEY, exposure.photo_calib.calibration_err, "[nJy/unit]")
    common = fits.Header()
    if exposure.wcs is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            common.extend(exposure.wcs.to_header(relax=True))  # relax keeps '-SIP' and its terms
    write_xy0(common, exposure.xy0)
    image = fits.ImageHDU(
        np.asarray(be.asnumpy(exposure.image), dtype=np.float32), common, name="IMAGE"
    )
    masks = mask_hdus(be.asnumpy(exposure.mask), exposure.mask_planes, common)
    variance = fits.ImageHDU(
        np.asarray(be.asnumpy(exposure.variance), dtype=np.float32), common, name="VARIANCE"
    )
    hdus = [primary, image, masks[0], variance, *masks[1:]]
    atomic_write_hdus(
        fits.HDUList(hdus + (psf_to_hdus(exposure.psf) if exposure.psf is not None else [])),
        path,
        overwrite,
    )
