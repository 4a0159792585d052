"""gpudiff's own PSF HDUs (``PSF`` + ``PSFGRID``) and PSF files; see :func:`psf_to_hdus`."""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np
from astropy.io import fits

from ...errors import FitsReadError, InvalidInputError, PsfError
from ..psf import DoubleGaussianPsf, GaussianPsf, GridPsf, ImagePsf, MoffatPsf, Psf
from ._common import (
    atomic_write_hdus,
    fget,
    fset,
    has_image,
    hdu_list,
    load,
    log,
    open_fits,
    role_of,
    strip,
)
from .psf_models import CellPsf, PiffPsf

__all__ = [
    "psf_to_hdus",
    "psf_from_hdus",
    "read_psf",
    "write_psf",
    "decode_psf",
    "PSF_EXTNAME",
    "PSFGRID_EXTNAME",
    "PSF_NAMES",
]

PSF_EXTNAME = "PSF"
PSFGRID_EXTNAME = "PSFGRID"
PSF_NAMES = (PSF_EXTNAME, "PSFIMAGE")  # ours, then astropy CCDData's

_ANALYTIC = {
    GaussianPsf: ("GAUSSIAN", ("PSFSIGX", "sigma"), ("PSFSIGY", "sigma_y"), ("PSFTHETA", "theta")),
    DoubleGaussianPsf: (
        "DOUBLEGAUSSIAN",
        ("PSFSIG1", "sigma1"),
        ("PSFSIG2", "sigma2"),
        ("PSFB", "b"),
    ),
    MoffatPsf: ("MOFFAT", ("PSFFWHM", "profile_fwhm"), ("PSFBETA", "beta")),
}
_PIFF_GRID = 5  # nodes per axis of the grid a Piff model is written as


def _grid_hdu(xs, ys) -> fits.BinTableHDU:
    return fits.BinTableHDU.from_columns(
        [
            fits.Column("XS", f"{len(xs)}D", array=np.asarray(xs, np.float64)[None, :]),
            fits.Column("YS", f"{len(ys)}D", array=np.asarray(ys, np.float64)[None, :]),
        ],
        name=PSFGRID_EXTNAME,
    )


