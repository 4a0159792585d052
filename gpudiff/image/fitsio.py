"""FITS and ``CCDData`` I/O for exposures and PSFs: the I/O boundary of the image layer.

The layout written is LSST's: a data-less primary HDU (metadata, ``PHOTCAL`` = nJy per
image unit, ``PHOTCALE``); ``IMAGE`` (float32, with the WCS and xy0 as ``LTV1/LTV2`` =
−x0, −y0 and as LSST's 'A' pixel WCS: ``CTYPE1A = 'LINEAR'``, ``CRVAL1A`` = x0);
``MASK`` (int32, ``MP_<NAME> = bit`` cards, ``HIERARCH`` when long); ``VARIANCE``
(float32); ``PSF`` (+ ``PSFGRID``, see :func:`psf_to_hdus`).  Arrays leave this module native-endian
(FITS is big-endian, CuPy cannot take that); astropy objects never hold device arrays.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import warnings
from typing import Sequence

import numpy as np
from astropy.io import fits

from ..errors import BackendUnavailableError, FitsReadError, GpudiffError, InvalidInputError, PsfError
from .atomic import atomic_write
from .exposure import Exposure, PhotoCalib
from .maskplanes import MaskPlanes
from .psf import DoubleGaussianPsf, GaussianPsf, GridPsf, ImagePsf, MoffatPsf, Psf

__all__ = [
    "read_exposure", "write_exposure", "read_psf", "write_psf", "psf_to_hdus", "psf_from_hdus",
    "exposure_from_ccddata", "exposure_to_ccddata", "estimate_variance",
    "PHOTCAL_KEY", "PHOTCAL_ERR_KEY", "PSF_EXTNAME", "PSFGRID_EXTNAME",
]

PHOTCAL_KEY = "PHOTCAL"        #: primary-header card of PhotoCalib.calibration_mean (nJy/unit)
PHOTCAL_ERR_KEY = "PHOTCALE"   #: primary-header card of PhotoCalib.calibration_err
PSF_EXTNAME = "PSF"
PSFGRID_EXTNAME = "PSFGRID"
_PSF_NAMES = (PSF_EXTNAME, "PSFIMAGE")  # ours, then astropy CCDData's

# Cards that describe an HDU rather than the observation: never carried as metadata.
_STRUCTURAL = re.compile(
    r"^(SIMPLE|BITPIX|NAXIS\d*|EXTEND|XTENSION|PCOUNT|GCOUNT|EXTNAME|EXTVER|EXTLEVEL|EXTTYPE"
    r"|INHERIT|BSCALE|BZERO|BLANK|CHECKSUM|DATASUM|UTYPE|PHOTCALE?)$")
# xy0 cards (IRAF/LSST LTV, LSST's 'A' pixel WCS): they become MaskedImage.xy0.
_XY0_KEYS = re.compile(r"^(LTV[12]|LTM[12]_[12]|(CRVAL|CRPIX|CTYPE|CUNIT|CDELT)[12]A|WCSNAMEA)$")
_MP_KEYS = re.compile(r"^MP_")
# Celestial WCS cards: held by Exposure.wcs, so dropped from the metadata of 1-HDU files.
_WCS_KEYS = re.compile(r"^((WCSAXES|(CRPIX|CRVAL|CDELT|CTYPE|CUNIT|CROTA)\d+|(CD|PC|PV|PS)\d+_\d+|LONPOLE"
                       r"|LATPOLE|RADESYS|EQUINOX|WCSNAME)[A-Z]?|RADECSYS|MJDREF|DATEREF|WCSDIM|WAT\d_\d+"
                       r"|[AB]P?_(ORDER|DMAX|\d+_\d+))$")


@contextlib.contextmanager
def _open(path: str):
    """Open ``path`` with every header parsed now; any failure becomes a FitsReadError."""
    if not os.path.isfile(path):
        raise FitsReadError(f"{path}: " + ("not a regular file" if os.path.exists(path) else "no such file"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:  # memmap=False: short data fail when read; lazy_load_hdus=False: cut headers show now
            hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
        except Exception as exc:
            raise FitsReadError(f"{path}: not a readable FITS file ({type(exc).__name__}: {exc})") from exc
    for w in caught:
        if any(word in str(w.message).lower() for word in ("truncated", "corrupt")):
            hdul.close()  # astropy only warns and drops the damaged HDUs: refuse the file
            raise FitsReadError(f"{path}: FITS file is truncated or corrupt ({w.message})")
        warnings.warn(f"{path}: {w.message}", w.category, stacklevel=4)
    with hdul:
        yield hdul


def _hdu_list(hdul) -> str:
    return "[" + ", ".join(f"{i}:{h.name or '(unnamed)'}" for i, h in enumerate(hdul)) + "]"


def _has_image(h) -> bool:
    return isinstance(h, (fits.PrimaryHDU, fits.ImageHDU)) and h.header.get("NAXIS", 0) > 0


def _load(path: str, h) -> np.ndarray | None:
    """The data of HDU ``h``, read now so that truncation or corruption shows here."""
    try:
        return None if h.data is None else np.asarray(h.data)
    except Exception as exc:
        raise FitsReadError(f"{path}[{h.name}]: cannot read the data, the file is truncated or corrupt "
                            f"({type(exc).__name__}: {exc})") from exc


def _plane(path: str, h, what: str, dtype, data=None, shape=None) -> np.ndarray:
    """2-D data of HDU ``h`` as a native ``dtype`` copy (leading length-1 axes dropped)."""
    data = _load(path, h) if data is None else data
    if data is None:
        raise FitsReadError(f"{path}[{h.name}]: the {what} HDU has no data")
    while data.ndim > 2 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise FitsReadError(f"{path}[{h.name}]: the {what} must be 2-D, got shape {data.shape}")
    if shape is not None and data.shape != shape:
        raise FitsReadError(f"{path}[{h.name}]: shape {data.shape} differs from the image shape {shape}")
    if data.dtype.kind not in "fiub" or (np.dtype(dtype).kind == "i" and data.dtype.kind == "f"):
        raise FitsReadError(f"{path}[{h.name}]: the {what} has dtype {data.dtype}, but must be "
                            + ("integer" if np.dtype(dtype).kind == "i" else "numeric"))
    return data.astype(dtype)  # a native dtype: this also swaps big-endian bytes


def _strip(header, *patterns) -> fits.Header:
    """A copy of ``header`` without structural cards and cards matching ``patterns``."""
    out = header.copy(strip=True)
    for key in {k for k in out.keys() if k and any(p.match(k.upper()) for p in (_STRUCTURAL, *patterns))}:
        out.remove(key, ignore_missing=True, remove_all=True)
    return out


def _read_xy0(header) -> tuple[int, int]:
    """xy0 from LSST's 'A' pixel WCS (as afw reads it), else −LTV (if LTM is the identity), else 0."""
    with contextlib.suppress(TypeError, ValueError, KeyError, OverflowError):  # malformed cards: the origin
        if str(header.get("CTYPE1A", "")).upper().startswith("LINEAR") and "CRVAL1A" in header:
            return tuple(int(round(float(header[f"CRVAL{i}A"]) - float(header.get(f"CRPIX{i}A", 1.0)) + 1))
                         for i in (1, 2))  # type: ignore[return-value]
        ltm = [float(header.get(k, d)) for k, d in (("LTM1_1", 1), ("LTM2_2", 1), ("LTM1_2", 0), ("LTM2_1", 0))]
        if ltm == [1.0, 1.0, 0.0, 0.0]:
            return (-int(round(float(header.get("LTV1", 0)))), -int(round(float(header.get("LTV2", 0)))))
    return (0, 0)


