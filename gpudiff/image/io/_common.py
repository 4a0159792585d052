"""Helpers shared by the layout readers and writers: opening, HDU roles, header cards.

Arrays leave this package native-endian (FITS is big-endian, CuPy cannot take that);
astropy objects never hold device arrays.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import warnings

import numpy as np
from astropy.io import fits

from ...errors import FitsReadError, GpudiffError, InvalidInputError, PsfError
from ..atomic import atomic_write
from ..exposure import PhotoCalib

log = logging.getLogger("gpudiff.image.io")

PHOTCAL_KEY = "PHOTCAL"  #: primary-header card of PhotoCalib.calibration_mean (nJy/unit)
PHOTCAL_ERR_KEY = "PHOTCALE"  #: primary-header card of PhotoCalib.calibration_err

# Cards that describe an HDU rather than the observation: never carried as metadata.
STRUCTURAL = re.compile(
    r"^(SIMPLE|BITPIX|NAXIS\d*|EXTEND|XTENSION|PCOUNT|GCOUNT|EXTNAME|EXTVER|EXTLEVEL|EXTTYPE"
    r"|INHERIT|BSCALE|BZERO|BLANK|CHECKSUM|DATASUM|UTYPE|PHOTCALE?)$"
)
# xy0 cards (IRAF/LSST LTV, LSST's 'A' pixel WCS): they become MaskedImage.xy0.
XY0_KEYS = re.compile(r"^(LTV[12]|LTM[12]_[12]|(CRVAL|CRPIX|CTYPE|CUNIT|CDELT)[12]A|WCSNAMEA)$")
# Mask-plane cards (afw's MP_*, lsst-images' MSKN/MSKM/MSKD): they become MaskedImage.mask_planes.
MP_KEYS = re.compile(r"^(MP_|MSK[NMD]\d{4}$)")
# Celestial WCS cards: held by Exposure.wcs, so dropped from the metadata of 1-HDU files.
WCS_KEYS = re.compile(
    r"^((WCSAXES|(CRPIX|CRVAL|CDELT|CTYPE|CUNIT|CROTA)\d+|(CD|PC|PV|PS)\d+_\d+|LONPOLE"
    r"|LATPOLE|RADESYS|EQUINOX|WCSNAME)[A-Z]?|RADECSYS|MJDREF|DATEREF|WCSDIM|WAT\d_\d+"
    r"|[AB]P?_(ORDER|DMAX|\d+_\d+))$"
)


class FormatWarning(UserWarning):
    """A reader assumed something a file does not say, or could not read a part of it
    (mask planes without names, a PSF it cannot decode, an unmapped plane, ...)."""


class VarianceEstimatedWarning(FormatWarning):
    """The file carries no noise: its variance plane was estimated from the sky.  A noise,
    variance or weight map given beside the image supersedes the estimate, so callers
    that attach one (:func:`gpudiff.image.inputs.read_with_inputs`) drop this warning."""


def warn(path: str, message: str, category: type[Warning] = FormatWarning) -> None:
    """Warn (``category``, a :class:`FormatWarning` by default) about ``path`` (and log
    it at DEBUG on ``gpudiff.image.io``)."""
    log.debug("%s: %s", path, message)
    warnings.warn(f"{path}: {message}", category, stacklevel=3)


@contextlib.contextmanager
def open_fits(path: str):
    """Open ``path`` with every header parsed now; any failure becomes a FitsReadError."""
    if not os.path.isfile(path):
        raise FitsReadError(
            f"{path}: " + ("not a regular file" if os.path.exists(path) else "no such file")
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:  # memmap=False: short data fail when read; lazy_load_hdus=False: cut headers show now
            hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
        except Exception as exc:
            with open(
                path, "rb"
            ) as f:  # a FITS start cut short (e.g. in a header): truncated, not foreign
                fits_start = f.read(9) == b"SIMPLE  ="
            what = "FITS file is truncated or corrupt" if fits_start else "not a readable FITS file"
            raise FitsReadError(f"{path}: {what} ({type(exc).__name__}: {exc})") from exc
    for w in caught:
        if any(word in str(w.message).lower() for word in ("truncated", "corrupt")):
            hdul.close()  # astropy only warns and drops the damaged HDUs: refuse the file
            raise FitsReadError(f"{path}: FITS file is truncated or corrupt ({w.message})")
        warnings.warn(f"{path}: {w.message}", w.category, stacklevel=4)
    with hdul:
        yield hdul


def hdu_list(hdul) -> str:
    """``[0:PRIMARY, 1:IMAGE, ...]`` for messages (afw's unnamed HDUs by their EXTTYPE)."""
    return "[" + ", ".join(f"{i}:{role_of(h) or '(unnamed)'}" for i, h in enumerate(hdul)) + "]"


def role_of(h) -> str:
    """An HDU's role: its EXTNAME, else afw's ``EXTTYPE`` (files written before 2021), upper
    case."""
    name = str(getattr(h, "name", "") or "").strip().upper()
    if name and name != "PRIMARY":
        return name
    exttype = str(h.header.get("EXTTYPE", "") or "").strip().upper()
    return exttype or name


class Hdus:
    """An opened file's HDUs by role (EXTNAME or EXTTYPE) and ``EXTVER``."""

    def __init__(self, path: str, hdul):
        self.path, self.hdul = path, hdul
        self.roles = [role_of(h) for h in hdul]

    @property
    def primary(self) -> fits.Header:
        return self.hdul[0].header

    def __contains__(self, role: str) -> bool:
        return role.upper() in self.roles

    def get(self, role: str, ver: int = 1):
        """The HDU of ``role`` and ``EXTVER`` ``ver`` (1 when absent); None if there is none."""
        return next(
            (
                h
                for h, r in zip(self.hdul, self.roles)
                if r == role.upper() and int(h.header.get("EXTVER", 1) or 1) == ver
            ),
            None,
        )

    def all(self, role: str) -> list:
        """Every HDU of ``role``, by ``EXTVER``."""
        hs = [h for h, r in zip(self.hdul, self.roles) if r == role.upper()]
        return sorted(hs, key=lambda h: int(h.header.get("EXTVER", 1) or 1))

    def listing(self) -> str:
        return hdu_list(self.hdul)


def has_image(h) -> bool:
    """An image HDU (plain or tile-compressed) with data."""
    return isinstance(h, (fits.PrimaryHDU, fits.ImageHDU)) and h.header.get("NAXIS", 0) > 0


def load(path: str, h) -> np.ndarray | None:
    """The data of HDU ``h``, read now so that truncation or corruption shows here."""
    try:
        return None if h.data is None else np.asarray(h.data)
    except Exception as exc:
        raise FitsReadError(
            f"{path}[{role_of(h)}]: cannot read the data, the file is truncated or corrupt "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def plane(path: str, h, what: str, dtype, data=None, shape=None) -> np.ndarray:
    """2-D data of HDU ``h`` as a native ``dtype`` copy (leading length-1 axes dropped)."""
    data = load(path, h) if data is None else data
    name = role_of(h)
    if data is None:
        raise FitsReadError(f"{path}[{name}]: the {what} HDU has no data")
    while data.ndim > 2 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise FitsReadError(f"{path}[{name}]: the {what} must be 2-D, got shape {data.shape}")
    if shape is not None and data.shape != shape:
        raise FitsReadError(
            f"{path}[{name}]: shape {data.shape} differs from the image shape {shape}"
        )
    if data.dtype.kind not in "fiub" or (np.dtype(dtype).kind == "i" and data.dtype.kind == "f"):
        raise FitsReadError(
            f"{path}[{name}]: the {what} has dtype {data.dtype}, but must be "
            + ("integer" if np.dtype(dtype).kind == "i" else "numeric")
        )
    return data.astype(dtype)  # a native dtype: this also swaps big-endian bytes


def mask_bits(path: str, h, shape) -> np.ndarray:
    """A mask HDU's data as int64 bit patterns (an int32's bit 31 stays bit 31, not a sign)."""
    data = load(path, h)
    if data is not None and data.dtype.kind == "i" and data.dtype.itemsize < 8:
        data = data.view(data.dtype.str.replace("i", "u"))
    return plane(path, h, "MASK", np.int64, data, shape=shape)


def strip(header, *patterns) -> fits.Header:
    """A copy of ``header`` without structural cards and cards matching ``patterns``."""
    out = header.copy(strip=True)
    for key in {
        k for k in out.keys() if k and any(p.match(k.upper()) for p in (STRUCTURAL, *patterns))
    }:
        out.remove(key, ignore_missing=True, remove_all=True)
    return out


def read_xy0(header) -> tuple[int, int]:
    """xy0 from LSST's 'A' pixel WCS (as afw reads it), else −LTV (if LTM is the identity), else
    0."""
    with contextlib.suppress(
        TypeError, ValueError, KeyError, OverflowError
    ):  # malformed cards: the origin
        if str(header.get("CTYPE1A", "")).upper().startswith("LINEAR") and "CRVAL1A" in header:
            return tuple(
                int(round(float(header[f"CRVAL{i}A"]) - float(header.get(f"CRPIX{i}A", 1.0)) + 1))
                for i in (1, 2)
            )  # type: ignore[return-value]
        ltm = [
            float(header.get(k, d))
            for k, d in (("LTM1_1", 1), ("LTM2_2", 1), ("LTM1_2", 0), ("LTM2_1", 0))
        ]
        if ltm == [1.0, 1.0, 0.0, 0.0]:
            return (
                -int(round(float(header.get("LTV1", 0)))),
                -int(round(float(header.get("LTV2", 0)))),
            )
    return (0, 0)


def write_xy0(header, xy0) -> None:
    """Write xy0 as ``LTV1/2`` = −x0, −y0 and as LSST's 'A' pixel WCS (``CRVAL1A`` = x0)."""
    x0, y0 = (int(v) for v in xy0)
    header["LTV1"], header["LTV2"] = (-x0, "-x0 (IRAF/LSST)"), (-y0, "-y0 (IRAF/LSST)")
    for i, v in ((1, x0), (2, y0)):
        header[f"CRVAL{i}A"] = (v, "xy0, LSST pixel WCS")
        header[f"CRPIX{i}A"], header[f"CTYPE{i}A"], header[f"CUNIT{i}A"] = 1.0, "LINEAR", "PIXEL"


def read_wcs(path: str, header, hdul=None):
    """The 2-D celestial WCS of ``header`` or ``None``; an unparsable WCS is ignored, with a
    warning."""
    from astropy.wcs import WCS

    if not any(k in header for k in ("CTYPE1", "CRVAL1", "CD1_1", "PC1_1")):
        return None  # no primary WCS (only the 'A' pixel-offset WCS, or none at all)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FITSFixedWarning chatter on real headers
            wcs = WCS(header, fobj=hdul, relax=True)
            wcs = wcs.celestial if wcs.has_celestial and wcs.naxis != 2 else wcs
        return wcs if wcs.has_celestial and wcs.naxis == 2 else None
    except Exception as exc:
        warnings.warn(
            f"{path}: ignoring unreadable WCS ({type(exc).__name__}: {exc})",
            FormatWarning,
            stacklevel=4,
        )
        return None


def read_photocalib(*headers) -> PhotoCalib:
    """``PHOTCAL``/``PHOTCALE`` of the first header that has them, else the identity."""
    for h in headers:
        if PHOTCAL_KEY in h:
            try:
                return PhotoCalib(
                    fget(h, PHOTCAL_KEY), fget(h, PHOTCAL_ERR_KEY) if PHOTCAL_ERR_KEY in h else 0.0
                )
            except (TypeError, ValueError, GpudiffError) as exc:
                raise InvalidInputError(f"bad {PHOTCAL_KEY}={h[PHOTCAL_KEY]!r} ({exc})") from exc
    return PhotoCalib()


def gain_from(header) -> float | None:
    """GAIN, else the mean of the per-amplifier GAINA/GAINB (DECam), if positive."""
    with contextlib.suppress(TypeError, ValueError):
        g = float(
            np.mean(
                [
                    float(header[k])
                    for k in (("GAIN",) if "GAIN" in header else ("GAINA", "GAINB"))
                    if k in header
                ]
                or [math.nan]
            )
        )
        return g if math.isfinite(g) and g > 0 else None
    return None


def fset(header, key: str, value: float, comment: str) -> None:
    """Set a float card; where its ≤ 20 characters round the value, add the exact hex to the
    comment."""
    value = float(value)
    if fits.Card.fromstring(fits.Card(key, value).image).value != value:
        comment = f"{comment} exact={value.hex()}"
    header[key] = (value, comment)


def fget(header, key: str) -> float:
    """A float card written by :func:`fset` (its exact hex when the comment has one)."""
    if key not in header:
        raise PsfError(f"header card {key} is missing")
    value, m = float(header[key]), re.search(r"exact=(\S+)", header.comments[key])
    with contextlib.suppress(ValueError):  # the exact hex, unless the comment is stale
        exact = float.fromhex(m.group(1)) if m else value
        return exact if math.isclose(exact, value, rel_tol=1e-12, abs_tol=1e-300) else value
    return value


def atomic_write_hdus(hdul: fits.HDUList, path, overwrite: bool) -> None:
    """Write ``hdul`` atomically (:func:`gpudiff.image.atomic.atomic_write`): never a
    truncated ``path``, and a failed overwrite keeps the old file."""

    def write(f):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # VerifyWarning about HIERARCH cards
            hdul.writeto(f, output_verify="fix", checksum=True)

    atomic_write(path, write, overwrite)