def psf_to_hdus(psf: Psf) -> list:
    """Serialize a PSF model into FITS HDUs, losslessly for every gpudiff model.

    The ``PSF`` HDU holds a float64 image any reader can use (the kernel image at the
    average position, ``ImagePsf.image``, or the (ny, nx, s, s) cube of ``GridPsf``) and
    ``PSFTYPE``: ``GAUSSIAN`` (``PSFSIGX``, ``PSFSIGY``, ``PSFTHETA``), ``DOUBLEGAUSSIAN``
    (``PSFSIG1``, ``PSFSIG2``, ``PSFB``), ``MOFFAT`` (``PSFFWHM``, ``PSFBETA``) — these with
    ``PSFSIZE``, ``PSFOVSMP`` —, ``IMAGE``, ``GRID`` with a one-row table HDU ``PSFGRID``
    (columns ``XS``, ``YS``), or ``CELLS`` (a cell coadd's :class:`CellPsf`: the (ny, nx, s, s)
    cube, NaN for cells without a PSF, and ``PSFCX0``/``PSFCY0`` (first cell's corner, parent
    pixels), ``PSFCW``/``PSFCH`` (cell size)); all but ``GRID`` have ``PSFAVGX/Y``.  Floats
    that a card would round get ``exact=<hex>`` in the comment.  A :class:`PiffPsf` is written
    as a ``GRID`` of its kernel images on 5×5 positions over its image (``PSFSRC = 'PIFF'``);
    other ``Psf`` types as ``IMAGE``, lossy, warned.
    """
    hdr, extra = fits.Header(), []
    spec = _ANALYTIC.get(type(psf))
    if spec is not None:
        data, hdr["PSFTYPE"] = psf.kernel_image(), spec[0]
        for key, attr in spec[1:]:
            fset(hdr, key, getattr(psf, attr), "")
        hdr["PSFSIZE"], hdr["PSFOVSMP"] = psf.size, psf.oversample
    elif isinstance(psf, GridPsf):
        data, hdr["PSFTYPE"] = psf.images, "GRID"
        extra.append(_grid_hdu(psf.xs, psf.ys))
    elif isinstance(psf, ImagePsf):
        data, hdr["PSFTYPE"] = psf.image, "IMAGE"
    elif isinstance(psf, CellPsf):
        data, hdr["PSFTYPE"] = psf.images, "CELLS"
        hdr["PSFCX0"], hdr["PSFCY0"] = (
            (psf.x0, "x of the first cell's first pixel"),
            (psf.y0, "its y"),
        )
        hdr["PSFCW"], hdr["PSFCH"] = (
            (psf.cell_width, "cell width [pix]"),
            (psf.cell_height, "cell height [pix]"),
        )
    elif isinstance(psf, PiffPsf) and psf.bbox is not None:
        b = psf.bbox
        xs = np.linspace(b.x0, b.x1 - 1, _PIFF_GRID) if b.width > 1 else np.array([float(b.x0)])
        ys = np.linspace(b.y0, b.y1 - 1, _PIFF_GRID) if b.height > 1 else np.array([float(b.y0)])
        data = np.array([[psf.kernel_image(x, y) for x in xs] for y in ys])
        hdr["PSFTYPE"], hdr["PSFSRC"] = "GRID", ("PIFF", "a Piff model, realized on this grid")
        extra.append(_grid_hdu(xs, ys))
        log.info(
            "writing a Piff PSF as its kernel images on a %dx%d grid over %s", len(ys), len(xs), b
        )
    elif isinstance(psf, Psf):
        warnings.warn(
            f"{type(psf).__name__} has no FITS form; writing its kernel image (lossy)", stacklevel=2
        )
        data, hdr["PSFTYPE"] = psf.kernel_image(), "IMAGE"
    else:
        raise InvalidInputError(f"psf_to_hdus needs a gpudiff Psf, got {type(psf).__name__}")
    if hdr["PSFTYPE"] != "GRID":
        for key, v in zip(("PSFAVGX", "PSFAVGY"), psf.average_position):
            fset(hdr, key, v, "[pix]")
    return [fits.ImageHDU(np.asarray(data, dtype=np.float64), hdr, name=PSF_EXTNAME), *extra]


def _exact(psf: Psf, attr: str, data: np.ndarray) -> Psf:
    # The constructors renormalize to unit sum; dividing by a sum of 1 ± 1 ulp can flip
    # last bits, so put back the stored, already normalized values verbatim.
    if getattr(psf, attr).shape == data.shape and np.allclose(
        data.sum(axis=(-2, -1)), 1.0, rtol=1e-12
    ):
        setattr(psf, attr, data.copy())
    return psf


def decode_psf(h, grid_hdu=None) -> Psf:
    """The PSF of one ``PSF`` HDU (and its ``PSFGRID`` table); :class:`PsfError` if malformed."""
    hdr = h.header
    data = None if h.data is None else np.asarray(h.data).astype(np.float64)
    kind = str(hdr.get("PSFTYPE", "")).strip().upper()
    avg = (fget(hdr, "PSFAVGX"), fget(hdr, "PSFAVGY")) if "PSFAVGX" in hdr else (0.0, 0.0)
    for cls, (name, *cards) in _ANALYTIC.items():
        if kind == name:
            params = {
                attr.replace("profile_", ""): fget(hdr, key) for key, attr in cards
            }  # Moffat: fwhm=
            return cls(
                **params,
                size=int(hdr["PSFSIZE"]),
                oversample=int(hdr.get("PSFOVSMP", 1)),
                average_position=avg,
            )
    if kind == "GRID":
        if grid_hdu is None or data is None or data.ndim != 4:
            raise PsfError(f"PSFTYPE=GRID needs 4-D data and a {PSFGRID_EXTNAME} table HDU")
        xs, ys = (np.asarray(grid_hdu.data[c][0], dtype=np.float64).ravel() for c in ("XS", "YS"))
        return _exact(GridPsf(data, xs, ys), "images", data)
    if kind == "CELLS":
        if data is None or data.ndim != 4:
            raise PsfError("PSFTYPE=CELLS needs 4-D data (cells × kernel)")
        psf = CellPsf(
            data, int(hdr["PSFCX0"]), int(hdr["PSFCY0"]), int(hdr["PSFCW"]), int(hdr["PSFCH"])
        )
        psf.average_position = avg if "PSFAVGX" in hdr else psf.average_position
        ok = psf.valid
        if (
            psf.images.shape == data.shape
            and np.allclose(data.sum(axis=(-2, -1))[ok], 1.0, rtol=1e-12)
            and np.isnan(data[~ok]).all()
        ):
            psf.images = data.copy()  # the stored, normalized values verbatim (see _exact)
        return psf
    if kind not in ("IMAGE", ""):
        raise PsfError(f"unknown PSFTYPE {kind!r}")
    while data is not None and data.ndim > 2 and data.shape[0] == 1:
        data = data[0]
    if data is None or data.ndim != 2:  # IMAGE, or a foreign PSF image without PSFTYPE
        raise PsfError(
            f"a PSF image must be 2-D, got {'no data' if data is None else data.shape}"
            + (
                " (a cube of PSF images needs PSFTYPE = 'GRID' or 'CELLS')"
                if data is not None and data.ndim > 2
                else ""
            )
        )
    return _exact(ImagePsf(data, average_position=avg), "image", data)