def _write_xy0(header, xy0) -> None:
    x0, y0 = (int(v) for v in xy0)
    header["LTV1"], header["LTV2"] = (-x0, "-x0 (IRAF/LSST)"), (-y0, "-y0 (IRAF/LSST)")
    for i, v in ((1, x0), (2, y0)):
        header[f"CRVAL{i}A"] = (v, "xy0, LSST pixel WCS")
        header[f"CRPIX{i}A"], header[f"CTYPE{i}A"], header[f"CUNIT{i}A"] = 1.0, "LINEAR", "PIXEL"


def _read_wcs(path: str, header, hdul=None):
    """The 2-D celestial WCS of ``header`` or ``None``; an unparsable WCS is ignored, with a warning."""
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
        warnings.warn(f"{path}: ignoring unreadable WCS ({type(exc).__name__}: {exc})", stacklevel=4)
        return None


def _read_photocalib(*headers) -> PhotoCalib:
    for h in headers:
        if PHOTCAL_KEY in h:
            try:
                return PhotoCalib(_fget(h, PHOTCAL_KEY), _fget(h, PHOTCAL_ERR_KEY) if PHOTCAL_ERR_KEY in h else 0.0)
            except (TypeError, ValueError, GpudiffError) as exc:
                raise InvalidInputError(f"bad {PHOTCAL_KEY}={h[PHOTCAL_KEY]!r} ({exc})") from exc
    return PhotoCalib()


