"""astropy ``CCDData`` files and objects, and the single-image files read like them.

A file: the pixels in the first image HDU (or ``hdu``), its header completed by the
primary's, as astropy reads it; ``UNCERT`` by ``UTYPE``: ``StdDevUncertainty`` (default) →
σ², ``VarianceUncertainty``, ``InverseVariance`` → 1/ivar (+inf where ≤ 0); nonzero
``MASK`` → ``BAD``; an integer ``FLAGS`` HDU (``CCDData.write(hdu_flags='FLAGS')``) is the
bit mask (named by ``MP_*``/``MSK*`` cards); ``PSFIMAGE`` → :class:`ImagePsf`.  Without
``UNCERT`` the variance is estimated as for a plain image (:mod:`.plain`).
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import numpy as np
from astropy.io import fits

from ...errors import FitsReadError, InvalidInputError
from ..exposure import Exposure
from ..maskplanes import MaskPlanes
from ..psf import ImagePsf, Psf
from ._common import (
    MP_KEYS,
    PHOTCAL_ERR_KEY,
    PHOTCAL_KEY,
    WCS_KEYS,
    XY0_KEYS,
    Hdus,
    fset,
    has_image,
    load,
    plane,
    read_photocalib,
    read_wcs,
    read_xy0,
    strip,
    write_xy0,
)
from .masks import read_mask
from .plain import assemble
from .psf_io import PSF_NAMES, PSFGRID_EXTNAME, gpudiff_psf

__all__ = ["detect", "read_single", "exposure_from_ccddata", "exposure_to_ccddata"]

NAME = "ccddata"
AUX = {"MASK", "UNCERT", "FLAGS", *PSF_NAMES, PSFGRID_EXTNAME}


def detect(hdus: Hdus) -> bool:
    """``UNCERT``, ``MASK``, ``FLAGS`` or ``PSFIMAGE`` HDUs beside the pixels."""
    return any(r in hdus.roles for r in ("UNCERT", "MASK", "FLAGS", "PSFIMAGE"))


def pixel_hdu(hdus: Hdus, idx=None) -> int:
    """The index of the HDU holding the pixels: ``idx``, else the first 2-D image that is not
    an auxiliary (mask, uncertainty, PSF) HDU."""
    if idx is not None:
        return idx
    idx = next(
        (
            i
            for i, h in enumerate(hdus.hdul)
            if has_image(h)
            and hdus.roles[i] not in AUX
            and len(h.shape) >= 2
            and sum(n > 1 for n in h.shape[:-2]) == 0
        ),
        None,
    )
    if idx is None:
        raise FitsReadError(
            f"{hdus.path}: no HDU with 2-D image data; the HDUs are {hdus.listing()}"
        )
    return idx


def read_single(hdus: Hdus, idx, gain, backend) -> Exposure:
    """The CCDData and plain layouts: one pixel HDU, optional UNCERT/MASK/FLAGS/PSF HDUs."""
    path, hdul, names = hdus.path, hdus.hdul, hdus.roles
    idx = pixel_hdu(hdus, idx)
    h = hdul[idx]
    header = h.header.copy()
    if idx != 0:  # as astropy's CCDData reader: the primary fills in missing cards
        header.extend(hdul[0].header.copy(strip=True), unique=True)
    raw = load(path, h)
    image = plane(path, h, f"image (HDU {idx})", np.float32, raw)
    if raw.dtype.kind in "iu" and "BLANK" in h.header:  # unscaled integers: BLANK marks no data
        image[raw.reshape(image.shape) == h.header["BLANK"]] = np.nan
    flags = bad = unc = kind = planes = None
    if (
        "FLAGS" in names
    ):  # the bits; their names on the FLAGS HDU, else where CCDData.write put meta
        fh = hdul[names.index("FLAGS")]
        flags, planes = read_mask(
            path,
            [fh],
            image.shape,
            headers=[fh.header if MaskPlanes.header_cards(fh.header) else header],
        )
    if "MASK" in names:  # astropy's semantics: any nonzero value is masked
        bad = plane(path, hdul[names.index("MASK")], "MASK", bool, shape=image.shape)
    if "UNCERT" in names:
        u = hdul[names.index("UNCERT")]
        unc = plane(path, u, "UNCERT", np.float64, shape=image.shape)
        kind = {"VarianceUncertainty": "var", "InverseVariance": "ivar"}.get(
            u.header.get("UTYPE"), "std"
        )
    wcs = read_wcs(path, header, hdul)
    meta = strip(header, XY0_KEYS, MP_KEYS, *([WCS_KEYS] if wcs is not None else []))
    if planes is None:
        planes = MaskPlanes.from_header(header)
    return assemble(
        image,
        unc,
        kind,
        flags,
        bad,
        header,
        meta,
        gain,
        backend,
        xy0=read_xy0(header),
        planes=planes,
        path=path,
        wcs=wcs,
        psf=gpudiff_psf(hdul),
        photo_calib=read_photocalib(hdul[0].header, header),
    )


def exposure_from_ccddata(
    ccd, psf: Psf | None = None, *, gain: float | None = None, backend=None
) -> Exposure:
    """Build an Exposure from an ``astropy.nddata.CCDData``.

    The uncertainty becomes a variance by type (std → σ², var, ivar → 1/ivar) in the data's
    unit; without one it is estimated as for a plain image (:func:`read_exposure`).  An
    integer ``ccd.flags`` is the bit mask, named by ``MP_*``/``MSK*`` cards in ``meta``;
    ``ccd.mask`` sets ``BAD`` where no bit is; non-finite pixels get ``NO_DATA``.
    ``ccd.psf`` becomes an :class:`ImagePsf` unless ``psf`` is given; ``meta`` (less xy0,
    mask-plane, ``PHOTCAL`` cards) the metadata, with ``BUNIT`` from ``ccd.unit``.
    """
    from astropy import units as u

    header = ccd.meta.copy() if isinstance(ccd.meta, fits.Header) else fits.Header()
    for k, v in ({} if isinstance(ccd.meta, fits.Header) else ccd.meta or {}).items():
        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header[str(k)] = v  # values a FITS card cannot hold are dropped
    image = np.array(np.asarray(ccd.data), dtype=np.float32)
    flags = getattr(ccd, "flags", None)
    flags = (
        flags.astype(np.int64)
        if (
            isinstance(flags, np.ndarray)
            and flags.dtype.kind in "iu"
            and flags.shape == image.shape
        )
        else None
    )
    bad = None if ccd.mask is None else np.array(ccd.mask, dtype=bool)
    arr, kind, unc = None, None, ccd.uncertainty
    if unc is not None:
        kind = getattr(unc, "uncertainty_type", "")
        if kind not in ("std", "var", "ivar"):
            raise InvalidInputError(
                f"CCDData uncertainty type {kind!r} cannot be turned into a variance"
            )
        arr = np.asarray(unc.array, dtype=np.float64)
        if unc.unit is not None and ccd.unit is not None:  # e.g. a std in mJy for data in Jy
            try:
                arr = arr * (1.0 * unc.unit).to_value(
                    ccd.unit ** {"std": 1, "var": 2, "ivar": -2}[kind]
                )
            except u.UnitConversionError as exc:
                raise InvalidInputError(
                    f"CCDData uncertainty unit {unc.unit} does not fit unit {ccd.unit}"
                ) from exc
    meta = strip(header, XY0_KEYS, MP_KEYS)
    if ccd.unit is not None and ccd.unit != u.dimensionless_unscaled:
        meta["BUNIT"] = ccd.unit.to_string()
    if psf is None and getattr(ccd, "psf", None) is not None:
        psf = ImagePsf(np.asarray(ccd.psf, dtype=np.float64))
    wcs = copy.deepcopy(ccd.wcs) if ccd.wcs is not None and ccd.wcs.has_celestial else None
    return assemble(
        image,
        arr,
        kind,
        flags,
        bad,
        header,
        meta,
        gain,
        backend,
        xy0=read_xy0(header),
        wcs=wcs,
        psf=psf,
        photo_calib=read_photocalib(header),
    )


def exposure_to_ccddata(exposure: Exposure):
    """Convert to an ``astropy.nddata.CCDData`` (host arrays).

    ``uncertainty`` is a float64 ``StdDevUncertainty`` √variance, ``mask`` the boolean
    ``mask != 0``, ``flags`` the integer bits; ``meta`` adds the ``MP_*``/``MSK*``,
    ``PHOTCAL*`` and xy0 cards; ``psf`` is the kernel image; ``unit`` is ``BUNIT``, else
    ``adu``.  :func:`exposure_from_ccddata` restores all but an analytic PSF's type.  The
    boolean mask loses the bits: ``CCDData.write`` keeps them only with ``hdu_flags='FLAGS'``.
    """
    from astropy import units as u
    from astropy.nddata import CCDData, StdDevUncertainty

    be = exposure.backend
    meta = exposure.metadata.copy()
    exposure.mask_planes.to_header(meta)
    fset(meta, PHOTCAL_KEY, exposure.photo_calib.calibration_mean, "[nJy/unit]")
    fset(meta, PHOTCAL_ERR_KEY, exposure.photo_calib.calibration_err, "[nJy/unit]")
    write_xy0(meta, exposure.xy0)
    unit = u.Unit(str(meta.get("BUNIT", "adu")).strip() or "adu", parse_strict="silent")
    mask = np.array(be.asnumpy(exposure.mask))
    with np.errstate(invalid="ignore"):
        std = np.sqrt(np.asarray(be.asnumpy(exposure.variance), dtype=np.float64))
    ccd = CCDData(
        np.array(be.asnumpy(exposure.image), dtype=np.float32),
        unit=unit,
        meta=meta,
        uncertainty=StdDevUncertainty(std),
        mask=mask != 0,
        wcs=copy.deepcopy(exposure.wcs),
    )
    ccd.flags = mask
    if exposure.psf is not None:
        ccd.psf = exposure.psf.kernel_image()
    return ccd