def psf_from_hdus(hdul: Sequence) -> Psf | None:
    """The PSF an HDU list carries, read as its layout stores it; ``None`` if it has none.

    A file of a known layout (afw archive, lsst-images ``JSON``/``PSF``; see
    :func:`gpudiff.image.io.detect_layout`) is read as that layout reads it (warning when
    its PSF cannot be read).  Otherwise the ``PSF`` HDU of :func:`psf_to_hdus`, else
    CCDData's ``PSFIMAGE``; without ``PSFTYPE`` (a foreign file) its 2-D data become an
    :class:`ImagePsf`.  Raises :class:`PsfError` if malformed.
    """
    from .registry import layout_psf

    handled, psf = layout_psf(hdul)
    if handled:
        return psf
    return gpudiff_psf(hdul)


def gpudiff_psf(hdul: Sequence) -> Psf | None:
    """The PSF of gpudiff's own ``PSF``/``PSFGRID`` HDUs (or CCDData's ``PSFIMAGE``)."""
    by_name = {str(h.name).upper(): h for h in reversed(list(hdul))}  # the first of each name wins
    h = next((by_name[n] for n in PSF_NAMES if n in by_name), None)
    if h is None:
        return None
    try:
        return decode_psf(h, by_name.get(PSFGRID_EXTNAME))
    except Exception as exc:  # PsfError, a missing table column, a non-numeric card, ...
        raise PsfError(f"malformed {h.name} HDU ({type(exc).__name__}: {exc})") from exc


def read_psf(path) -> Psf:
    """Read a PSF FITS file: the ``PSF`` HDU (:func:`write_psf`), else WebbPSF's ``DET_SAMP``,
    else ``PSFIMAGE``, else the first image (a WebbPSF primary → :class:`ImagePsf`).

    Raises :class:`FitsReadError` for a missing, unreadable or truncated file, no image, or
    a malformed PSF.
    """
    path = os.fspath(path)
    with open_fits(path) as hdul:
        names = [role_of(h) for h in hdul]
        pick = next(
            (names.index(n) for n in (PSF_EXTNAME, "DET_SAMP", "PSFIMAGE") if n in names),
            next((i for i, h in enumerate(hdul) if has_image(h)), None),
        )
        if pick is None or load(path, hdul[pick]) is None:
            raise FitsReadError(f"{path}: no HDU with a PSF image; the HDUs are {hdu_list(hdul)}")
        try:
            return decode_psf(
                hdul[pick], hdul[PSFGRID_EXTNAME] if PSFGRID_EXTNAME in names else None
            )
        except Exception as exc:
            raise FitsReadError(f"{path}[{hdul[pick].name}]: not a usable PSF ({exc})") from exc


def write_psf(path, psf: Psf, overwrite: bool = False) -> None:
    """Write ``psf`` alone, atomically: its ``PSF`` HDU as the primary HDU (plus ``PSFGRID``)."""
    first, *rest = psf_to_hdus(psf)
    primary = fits.PrimaryHDU(first.data, strip(first.header))
    primary.header["EXTNAME"] = PSF_EXTNAME
    atomic_write_hdus(fits.HDUList([primary, *rest]), path, overwrite)