def _gain_from(header) -> float | None:
    """GAIN, else the mean of the per-amplifier GAINA/GAINB (DECam), if positive."""
    with contextlib.suppress(TypeError, ValueError):
        g = float(np.mean([float(header[k]) for k in (("GAIN",) if "GAIN" in header else ("GAINA", "GAINB"))
                           if k in header] or [math.nan]))
        return g if math.isfinite(g) and g > 0 else None
    return None


def estimate_variance(image, gain: float | None = None) -> tuple[np.ndarray, float, float]:
    """Estimate the variance of an image: σ_sky² + max(image − sky, 0)/gain, +inf where non-finite.

    The Poisson term needs ``gain`` (e⁻/ADU).  ``sky`` and ``σ_sky`` are the median and the
    ``mad_std`` of the finite pixels iteratively clipped at 3.5σ: ≈0.6 % low in σ² for pure
    noise (3σ is ≈2.6 % low), while clipping most source wings (4σ is ≈2 % high on a field).

    Returns
    -------
    variance : float32 array
    sky, sigma : float (NaN when no pixel is finite)
    """
    from astropy.stats import sigma_clipped_stats
    img = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(img)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no finite pixel: NaN statistics, and all variance +inf below
        _, sky, sigma = sigma_clipped_stats(img[finite], sigma=3.5, maxiters=10, cenfunc="median", stdfunc="mad_std")
    var = np.full(img.shape, float(sigma) ** 2)
    if gain is not None:
        var[finite] += np.clip(img[finite] - sky, 0.0, None) / float(gain)
    var[~finite] = np.inf
    return var.astype(np.float32), float(sky), float(sigma)


def _assemble(image, unc, kind, flags, bad, header, meta, gain, backend, **kwargs) -> Exposure:
    """CCDData/plain tail: σ/σ²/1/σ² (``kind`` std/var/ivar; None: estimated), flags + bad → BAD, NO_DATA."""
    planes = MaskPlanes.from_header(header)
    mask = np.zeros(image.shape, np.int32) if flags is None else flags
    if bad is not None:
        planes.add("BAD")
        mask[bad & (mask == 0)] |= np.int32(planes.bitmask("BAD"))
    if unc is not None:
        with np.errstate(divide="ignore", invalid="ignore"):  # ivar <= 0 means no data: +inf
            variance = (unc * unc if kind == "std" else unc if kind == "var" else
                        np.where(unc > 0, 1.0 / unc, np.inf)).astype(np.float32)
    else:
        g = gain if gain is not None else _gain_from(header)
        variance, sky, sigma = estimate_variance(image, g)
        meta["GDVAREST"] = ("sky+poisson" if g else "sky", "variance estimated by gpudiff")
        for key, v, what in (("GDSKYLEV", sky, "sky level"), ("GDSKYSIG", sigma, "sky noise"), ("GDGAIN", g, "gain")):
            if v is not None and math.isfinite(v):  # FITS cards cannot hold NaN
                meta[key] = (v, f"{what} of the estimated variance")
    # A pixel without a finite value or without a usable (> 0, finite) uncertainty carries no
    # information: flag it NO_DATA rather than hand a task an unmasked zero/inf variance.
    with np.errstate(invalid="ignore"):
        nodata = ~np.isfinite(image) | ~(np.isfinite(variance) & (variance > 0))
    if nodata.any():
        planes.add("NO_DATA")
        mask[nodata] |= np.int32(planes.bitmask("NO_DATA"))
        image[nodata], variance[nodata] = np.nan, np.inf
    return Exposure.from_arrays(image, variance, mask, xy0=_read_xy0(header), mask_planes=planes,
                                metadata=meta, backend=backend, **kwargs)


def _fset(header, key: str, value: float, comment: str) -> None:
    """Set a float card; where its ≤ 20 characters round the value, add the exact hex to the comment."""
    value = float(value)
    if fits.Card.fromstring(fits.Card(key, value).image).value != value:
        comment = f"{comment} exact={value.hex()}"
    header[key] = (value, comment)


def _fget(header, key: str) -> float:
    if key not in header:
        raise PsfError(f"header card {key} is missing")
    value, m = float(header[key]), re.search(r"exact=(\S+)", header.comments[key])
    with contextlib.suppress(ValueError):  # the exact hex, unless the comment is stale
        exact = float.fromhex(m.group(1)) if m else value
        return exact if math.isclose(exact, value, rel_tol=1e-12, abs_tol=1e-300) else value
    return value


