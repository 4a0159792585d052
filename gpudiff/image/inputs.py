"""What users hand beside an image: PSF models, noise maps, masks and a FWHM.

Survey files often lack what differencing needs (a PSF, a variance plane, a mask with
named planes) while the user has it in a separate file: a WebbPSF model, a JWST ``ERR``
map, a weight map, a bad-pixel mask.  This module reads those files and attaches them to
an :class:`~gpudiff.image.Exposure`, always returning a **new** exposure (the input is
never modified), and records where each ingredient came from so that the commands can
say it in their log and in the output header.

PSF fallback order (:func:`resolve_psf`), first that applies wins:

1. ``option``      -- a PSF given by the caller (``--science-psf FILE``, a Psf, an array);
2. ``file``        -- the PSF stored in the image file;
3. ``stars``       -- estimated from the image's stars (:func:`gpudiff.image.estimate_psf`);
4. ``header-fwhm`` -- a Gaussian of the header's ``FWHM`` card (pixels);
5. ``fwhm-option`` -- a Gaussian of the caller's ``--fwhm`` (the last resort).

Noise maps: ``sigma`` (1σ per pixel, e.g. JWST ``ERR``), ``variance`` or ``ivar``
(inverse variance, e.g. a ``WHT`` map).  The caller's option says which it expects; the
file's header, when it says what it is, wins (and the note says so): ``UTYPE``
(``StdDevUncertainty`` / ``VarianceUncertainty`` / ``InverseVariance``, astropy's CCDData),
then ``EXTNAME`` (``ERR``/``SIGMA``/``RMS``/... ; ``VAR*``/``VARIANCE``; ``WHT``/``IVAR``/
``INVVAR``/``WEIGHT``), then ``BUNIT`` compared with the image's ``BUNIT`` (same unit: σ;
squared: variance; inverse square: inverse variance).  Pixels whose σ or variance is not
finite and > 0 (inverse variance ≤ 0) get +inf variance and ``NO_DATA``.

Masks: the first 2-D HDU of integer (or integral-valued float) pixels.  Bits are named by
the caller (``"BAD=0,SAT=1"`` or a mapping), else by the file's ``MP_*`` cards; without
either, every nonzero pixel is ``BAD`` (astropy's convention).  A set bit that no name
covers is kept as plane ``BIT<n>`` and a warning says so.  The planes are OR-ed into the
exposure's own mask (its planes keep their bits).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits

from ..errors import FitsReadError, InvalidInputError, PsfError, ShapeMismatchError
from .exposure import Exposure
from .maskplanes import MAX_MASK_PLANES, MaskPlanes
from .psf import GaussianPsf, GridPsf, ImagePsf, Psf

__all__ = [
    "NOISE_KINDS",
    "PSF_SOURCES",
    "InputSources",
    "as_psf",
    "attach_inputs",
    "input_cards",
    "noise_to_variance",
    "parse_mask_bits",
    "read_mask",
    "read_noise_map",
    "read_psf_file",
    "resolve_psf",
]

#: Where a PSF came from, in fallback order.
PSF_SOURCES = ("option", "file", "stars", "header-fwhm", "fwhm-option")
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
# A PSF image whose light-weighted centroid is further than this from its central pixel
# is not centred the way every gpudiff PSF model is (kernel_image's centre pixel): using it
# would shift the matched template.  Half a pixel is the most a centred, undersampled PSF
# can be off by pixelisation; 1 px leaves room for an asymmetric (e.g. coma) wing.
_MAX_CENTROID_OFFSET = 1.0


@dataclass
class InputSources:
    """Where an exposure's PSF, variance and mask came from (see the module docstring).

    ``psf`` is one of :data:`PSF_SOURCES`; ``noise`` is ``file`` (the image file's own
    variance), ``estimated`` (gpudiff estimated it from the sky) or ``sigma`` /
    ``variance`` / ``ivar`` (a map given by the caller); ``mask`` is ``file`` or
    ``file+option``.  ``notes`` are the one-line explanations that were logged.
    """

    psf: str | None = None
    psf_detail: str = ""
    noise: str = "file"
    noise_detail: str = ""
    mask: str = "file"
    mask_detail: str = ""
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "psf": self.psf,
            "psf_detail": self.psf_detail,
            "noise": self.noise,
            "noise_detail": self.noise_detail,
            "mask": self.mask,
            "mask_detail": self.mask_detail,
        }


def _open(path: str):
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


def _image_hdus(hdul) -> list:
    return [h for h in hdul if getattr(h, "is_image", False) and h.data is not None]


# --- PSFs -------------------------------------------------------------------------------
def _check_psf_image(img: np.ndarray, where: str) -> np.ndarray:
    """Finite, positive-sum, centred 2-D PSF image (float64); PsfError naming ``where``."""
    img = np.asarray(img, dtype=np.float64)
    while img.ndim > 2 and img.shape[0] == 1:
        img = img[0]
    if img.ndim != 2 or img.size == 0:
        raise PsfError(f"{where}: a PSF image must be 2-D, got shape {img.shape}")
    if not np.isfinite(img).all():
        raise PsfError(
            f"{where}: the PSF image has {int((~np.isfinite(img)).sum())} non-finite pixels"
        )
    total = img.sum()
    if not total > 0:
        raise PsfError(f"{where}: the PSF image must have a positive sum, got {total:.4g}")
    ny, nx = img.shape
    if ny % 2 == 0 or nx % 2 == 0:
        # ImagePsf would pad it to odd with pixel (W-1)//2 in the centre, which is right only
        # if the maker used afw's convention; say so rather than shift silently.
        warnings.warn(
            f"{where}: the PSF image is {nx}x{ny} (even); its pixel "
            f"({(nx - 1) // 2}, {(ny - 1) // 2}) is taken as the centre",
            UserWarning,
            stacklevel=3,
        )
    pos = np.clip(img, 0, None)
    yy, xx = np.mgrid[0:ny, 0:nx]
    cx, cy = (pos * xx).sum() / pos.sum(), (pos * yy).sum() / pos.sum()
    ox, oy = cx - (nx - 1) // 2, cy - (ny - 1) // 2
    if math.hypot(ox, oy) > _MAX_CENTROID_OFFSET:
        raise PsfError(
            f"{where}: the PSF image is not centred: its centroid is ({ox:+.2f}, {oy:+.2f}) "
            f"px from the central pixel ({(nx - 1) // 2}, {(ny - 1) // 2}); a PSF image "
            "must have the star on its central pixel"
        )
    return img / total


def _grid_from_cube(cube: np.ndarray, table, where: str) -> GridPsf:
    """One PSF per position: an (n, s, s) cube and a table with x, y columns on a full grid."""
    cols = {c.upper(): c for c in table.columns.names}
    xk = next((cols[k] for k in ("X", "XS", "XPOS", "X_PIX") if k in cols), None)
    yk = next((cols[k] for k in ("Y", "YS", "YPOS", "Y_PIX") if k in cols), None)
    if xk is None or yk is None:
        raise PsfError(
            f"{where}: a PSF cube needs a table with x and y columns (parent pixels); "
            f"the table has {table.columns.names}"
        )
    x = np.asarray(table.data[xk], dtype=np.float64).ravel()
    y = np.asarray(table.data[yk], dtype=np.float64).ravel()
    if x.size != cube.shape[0]:
        raise PsfError(f"{where}: {cube.shape[0]} PSF images but {x.size} positions in the table")
    xs, ys = np.unique(x), np.unique(y)
    if xs.size * ys.size != x.size:
        # GridPsf interpolates bilinearly on a regular lattice; scattered positions would
        # need another interpolant, which no gpudiff PSF model has.
        raise PsfError(
            f"{where}: the {x.size} PSF positions do not form a full grid "
            f"({xs.size} distinct x × {ys.size} distinct y); gpudiff's GridPsf needs "
            "one PSF at every (x, y) of a grid"
        )
    s = cube.shape[-1]
    images = np.zeros((ys.size, xs.size, s, s))
    seen = np.zeros((ys.size, xs.size), dtype=bool)
    for k in range(x.size):
        i, j = int(np.searchsorted(ys, y[k])), int(np.searchsorted(xs, x[k]))
        if seen[i, j]:
            raise PsfError(f"{where}: two PSF images at position ({x[k]}, {y[k]})")
        seen[i, j] = True
        images[i, j] = _check_psf_image(cube[k], f"{where} image {k}")
    return GridPsf(images, xs, ys)


def read_psf_file(path) -> Psf:
    """Read a PSF from a FITS file a user hands over.

    Recognises, in order: gpudiff's own PSF file or an exposure's ``PSF`` HDU (any
    ``PSFTYPE``, via :func:`gpudiff.image.fitsio.read_psf`); one PSF per position (a 3-D
    ``(n, s, s)`` cube plus a table HDU with ``x``, ``y`` columns on a full grid →
    :class:`GridPsf`); a PSF image (WebbPSF's ``DET_SAMP`` HDU, else the first image
    HDU), checked to be finite, positive and centred on its central pixel, normalised to
    unit sum → :class:`ImagePsf`.

    Raises
    ------
    FitsReadError
        Missing or unreadable file.
    PsfError
        No usable PSF (not centred, non-finite, positions not on a grid ...); the message
        names the file.
    """
    from .fitsio import read_psf

    path = os.fspath(path)
    with _open(path) as hdul:
        names = [str(h.name).upper() for h in hdul]
        images = _image_hdus(hdul)
        if not images:
            raise PsfError(f"{path}: no image HDU holds a PSF (HDUs: {names})")
        gpudiff_psf = "PSF" in names or any("PSFTYPE" in h.header for h in images)
        cube = next((h for h in images if h.data.ndim == 3 and h.data.shape[0] > 1), None)
        table = next((h for h in hdul if isinstance(h, fits.BinTableHDU)), None)
        if not gpudiff_psf and cube is not None and table is not None:
            return _grid_from_cube(
                np.asarray(cube.data, dtype=np.float64), table, f"{path}[{cube.name}]"
            )
        if not gpudiff_psf:
            h = hdul["DET_SAMP"] if "DET_SAMP" in names else images[0]
            return ImagePsf(_check_psf_image(h.data, f"{path}[{h.name}]"))
    try:
        return read_psf(path)
    except FitsReadError as exc:
        raise PsfError(str(exc)) from None


def as_psf(value, name: str = "psf") -> Psf:
    """A gpudiff Psf from a Psf (returned as is), a 2-D array (checked, normalised) or a path."""
    if isinstance(value, Psf):
        return value
    if isinstance(value, (str, os.PathLike)):
        return read_psf_file(value)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"{name}: expected a Psf, a 2-D PSF image or a FITS path, got {type(value).__name__}"
        ) from None
    return ImagePsf(_check_psf_image(arr, name))


def _header_fwhm(exposure: Exposure) -> float | None:
    try:
        v = float(exposure.metadata.get("FWHM"))
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def resolve_psf(
    exposure: Exposure,
    name: str,
    *,
    psf=None,
    fwhm: float | None = None,
    estimate: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[Exposure, str, str]:
    """The exposure with a PSF, by the fallback order of the module docstring.

    Parameters
    ----------
    exposure : Exposure
        Not modified.
    name : str
        The input's name in messages (its file).
    psf : Psf, array or path, optional
        A PSF given by the caller; it wins over the file's.
    fwhm : float, optional
        The last resort: a Gaussian of this FWHM in pixels.
    estimate : bool
        Try estimating the PSF from the image's stars before the FWHM fallbacks.
    log : callable, optional
        Receives one line saying which source was used when it is not the file's.

    Returns
    -------
    exposure : Exposure
        A new exposure sharing the pixels, with the PSF set.
    source : str
        One of :data:`PSF_SOURCES`.
    detail : str
        E.g. the PSF file or the FWHM used.

    Raises
    ------
    PsfError
        No PSF from any source; the message says what was tried.
    """
    from .psf_estimate import estimate_psf

    say = log or (lambda _m: None)
    if fwhm is not None:
        fwhm = _positive(fwhm, "fwhm")
    if psf is not None:
        model = as_psf(psf, f"{name}: given PSF")
        detail = (
            os.path.basename(os.fspath(psf))
            if isinstance(psf, (str, os.PathLike))
            else type(psf).__name__
        )
        if exposure.psf is not None:
            say(f"{name}: using the given PSF ({detail}) instead of the file's")
        else:
            say(
                f"{name}: no PSF in the file; using the given PSF ({detail}, "
                f"FWHM {model.fwhm():.2f} px)"
            )
        return _with_psf(exposure, model), "option", detail
    if exposure.psf is not None:
        return exposure, "file", ""
    tried = []
    if estimate:
        for kw in ({}, {"kernel_size": 25, "min_stars": 3}):  # the second fits small cutouts
            try:
                model = estimate_psf(exposure, **kw)
            except PsfError as exc:
                tried.append(str(exc))
                continue
            say(f"{name} has no PSF; estimated one from its stars (FWHM {model.fwhm():.2f} px)")
            return _with_psf(exposure, model), "stars", f"FWHM {model.fwhm():.3f}"
    hf = _header_fwhm(exposure)
    if hf is not None:
        say(
            f"warning: {name}: no PSF in the file and none estimated from its stars; using a "
            f"Gaussian of the header's FWHM = {hf:.2f} px"
        )
        return _with_psf(exposure, GaussianPsf(fwhm=hf)), "header-fwhm", f"FWHM {hf:.3f}"
    if fwhm is not None:
        say(
            f"warning: {name}: no PSF in the file, none estimated from its stars and no FWHM card; "
            f"using a Gaussian of the given FWHM = {fwhm:.2f} px"
        )
        return _with_psf(exposure, GaussianPsf(fwhm=fwhm)), "fwhm-option", f"FWHM {fwhm:.3f}"
    # The estimator's own reason first (what the user can act on), then what was tried.
    why = f"{tried[-1]}; so " if tried else ""
    raise PsfError(
        f"{why}{name}: no PSF in the file and none could be estimated from its stars, no FWHM "
        "header card and no FWHM given; give a PSF (--science-psf/--template-psf/--psf FILE) "
        "or --fwhm F"
    )


def _with_psf(exposure: Exposure, psf: Psf) -> Exposure:
    return Exposure(
        exposure.masked_image, psf, exposure.wcs, exposure.photo_calib, exposure.metadata
    )


def _positive(v, what: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{what} must be a positive number of pixels, got {v!r}") from None
    if not (math.isfinite(f) and f > 0):
        raise InvalidInputError(f"{what} must be a positive number of pixels, got {v!r}")
    return f


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
    with _open(path) as hdul:
        images = [h for h in _image_hdus(hdul) if h.data.ndim >= 2]
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


def _mask_from_array(
    data, where: str, bits: Mapping[str, int] | None, header=None
) -> tuple[np.ndarray, MaskPlanes, str]:
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
    with _open(path) as hdul:
        images = [h for h in _image_hdus(hdul) if h.data.ndim == 2]
        if not images:
            raise FitsReadError(f"{path}: no 2-D image HDU holds a mask")
        h = next(
            (h for h in images if str(h.name).upper() in ("MASK", "DQ", "FLAGS", "BPM")), images[0]
        )
        return _mask_from_array(np.asarray(h.data), f"{path}[{h.name}]", names, h.header)


# --- attaching ---------------------------------------------------------------------------
def _check_shape(arr: np.ndarray, exposure: Exposure, what: str, name: str) -> None:
    if tuple(arr.shape) != tuple(exposure.shape):
        ny, nx = exposure.shape
        raise ShapeMismatchError(
            f"{what} is {arr.shape[1]}x{arr.shape[0]} pixels but the image {name} is "
            f"{nx}x{ny}; a {what.split(' ')[0]} must cover the image pixel for pixel"
        )


def attach_inputs(
    exposure: Exposure,
    name: str = "image",
    *,
    psf=None,
    noise=None,
    variance=None,
    ivar=None,
    mask=None,
    mask_bits=None,
    fwhm: float | None = None,
    need_psf: bool = True,
    estimate_psf: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[Exposure, InputSources]:
    """Attach what the caller handed beside an image; a new Exposure and where each came from.

    Parameters
    ----------
    exposure : Exposure
        The image as read; never modified.
    name : str
        Its name in messages and notes (the file).
    psf : Psf, 2-D array or path, optional
        Wins over the file's PSF.
    noise, variance, ivar : array or path, optional
        A σ, variance or inverse-variance map (at most one); replaces the variance plane.
        A file's header can correct the kind (:func:`read_noise_map`).
    mask : array or path, optional
        A mask OR-ed into the exposure's mask; ``mask_bits`` names its bits.
    mask_bits : str or mapping, optional
        ``"BAD=0,SAT=1"``; see :func:`read_mask`.
    fwhm : float, optional
        Last-resort PSF FWHM in pixels (:func:`resolve_psf`).
    need_psf : bool
        Resolve a PSF (False for tasks that use none, e.g. background matching).
    estimate_psf : bool
        Allow estimating the PSF from the stars.
    log : callable, optional
        Receives the one-line notes (which fallback, what the header said).

    Returns
    -------
    exposure : Exposure
    sources : InputSources

    Raises
    ------
    ShapeMismatchError
        A map or mask does not have the image's shape (the message names both).
    InvalidInputError, PsfError, FitsReadError
        Unusable inputs; messages name the file.
    """
    if not isinstance(exposure, Exposure):
        raise InvalidInputError(f"attach_inputs needs an Exposure, got {type(exposure).__name__}")
    src = InputSources(noise=_file_noise(exposure))
    notes: list[str] = []

    def say(msg: str) -> None:
        notes.append(msg)
        if log is not None:
            log(msg)

    given = [
        (k, v)
        for k, v in (("sigma", noise), ("variance", variance), ("ivar", ivar))
        if v is not None
    ]
    if len(given) > 1:
        raise InvalidInputError(
            f"{name}: give at most one of a noise (σ), variance and inverse-variance "
            f"map, got {', '.join(k for k, _ in given)}"
        )
    be = exposure.backend
    mi = exposure.masked_image
    image, var, msk, planes = mi.image, mi.variance, mi.mask, mi.mask_planes
    changed = False
    if given:
        kind, value = given[0]
        if isinstance(value, (str, os.PathLike)):
            v, used, why = read_noise_map(
                value, kind, image_bunit=exposure.metadata.get("BUNIT"), log=say
            )
            where = f"{kind} map {os.fspath(value)}"
            detail = os.path.basename(os.fspath(value))
        else:
            used, why, where, detail = kind, "option", f"{kind} map", "array"
            v = noise_to_variance(
                be.asnumpy(value) if hasattr(value, "__cuda_array_interface__") else value, kind
            )
        _check_shape(v, exposure, where, name)
        var = be.asarray(v, dtype=np.float32)
        src.noise, src.noise_detail = used, detail
        say(
            f"{name}: variance from the {used} map {detail}"
            + (f" (recognised by {why})" if why != "option" else "")
        )
        changed = True
    if mask is not None:
        if isinstance(mask, (str, os.PathLike)):
            m, mplanes, how = read_mask(mask, mask_bits)
            detail = os.path.basename(os.fspath(mask))
            where = f"mask {os.fspath(mask)}"
        else:
            names = parse_mask_bits(mask_bits) if mask_bits is not None else None
            m, mplanes, how = _mask_from_array(mask, f"{name}: given mask", names)
            detail, where = "array", "mask"
        _check_shape(m, exposure, where, name)
        planes_out = planes.merge(mplanes)
        xp = be.xp
        msk = planes_out.conform(msk, planes, xp) | planes_out.conform(be.asarray(m), mplanes, xp)
        planes = planes_out
        src.mask, src.mask_detail = "file+option", detail
        say(f"{name}: mask planes {sorted(mplanes)} from {detail} ({how})")
        changed = True
    if changed:
        xp = be.xp
        # A pixel without a finite value or usable variance carries nothing: NO_DATA, as the
        # FITS readers do, rather than an unmasked +inf variance that a task would refuse.
        nodata = ~xp.isfinite(image) | ~(xp.isfinite(var) & (var > 0))
        if bool(nodata.any()):
            planes = planes.copy() if planes is mi.mask_planes else planes
            planes.add("NO_DATA")
            msk = msk | (nodata.astype(xp.int32) * xp.int32(planes.bitmask("NO_DATA")))
            var = xp.where(nodata, xp.float32(np.inf), var).astype(xp.float32)
        from .masked_image import MaskedImage

        mi = MaskedImage(image, var, msk, xy0=mi.xy0, mask_planes=planes, backend=be)
    meta = exposure.metadata
    if given:
        # The reader's estimated-variance cards no longer describe this variance plane.
        meta = meta.copy()
        for key in ("GDVAREST", "GDSKYLEV", "GDSKYSIG", "GDGAIN"):
            meta.remove(key, ignore_missing=True, remove_all=True)
    out = (
        Exposure(mi, exposure.psf, exposure.wcs, exposure.photo_calib, meta)
        if changed
        else exposure
    )
    if need_psf:
        out, src.psf, src.psf_detail = resolve_psf(
            out, name, psf=psf, fwhm=fwhm, estimate=estimate_psf, log=say
        )
    elif psf is not None:
        out, src.psf, src.psf_detail = resolve_psf(out, name, psf=psf, log=say)
    src.notes = notes
    return out, src


def _file_noise(exposure: Exposure) -> str:
    return "estimated" if "GDVAREST" in exposure.metadata else "file"


#: Header cards of the sources, per role: (PSF card, noise card).
_ROLE_CARDS = {"science": ("GDPSFSRC", "GDNOISRC"), "template": ("GDTPSFSR", "GDTNOISR")}


def input_cards(sources: InputSources, role: str = "science") -> dict:
    """Header cards saying where the PSF and the variance came from (``GDPSFSRC`` /
    ``GDNOISRC`` for the science or single input, ``GDTPSFSR`` / ``GDTNOISR`` for the
    template), values as in :class:`InputSources`, the file in the comment."""
    psf_key, noise_key = _ROLE_CARDS[role]
    cards = {}
    if sources.psf is not None:
        cards[psf_key] = (sources.psf, f"{role} PSF: {sources.psf_detail}"[:46])
    cards[noise_key] = (sources.noise, f"{role} variance: {sources.noise_detail}"[:46])
    return cards
