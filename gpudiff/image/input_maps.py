"""Noise maps and masks handed beside an image (:mod:`gpudiff.image.inputs`).

Noise maps: ``sigma`` (1σ per pixel, e.g. JWST ``ERR``), ``variance`` or ``ivar``
(inverse variance, e.g. a ``WHT`` map).  The caller's option says which it expects; the
file's header, when it says what it is, wins: ``UTYPE`` (``StdDevUncertainty`` /
``VarianceUncertainty`` / ``InverseVariance``, astropy's CCDData), then ``EXTNAME``
(``ERR``/``SIGMA``/``RMS``/... ; ``VAR*``/``VARIANCE``; ``WHT``/``IVAR``/``INVVAR``/
``WEIGHT``), then ``BUNIT`` compared with the image's ``BUNIT`` (same unit: σ; squared:
variance; inverse square: inverse variance).  Pixels whose σ or variance is not finite and
> 0 (inverse variance ≤ 0) get +inf variance.

Masks: the first 2-D HDU of integer (or integral-valued float) pixels.  Bits are named by
the caller (``"BAD=0,SAT=1"`` or a mapping), else by the file's ``MP_*`` cards; without
either, every nonzero pixel is ``BAD`` (astropy's convention).  A set bit that no name
covers is kept as plane ``BIT<n>`` and a warning says so.

Also the two FITS helpers every input reader uses (:func:`open_input`,
:func:`image_hdus`), shared with the PSF files of :mod:`gpudiff.image.input_psf`.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Mapping

import numpy as np
from astropy.io import fits

from ..errors import FitsReadError, InvalidInputError
from .maskplanes import MAX_MASK_PLANES, MaskPlanes

__all__ = [
    "NOISE_KINDS",
    "image_hdus",
    "mask_from_array",
    "noise_to_variance",
    "open_input",
    "parse_mask_bits",
    "read_mask",
    "read_noise_map",
]

#: What a noise map holds.
NOISE_KINDS = ("sigma", "variance", "ivar")

_SIGMA_NAMES = {"ERR", "ERROR", "SIGMA", "NOISE", "STD", "STDDEV", "RMS", "UNCERT", "SIG"}
_VAR_NAMES = {"VAR", "VARIANCE", "VAR_POISSON", "VAR_RNOISE", "VAR_FLAT"}
_IVAR_NAMES = {"WHT", "IVAR", "INVVAR", "INV_VAR", "IVM", "WEIGHT", "WEIGHTS"}
_UTYPES = {
    "StdDevUncertainty": "sigma",
    "VarianceUncertainty": "variance",
    "InverseVariance": "ivar",
}


def open_input(path: str):
    """Open a FITS file a user hands over, in memory (``memmap=False``).

    Parameters
    ----------
    path : str
        The file.

    Returns
    -------
    astropy.io.fits.HDUList
        To be used as a context manager.

    Raises
    ------
    FitsReadError
        Missing, not a regular file, or not readable as FITS (nothing raw from astropy
        escapes).
    """
    if not os.path.isfile(path):
        raise FitsReadError(
            f"{path}: " + ("not a regular file" if os.path.exists(path) else "no such file")
        )
    try:
        return fits.open(path, memmap=False)
    except Exception as exc:  # noqa: BLE001  (nothing raw from astropy escapes)
        raise FitsReadError(
            f"{path}: not a readable FITS file ({type(exc).__name__}: {exc})"
        ) from None


def image_hdus(hdul) -> list:
    """The image HDUs of ``hdul`` that hold data, in file order.

    Parameters
    ----------
    hdul : astropy.io.fits.HDUList

    Returns
    -------
    list of HDU
    """
    return [h for h in hdul if getattr(h, "is_image", False) and h.data is not None]


# --- noise maps ---------------------------------------------------------------------------
def _unit_kind(bunit: str | None, image_bunit: str | None) -> str | None:
    if not bunit or not image_bunit:
        return None
    import astropy.units as u

    try:
        un, ui = (
            u.Unit(str(bunit), parse_strict="silent"),
            u.Unit(str(image_bunit), parse_strict="silent"),
        )
        if isinstance(un, u.UnrecognizedUnit) or isinstance(ui, u.UnrecognizedUnit):
            return None
        if un == ui:
            return "sigma"
        if un == ui**2:
            return "variance"
        if un == ui**-2:
            return "ivar"
    except (ValueError, TypeError):
        return None
    return None


def _header_kind(header, image_bunit: str | None) -> tuple[str | None, str]:
    utype = str(header.get("UTYPE", "")).strip()
    if utype in _UTYPES:
        return _UTYPES[utype], f"UTYPE={utype}"
    ext = str(header.get("EXTNAME", "")).strip().upper()
    for names, kind in ((_SIGMA_NAMES, "sigma"), (_VAR_NAMES, "variance"), (_IVAR_NAMES, "ivar")):
        if ext in names or (kind == "variance" and ext.startswith("VAR_")):
            return kind, f"EXTNAME={ext}"
    k = _unit_kind(header.get("BUNIT"), image_bunit)
    if k is not None:
        return k, f"BUNIT={header.get('BUNIT')}"
    return None, ""


def noise_to_variance(data, kind: str) -> np.ndarray:
    """σ, variance or inverse variance → float32 variance; +inf where it carries nothing
    (non-finite or ≤ 0 σ/variance, inverse variance ≤ 0 or non-finite)."""
    if kind not in NOISE_KINDS:
        raise InvalidInputError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")
    a = np.asarray(data, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        var = a * a if kind == "sigma" else a if kind == "variance" else 1.0 / a
        ok = np.isfinite(a) & (a > 0) & np.isfinite(var) & (var > 0)
    return np.where(ok, var, np.inf).astype(np.float32)


def read_noise_map(
    path,
    kind: str = "sigma",
    *,
    image_bunit: str | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, str, str]:
    """Read a σ, variance or inverse-variance map; return it as a variance.

    Parameters
    ----------
    path : str or path-like
        FITS file: the HDU named like a noise map (``ERR``, ``VAR*``, ``WHT``, ``IVAR`` ...)
        if there is one, else the first 2-D image HDU.
    kind : {"sigma", "variance", "ivar"}
        What the caller expects; the header wins when it says (module docstring).
    image_bunit : str, optional
        The image's ``BUNIT``, to recognise the map by its unit.
    log : callable, optional
        Told when the header overrides ``kind``.

    Returns
    -------
    variance : ndarray (float32)
    kind : str
        What the map was read as.
    why : str
        ``"option"`` or the header card that decided.
    """
    if kind not in NOISE_KINDS:
        raise InvalidInputError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")
    path = os.fspath(path)
    with open_input(path) as hdul:
        images = [h for h in image_hdus(hdul) if h.data.ndim >= 2]
        if not images:
            raise FitsReadError(f"{path}: no image HDU holds a noise map")
        named = [
            h
            for h in images
            if str(h.name).upper() in _SIGMA_NAMES | _VAR_NAMES | _IVAR_NAMES
            or str(h.name).upper().startswith("VAR_")
        ]
        h = named[0] if named else images[0]
        data = np.asarray(h.data)
        while data.ndim > 2 and data.shape[0] == 1:
            data = data[0]
        if data.ndim != 2:
            raise FitsReadError(
                f"{path}[{h.name}]: a noise map must be 2-D, got shape {data.shape}"
            )
        header = h.header.copy()
        if h is not hdul[0]:
            header.extend(hdul[0].header.copy(strip=True), unique=True)
    hk, why = _header_kind(header, image_bunit)
    used = kind if hk is None else hk
    if hk is not None and hk != kind and log:
        log(f"{path}: the header says it is a {hk} map ({why}); reading it as {hk}, not {kind}")
    return noise_to_variance(data, used), used, why or "option"


# --- masks ------------------------------------------------------------------------------
_BITS_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*[=:]\s*(\d+)\s*$")


def parse_mask_bits(spec) -> dict[str, int]:
    """Plane names of a mask file: ``"BAD=0,SAT=1"`` (``,`` or ``;`` separated) or a mapping.

    Raises
    ------
    InvalidInputError
        Unparsable text, a bit outside 0..30, a bit or a name given twice.
    """
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for part in re.split(r"[,;]", str(spec)):
            if not part.strip():
                continue
            m = _BITS_RE.match(part)
            if m is None:
                raise InvalidInputError(
                    f"mask bits: cannot read {part.strip()!r}; write NAME=BIT, e.g. 'BAD=0,SAT=1'"
                )
            items.append((m.group(1), m.group(2)))
    out: dict[str, int] = {}
    for name, bit in items:
        try:
            b = int(bit)
        except (TypeError, ValueError):
            raise InvalidInputError(
                f"mask bits: bit of {name!r} must be an integer, got {bit!r}"
            ) from None
        if not 0 <= b < MAX_MASK_PLANES:
            raise InvalidInputError(
                f"mask bits: bit of {name!r} must be in 0..{MAX_MASK_PLANES - 1}, got {b}"
            )
        key = str(name).strip().upper()
        if key in out:
            raise InvalidInputError(f"mask bits: plane {key!r} named twice")
        if b in out.values():
            raise InvalidInputError(f"mask bits: bit {b} named twice")
        out[key] = b
    if not out:
        raise InvalidInputError("mask bits: no NAME=BIT given")
    return out


def mask_from_array(
    data, where: str, *, bits: Mapping[str, int] | None = None, header=None
) -> tuple[np.ndarray, MaskPlanes, str]:
    """A mask array as (int32 mask, its planes, how the planes were named).

    Parameters
    ----------
    data : array
        Integer, bool or integral-valued float pixels in ``0 .. 2**MAX_MASK_PLANES - 1``.
    where : str
        Names the mask in messages and warnings.
    bits : mapping, optional
        Plane name → bit (:func:`parse_mask_bits`); wins over ``header``.
    header : astropy.io.fits.Header, optional
        Its ``MP_*`` cards name the bits when ``bits`` is not given.

    Returns
    -------
    mask : numpy.ndarray (int32)
    planes : MaskPlanes
        Without names from either source, nonzero pixels become ``BAD`` (bit 0); a set bit
        without a name is kept as plane ``BIT<n>`` (with a warning).
    how : str
        How the planes were named, for the notes.

    Raises
    ------
    InvalidInputError
        Non-integral or out-of-range values.
    """
    a = np.asarray(data)
    if a.dtype.kind == "b":
        a = a.astype(np.int64)
    if a.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            if not (np.isfinite(a) & (a == np.round(a))).all():
                raise InvalidInputError(
                    f"{where}: a mask must hold integers, got non-integral values"
                )
        a = a.astype(np.int64)
    if a.dtype.kind not in "iu":
        raise InvalidInputError(f"{where}: a mask must hold integers, got dtype {a.dtype}")
    if (a < 0).any() or (a >= 2**MAX_MASK_PLANES).any():
        raise InvalidInputError(f"{where}: mask values must be in 0..2**{MAX_MASK_PLANES}-1")
    a = a.astype(np.int32)
    if bits:
        planes, how = MaskPlanes(dict(bits)), "named by the caller"
    else:
        planes = (
            MaskPlanes.from_header(header, default=False) if header is not None else MaskPlanes({})
        )
        how = "named by its MP_* cards"
        if len(planes) == 0:
            # astropy's (CCDData) convention: any nonzero value is masked.
            return (
                np.where(a != 0, np.int32(1), np.int32(0)),
                MaskPlanes({"BAD": 0}),
                "no plane names: nonzero pixels are BAD",
            )
    present = int(np.bitwise_or.reduce(a.ravel())) if a.size else 0
    unnamed = [
        b for b in range(MAX_MASK_PLANES) if present & (1 << b) and b not in set(planes.values())
    ]
    if unnamed:
        warnings.warn(
            f"{where}: mask bits {unnamed} have no plane name; kept as planes "
            f"{[f'BIT{b}' for b in unnamed]}",
            UserWarning,
            stacklevel=3,
        )
        planes = MaskPlanes({**dict(planes), **{f"BIT{b}": b for b in unnamed}})
    return a, planes, how


def read_mask(path, bits=None) -> tuple[np.ndarray, MaskPlanes, str]:
    """Read a mask file: (int32 mask, its planes, how the planes were named).

    Parameters
    ----------
    path : str or path-like
        FITS file; the ``MASK`` / ``DQ`` / ``FLAGS`` / ``BPM`` HDU, else the first 2-D image.
    bits : str or mapping, optional
        Plane names (:func:`parse_mask_bits`); else the file's ``MP_*`` cards; else
        nonzero → ``BAD``.
    """
    path = os.fspath(path)
    names = parse_mask_bits(bits) if bits is not None else None
    with open_input(path) as hdul:
        images = [h for h in image_hdus(hdul) if h.data.ndim == 2]
        if not images:
            raise FitsReadError(f"{path}: no 2-D image HDU holds a mask")
        h = next(
            (h for h in images if str(h.name).upper() in ("MASK", "DQ", "FLAGS", "BPM")), images[0]
        )
        return mask_from_array(np.asarray(h.data), f"{path}[{h.name}]", bits=names, header=h.header)