_ANALYTIC = {GaussianPsf: ("GAUSSIAN", ("PSFSIGX", "sigma"), ("PSFSIGY", "sigma_y"), ("PSFTHETA", "theta")),
             DoubleGaussianPsf: ("DOUBLEGAUSSIAN", ("PSFSIG1", "sigma1"), ("PSFSIG2", "sigma2"), ("PSFB", "b")),
             MoffatPsf: ("MOFFAT", ("PSFFWHM", "profile_fwhm"), ("PSFBETA", "beta"))}


def psf_to_hdus(psf: Psf) -> list:
    """Serialize a PSF model into FITS HDUs, losslessly for every gpudiff model.

    The ``PSF`` HDU holds a float64 image any reader can use (the kernel image at the
    average position, ``ImagePsf.image``, or the (ny, nx, s, s) cube of ``GridPsf``) and
    ``PSFTYPE``: ``GAUSSIAN`` (``PSFSIGX``, ``PSFSIGY``, ``PSFTHETA``), ``DOUBLEGAUSSIAN``
    (``PSFSIG1``, ``PSFSIG2``, ``PSFB``), ``MOFFAT`` (``PSFFWHM``, ``PSFBETA``) — these with
    ``PSFSIZE``, ``PSFOVSMP`` —, ``IMAGE``, or ``GRID`` with a one-row table HDU ``PSFGRID``
    (columns ``XS``, ``YS``); all but ``GRID`` have ``PSFAVGX/Y``.  Floats that a card would
    round get ``exact=<hex>`` in the comment.  Other ``Psf`` types: ``IMAGE``, lossy, warned.
    """
    hdr, extra = fits.Header(), []
    spec = _ANALYTIC.get(type(psf))
    if spec is not None:
        data, hdr["PSFTYPE"] = psf.kernel_image(), spec[0]
        for key, attr in spec[1:]:
            _fset(hdr, key, getattr(psf, attr), "")
        hdr["PSFSIZE"], hdr["PSFOVSMP"] = psf.size, psf.oversample
    elif isinstance(psf, GridPsf):
        data, hdr["PSFTYPE"] = psf.images, "GRID"
        extra.append(fits.BinTableHDU.from_columns(
            [fits.Column("XS", f"{psf.xs.size}D", array=psf.xs[None, :]),
             fits.Column("YS", f"{psf.ys.size}D", array=psf.ys[None, :])], name=PSFGRID_EXTNAME))
    elif isinstance(psf, ImagePsf):
        data, hdr["PSFTYPE"] = psf.image, "IMAGE"
    elif isinstance(psf, Psf):
        warnings.warn(f"{type(psf).__name__} has no FITS form; writing its kernel image (lossy)", stacklevel=2)
        data, hdr["PSFTYPE"] = psf.kernel_image(), "IMAGE"
    else:
        raise InvalidInputError(f"psf_to_hdus needs a gpudiff Psf, got {type(psf).__name__}")
    if not isinstance(psf, GridPsf):
        for key, v in zip(("PSFAVGX", "PSFAVGY"), psf.average_position):
            _fset(hdr, key, v, "[pix]")
    return [fits.ImageHDU(np.asarray(data, dtype=np.float64), hdr, name=PSF_EXTNAME), *extra]


def _exact(psf: Psf, attr: str, data: np.ndarray) -> Psf:
    # The constructors renormalize to unit sum; dividing by a sum of 1 ± 1 ulp can flip
    # last bits, so put back the stored, already normalized values verbatim.
    if getattr(psf, attr).shape == data.shape and np.allclose(data.sum(axis=(-2, -1)), 1.0, rtol=1e-12):
        setattr(psf, attr, data.copy())
    return psf


def _decode_psf(h, grid_hdu=None) -> Psf:
    hdr = h.header
    data = None if h.data is None else np.asarray(h.data).astype(np.float64)
    kind = str(hdr.get("PSFTYPE", "")).strip().upper()
    avg = (_fget(hdr, "PSFAVGX"), _fget(hdr, "PSFAVGY")) if "PSFAVGX" in hdr else (0.0, 0.0)
    for cls, (name, *cards) in _ANALYTIC.items():
        if kind == name:
            params = {attr.replace("profile_", ""): _fget(hdr, key) for key, attr in cards}  # Moffat: fwhm=
            return cls(**params, size=int(hdr["PSFSIZE"]), oversample=int(hdr.get("PSFOVSMP", 1)),
                       average_position=avg)
    if kind == "GRID":
        if grid_hdu is None or data is None or data.ndim != 4:
            raise PsfError(f"PSFTYPE=GRID needs 4-D data and a {PSFGRID_EXTNAME} table HDU")
        xs, ys = (np.asarray(grid_hdu.data[c][0], dtype=np.float64).ravel() for c in ("XS", "YS"))
        return _exact(GridPsf(data, xs, ys), "images", data)
    if kind not in ("IMAGE", ""):
        raise PsfError(f"unknown PSFTYPE {kind!r}")
    while data is not None and data.ndim > 2 and data.shape[0] == 1:
        data = data[0]
    if data is None or data.ndim != 2:  # IMAGE, or a foreign PSF image without PSFTYPE
        raise PsfError(f"a PSF image must be 2-D, got {'no data' if data is None else data.shape}")
    return _exact(ImagePsf(data, average_position=avg), "image", data)


def psf_from_hdus(hdul: Sequence) -> Psf | None:
    """Rebuild the PSF of :func:`psf_to_hdus` from an HDU list; ``None`` if it has none.

    Uses the ``PSF`` HDU, else CCDData's ``PSFIMAGE``; without ``PSFTYPE`` (a foreign
    file) its 2-D data become an :class:`ImagePsf`.  Raises :class:`PsfError` if malformed.
    """
    by_name = {str(h.name).upper(): h for h in reversed(list(hdul))}  # the first of each name wins
    h = next((by_name[n] for n in _PSF_NAMES if n in by_name), None)
    if h is None:
        return None
    try:
        return _decode_psf(h, by_name.get(PSFGRID_EXTNAME))
    except Exception as exc:  # PsfError, a missing table column, a non-numeric card, ...
        raise PsfError(f"malformed {h.name} HDU ({type(exc).__name__}: {exc})") from exc


def read_psf(path) -> Psf:
    """Read a PSF FITS file: the ``PSF`` HDU (:func:`write_psf`), else WebbPSF's ``DET_SAMP``,
    else ``PSFIMAGE``, else the first image (a WebbPSF primary → :class:`ImagePsf`).

    Raises :class:`FitsReadError` for a missing, unreadable or truncated file, no image, or
    a malformed PSF.
    """
    path = os.fspath(path)
    with _open(path) as hdul:
        names = [str(h.name).upper() for h in hdul]
        pick = next((names.index(n) for n in (PSF_EXTNAME, "DET_SAMP", "PSFIMAGE") if n in names),
                    next((i for i, h in enumerate(hdul) if _has_image(h)), None))
        if pick is None or _load(path, hdul[pick]) is None:
            raise FitsReadError(f"{path}: no HDU with a PSF image; the HDUs are {_hdu_list(hdul)}")
        try:
            return _decode_psf(hdul[pick], hdul[PSFGRID_EXTNAME] if PSFGRID_EXTNAME in names else None)
        except Exception as exc:
            raise FitsReadError(f"{path}[{hdul[pick].name}]: not a usable PSF ({exc})") from exc


def _atomic_write(hdul: fits.HDUList, path, overwrite: bool) -> None:
    """Write ``hdul`` atomically (:func:`gpudiff.image.atomic.atomic_write`): never a
    truncated ``path``, and a failed overwrite keeps the old file."""
    def write(f):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # VerifyWarning about HIERARCH cards
            hdul.writeto(f, output_verify="fix", checksum=True)

    atomic_write(path, write, overwrite)


def write_psf(path, psf: Psf, overwrite: bool = False) -> None:
    """Write ``psf`` alone, atomically: its ``PSF`` HDU as the primary HDU (plus ``PSFGRID``)."""
    first, *rest = psf_to_hdus(psf)
    primary = fits.PrimaryHDU(first.data, _strip(first.header))
    primary.header["EXTNAME"] = PSF_EXTNAME
    _atomic_write(fits.HDUList([primary, *rest]), path, overwrite)


def write_exposure(path, exposure: Exposure, overwrite: bool = False) -> None:
    """Write ``exposure`` in the LSST-style layout (module docstring), atomically.

    ``IMAGE``, ``MASK`` and ``VARIANCE`` each carry the WCS and xy0 cards; device arrays
    are copied to the host.  The file is written under a temporary name beside ``path``
    and renamed into place, so ``path`` is never left half-written.

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
    for card in _strip(exposure.metadata).cards:
        primary.header.append(card, end=True)  # extend() would regroup COMMENT/HISTORY cards
    _fset(primary.header, PHOTCAL_KEY, exposure.photo_calib.calibration_mean, "[nJy/unit]")
    _fset(primary.header, PHOTCAL_ERR_KEY, exposure.photo_calib.calibration_err, "[nJy/unit]")
    common = fits.Header()
    if exposure.wcs is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            common.extend(exposure.wcs.to_header(relax=True))  # relax keeps '-SIP' and its terms
    _write_xy0(common, exposure.xy0)
    mask_hdr = common.copy()
    exposure.mask_planes.to_header(mask_hdr)
    planes = (("IMAGE", exposure.image, np.float32, common), ("MASK", exposure.mask, np.int32, mask_hdr),
              ("VARIANCE", exposure.variance, np.float32, common))
    hdus = [primary] + [fits.ImageHDU(np.asarray(be.asnumpy(a), dtype=t), h, name=n) for n, a, t, h in planes]
    _atomic_write(fits.HDUList(hdus + (psf_to_hdus(exposure.psf) if exposure.psf is not None else [])),
                  path, overwrite)


def read_exposure(path, *, hdu=None, gain: float | None = None, backend=None) -> Exposure:
    """Read an exposure from a FITS file, recognizing its layout.

    **LSST** (an ``IMAGE`` HDU): ``IMAGE``, ``MASK`` (integer; planes from ``MP_*`` cards,
    else LSST's defaults), ``VARIANCE``, optional ``PSF`` (:func:`psf_from_hdus`); WCS and
    xy0 from the ``IMAGE`` header, ``PHOTCAL``/``PHOTCALE`` and metadata from the primary.
    **CCDData** (``UNCERT``, ``MASK`` or ``PSFIMAGE`` HDUs): pixels in the first image HDU,
    its header completed by the primary's, as astropy reads it; ``UNCERT`` by ``UTYPE``:
    ``StdDevUncertainty`` (default) → σ², ``VarianceUncertainty``, ``InverseVariance`` →
    1/ivar (+inf where ≤ 0); nonzero ``MASK`` → ``BAD``; an integer ``FLAGS`` HDU
    (``CCDData.write(hdu_flags='FLAGS')``) is the bit mask; ``PSFIMAGE`` → :class:`ImagePsf`.
    **Plain image** (e.g. JWST ``SCI``, a DECam cutout): the first HDU with 2-D data.  Its
    variance (and that of a CCDData file without ``UNCERT``) is :func:`estimate_variance`'s
    (robust sky noise)² + max(image − sky, 0)/gain, the latter with ``gain`` or a ``GAIN``
    card (else mean ``GAINA``/``GAINB``); cards ``GDVAREST``, ``GDSKYLEV``, ``GDSKYSIG``,
    ``GDGAIN`` record it.  Non-finite pixels of these two layouts get ``NO_DATA``, a NaN
    image and +inf variance (LSST's no-data convention); their metadata lose the WCS,
    xy0 and ``MP_*`` cards.  xy0 is read from LSST's 'A' pixel WCS (``CRVAL1A/2A``,
    ``CTYPE1A = 'LINEAR'``), else as −``LTV1/LTV2``, else (0, 0).  Image and variance come
    back float32, the mask int32, all native-endian.

    Parameters
    ----------
    path : str or path-like
    hdu : int, str or (str, int), optional
        The HDU holding the pixels (``'IMAGE'`` or None for the LSST layout).
    gain : float, optional
        e⁻/ADU for an estimated variance; overrides the header.
    backend : Backend or str, optional

    Raises
    ------
    FitsReadError
        Missing, non-FITS, truncated or corrupt file; unknown ``hdu`` (the HDUs are
        listed); inconsistent layout (``IMAGE`` without ``VARIANCE``, differing shapes,
        non-2-D data, float ``MASK``, bad PSF).  Messages name the file and HDU.
    InvalidInputError
        ``gain`` is not a positive number.
    """
    path = os.fspath(path)
    if gain is not None and not (isinstance(gain, (int, float, np.number)) and math.isfinite(gain) and gain > 0):
        raise InvalidInputError(f"gain must be a positive number of e-/ADU, got {gain!r}")
    try:
        with _open(path) as hdul:
            names = [str(h.name).upper() for h in hdul]
            try:
                idx = None if hdu is None else hdul.index_of(hdu)
            except (KeyError, IndexError, TypeError, ValueError):
                raise FitsReadError(f"{path}: no HDU {hdu!r}; the HDUs are {_hdu_list(hdul)}") from None
            if "IMAGE" in names and (idx is None or names[idx] == "IMAGE"):
                return _read_lsst(path, hdul, names, backend)
            if "VARIANCE" in names and "IMAGE" not in names and idx is None:
                raise FitsReadError(f"{path}: a VARIANCE HDU but no IMAGE HDU; the HDUs are {_hdu_list(hdul)}")
            return _read_single(path, hdul, names, idx, gain, backend)
    except (FitsReadError, BackendUnavailableError):
        raise
    except GpudiffError as exc:  # a bad PSF, MP_ card or PHOTCAL: name the file
        raise FitsReadError(f"{path}: {exc}") from exc
    except Exception as exc:  # nothing raw from astropy or numpy escapes
        raise FitsReadError(f"{path}: cannot read an exposure ({type(exc).__name__}: {exc})") from exc


def _read_lsst(path: str, hdul, names: list[str], backend) -> Exposure:
    if "VARIANCE" not in names:
        raise FitsReadError(f"{path}[IMAGE]: an IMAGE HDU without a VARIANCE HDU (the LSST layout "
                            f"needs IMAGE, MASK, VARIANCE); the HDUs are {_hdu_list(hdul)}")
    img_hdu, primary = hdul["IMAGE"], hdul[0].header
    image = _plane(path, img_hdu, "IMAGE", np.float32)
    variance = _plane(path, hdul["VARIANCE"], "VARIANCE", np.float32, shape=image.shape)
    planes, mask = MaskPlanes(), np.zeros(image.shape, np.int32)
    if "MASK" in names:
        mask = _plane(path, hdul["MASK"], "MASK", np.int32, shape=image.shape)
        planes = MaskPlanes.from_header(hdul["MASK"].header)
    return Exposure.from_arrays(
        image, variance, mask, xy0=_read_xy0(img_hdu.header), mask_planes=planes, psf=psf_from_hdus(hdul),
        wcs=_read_wcs(path, img_hdu.header, hdul), photo_calib=_read_photocalib(primary, img_hdu.header),
        metadata=_strip(primary), backend=backend)


def _read_single(path: str, hdul, names: list[str], idx, gain, backend) -> Exposure:
    """The CCDData and plain layouts: one pixel HDU, optional UNCERT/MASK/FLAGS/PSF HDUs."""
    aux = {"MASK", "UNCERT", "FLAGS", *_PSF_NAMES, PSFGRID_EXTNAME}
    if idx is None:
        idx = next((i for i, h in enumerate(hdul) if _has_image(h) and names[i] not in aux
                    and len(h.shape) >= 2 and sum(n > 1 for n in h.shape[:-2]) == 0), None)
        if idx is None:
            raise FitsReadError(f"{path}: no HDU with 2-D image data; the HDUs are {_hdu_list(hdul)}")
    h = hdul[idx]
    header = h.header.copy()
    if idx != 0:  # as astropy's CCDData reader: the primary fills in missing cards
        header.extend(hdul[0].header.copy(strip=True), unique=True)
    raw = _load(path, h)
    image = _plane(path, h, f"image (HDU {idx})", np.float32, raw)
    if raw.dtype.kind in "iu" and "BLANK" in h.header:  # unscaled integers: BLANK marks no data
        image[raw.reshape(image.shape) == h.header["BLANK"]] = np.nan
    flags = bad = unc = kind = None
    if "FLAGS" in names:
        flags = _plane(path, hdul["FLAGS"], "FLAGS", np.int32, shape=image.shape)
    if "MASK" in names:  # astropy's semantics: any nonzero value is masked
        bad = _plane(path, hdul["MASK"], "MASK", bool, shape=image.shape)
    if "UNCERT" in names:
        unc = _plane(path, hdul["UNCERT"], "UNCERT", np.float64, shape=image.shape)
        kind = {"VarianceUncertainty": "var", "InverseVariance": "ivar"}.get(hdul["UNCERT"].header.get("UTYPE"), "std")
    wcs = _read_wcs(path, header, hdul)
    meta = _strip(header, _XY0_KEYS, _MP_KEYS, *([_WCS_KEYS] if wcs is not None else []))
    return _assemble(image, unc, kind, flags, bad, header, meta, gain, backend, wcs=wcs, psf=psf_from_hdus(hdul),
                     photo_calib=_read_photocalib(hdul[0].header, header))


def exposure_from_ccddata(ccd, psf: Psf | None = None, *, gain: float | None = None, backend=None) -> Exposure:
    """Build an Exposure from an ``astropy.nddata.CCDData``.

    The uncertainty becomes a variance by type (std → σ², var, ivar → 1/ivar) in the data's
    unit; without one it is estimated as for a plain image (:func:`read_exposure`).  An
    integer ``ccd.flags`` is the bit mask, named by ``MP_*`` cards in ``meta``; ``ccd.mask``
    sets ``BAD`` where no bit is; non-finite pixels get ``NO_DATA``.  ``ccd.psf`` becomes an
    :class:`ImagePsf` unless ``psf`` is given; ``meta`` (less xy0, ``MP_*``, ``PHOTCAL``
    cards) the metadata, with ``BUNIT`` from ``ccd.unit``.
    """
    from astropy import units as u
    header = ccd.meta.copy() if isinstance(ccd.meta, fits.Header) else fits.Header()
    for k, v in ({} if isinstance(ccd.meta, fits.Header) else ccd.meta or {}).items():
        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header[str(k)] = v  # values a FITS card cannot hold are dropped
    image = np.array(np.asarray(ccd.data), dtype=np.float32)
    flags = getattr(ccd, "flags", None)
    flags = flags.astype(np.int32) if (isinstance(flags, np.ndarray) and flags.dtype.kind in "iu"
                                       and flags.shape == image.shape) else None
    bad = None if ccd.mask is None else np.array(ccd.mask, dtype=bool)
    arr, kind, unc = None, None, ccd.uncertainty
    if unc is not None:
        kind = getattr(unc, "uncertainty_type", "")
        if kind not in ("std", "var", "ivar"):
            raise InvalidInputError(f"CCDData uncertainty type {kind!r} cannot be turned into a variance")
        arr = np.asarray(unc.array, dtype=np.float64)
        if unc.unit is not None and ccd.unit is not None:  # e.g. a std in mJy for data in Jy
            try:
                arr = arr * (1.0 * unc.unit).to_value(ccd.unit ** {"std": 1, "var": 2, "ivar": -2}[kind])
            except u.UnitConversionError as exc:
                raise InvalidInputError(f"CCDData uncertainty unit {unc.unit} does not fit unit {ccd.unit}") from exc
    meta = _strip(header, _XY0_KEYS, _MP_KEYS)
    if ccd.unit is not None and ccd.unit != u.dimensionless_unscaled:
        meta["BUNIT"] = ccd.unit.to_string()
    if psf is None and getattr(ccd, "psf", None) is not None:
        psf = ImagePsf(np.asarray(ccd.psf, dtype=np.float64))
    wcs = copy.deepcopy(ccd.wcs) if ccd.wcs is not None and ccd.wcs.has_celestial else None
    return _assemble(image, arr, kind, flags, bad, header, meta, gain, backend, wcs=wcs, psf=psf,
                     photo_calib=_read_photocalib(header))


def exposure_to_ccddata(exposure: Exposure):
    """Convert to an ``astropy.nddata.CCDData`` (host arrays).

    ``uncertainty`` is a float64 ``StdDevUncertainty`` √variance, ``mask`` the boolean
    ``mask != 0``, ``flags`` the int32 bits; ``meta`` adds the ``MP_*``, ``PHOTCAL*`` and
    xy0 cards; ``psf`` is the kernel image; ``unit`` is ``BUNIT``, else ``adu``.
    :func:`exposure_from_ccddata` restores all but an analytic PSF's type.  The boolean
    mask loses the bits: ``CCDData.write`` keeps them only with ``hdu_flags='FLAGS'``.
    """
    from astropy import units as u
    from astropy.nddata import CCDData, StdDevUncertainty
    be = exposure.backend
    meta = exposure.metadata.copy()
    exposure.mask_planes.to_header(meta)
    _fset(meta, PHOTCAL_KEY, exposure.photo_calib.calibration_mean, "[nJy/unit]")
    _fset(meta, PHOTCAL_ERR_KEY, exposure.photo_calib.calibration_err, "[nJy/unit]")
    _write_xy0(meta, exposure.xy0)
    unit = u.Unit(str(meta.get("BUNIT", "adu")).strip() or "adu", parse_strict="silent")
    mask = np.array(be.asnumpy(exposure.mask), dtype=np.int32)
    with np.errstate(invalid="ignore"):
        std = np.sqrt(np.asarray(be.asnumpy(exposure.variance), dtype=np.float64))
    ccd = CCDData(np.array(be.asnumpy(exposure.image), dtype=np.float32), unit=unit, meta=meta,
                  uncertainty=StdDevUncertainty(std), mask=mask != 0, wcs=copy.deepcopy(exposure.wcs))
    ccd.flags = mask
    if exposure.psf is not None:
        ccd.psf = exposure.psf.kernel_image()
    return ccd
