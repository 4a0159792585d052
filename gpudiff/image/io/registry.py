"""The layouts gpudiff reads, how each is recognized, and the one :func:`read_exposure`.

Layouts are tried in order; the first whose ``detect`` accepts the file reads it:

=============== ====================================================================
``lsst-images`` ``DATAMODL`` of images.lsst.io, or ``JSON`` + ``INDEX`` HDUs (:mod:`.lsst_images`)
``afw``         HDUs typed by afw's ``EXTTYPE`` card, with or without ``EXTNAME`` (:mod:`.afw`)
``jwst``        a ``SCI`` HDU of a JWST file (:mod:`.jwst`)
``gpudiff``     an ``IMAGE`` HDU: gpudiff's own LSST-style layout (:mod:`.native`)
``ccddata``     ``UNCERT``, ``MASK``, ``FLAGS`` or ``PSFIMAGE`` HDUs (:mod:`.ccddata`)
``plain``       anything else: the first HDU with 2-D data (:mod:`.plain`)
=============== ====================================================================
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ...errors import BackendUnavailableError, FitsReadError, GpudiffError, InvalidInputError
from ..exposure import Exposure
from . import afw, ccddata, jwst, lsst_images, native
from ._common import Hdus, log, open_fits

__all__ = ["Layout", "LAYOUTS", "detect_layout", "read_exposure", "layout_psf"]


@dataclass(frozen=True)
class Layout:
    """A file layout: its name, how it is recognized, and how it is read.

    ``read(hdus, idx, gain, backend)`` gets the opened file and the index of the HDU the
    caller named (or None); ``psf(hdus)`` is the layout's own PSF reader (None: gpudiff's
    ``PSF`` HDUs); ``pixel_roles`` are the HDU roles ``hdu=`` may name for this layout.
    """

    name: str
    detect: Callable[[Hdus], bool]
    read: Callable
    psf: Callable | None = None
    pixel_roles: tuple[str, ...] = ()


def _fixed(module):
    return lambda hdus, idx, gain, backend: module.read(hdus, backend)


LAYOUTS: list[Layout] = [
    Layout(
        lsst_images.NAME,
        lsst_images.detect,
        _fixed(lsst_images),
        lsst_images.read_psf_of,
        ("IMAGE",),
    ),
    Layout(afw.NAME, afw.detect, _fixed(afw), afw.read_psf_of, ("IMAGE",)),
    Layout(jwst.NAME, jwst.detect, jwst.read, None, ("SCI",)),
    Layout(native.NAME, native.detect, _fixed(native), None, ("IMAGE",)),
    Layout(
        ccddata.NAME,
        ccddata.detect,
        lambda hdus, idx, gain, be: ccddata.read_single(hdus, idx, gain, be),
    ),
    Layout(
        "plain",
        lambda hdus: True,
        lambda hdus, idx, gain, be: ccddata.read_single(hdus, idx, gain, be),
    ),
]
_BY_NAME = {layout.name: layout for layout in LAYOUTS}


def _hdus_of(obj) -> Hdus:
    if isinstance(obj, Hdus):
        return obj
    name = getattr(obj, "filename", None)
    name = name() if callable(name) else None
    return Hdus(name or "(HDU list)", list(obj))


def detect_layout(source) -> str:
    """The name of the layout of ``source`` (a path, an ``HDUList`` or a list of HDUs):
    ``'lsst-images'``, ``'afw'``, ``'jwst'``, ``'gpudiff'``, ``'ccddata'`` or ``'plain'``."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        with open_fits(path) as hdul:
            return _detect(Hdus(path, hdul)).name
    return _detect(_hdus_of(source)).name


def _detect(hdus: Hdus) -> Layout:
    return next(layout for layout in LAYOUTS if layout.detect(hdus))


def layout_psf(hdul: Sequence) -> tuple[bool, object]:
    """(True, psf) when the layout of ``hdul`` stores its PSF its own way (afw, lsst-images),
    else (False, None): the caller reads gpudiff's ``PSF`` HDUs."""
    hdus = _hdus_of(hdul)
    layout = _detect(hdus)
    if layout.psf is None:
        return False, None
    return True, layout.psf(hdus)


def read_exposure(path, *, hdu=None, gain: float | None = None, backend=None) -> Exposure:
    """Read an exposure from a FITS file of any layout gpudiff knows (module table).

    - **lsst-images**: tile-compressed ``IMAGE``/``MASK``/``VARIANCE``, planes from ``MSK*``
      cards over one or more ``MASK`` HDUs, xy0 from the 'A' WCS, PSF from the ``JSON`` tree
      (Gaussian; Piff with ``piff``; a cell coadd's 4-D ``PSF`` as a :class:`CellPsf`).
    - **afw** (before 2021: ``EXTTYPE`` only; after: ``EXTNAME`` too): the file's ``MP_*``
      bits, its ``VARIANCE`` (never re-estimated), xy0 from the 'A' WCS or ``LTV``, the WCS
      from the ``IMAGE`` header, PhotoCalib and PSF from the archive when readable without afw.
    - **JWST** ``cal``/``i2d``: ``SCI``; ``ERR`` as σ (else ``VAR_*``); ``DQ`` bits mapped to
      planes (:data:`gpudiff.image.io.jwst.DQ_TO_PLANES`); ``WHT`` = 0 → ``NO_DATA``.
    - **gpudiff** (an ``IMAGE`` HDU): ``IMAGE``, ``MASK`` (planes from ``MSK*``, else ``MP_*``
      cards), ``VARIANCE``, optional ``PSF`` (:func:`psf_from_hdus`); WCS and xy0 from the
      ``IMAGE`` header, ``PHOTCAL``/``PHOTCALE`` and metadata from the primary.
    - **CCDData** (``UNCERT``, ``MASK``, ``FLAGS`` or ``PSFIMAGE`` HDUs) and **plain** images:
      see :mod:`gpudiff.image.io.ccddata` and :mod:`gpudiff.image.io.plain` (the variance of
      a file without one is estimated and ``GDVAREST`` & co. say so).

    Whatever a reader has to assume (no plane names, a PSF it cannot read, an unmapped
    plane, an estimated variance) it says with a :class:`~gpudiff.image.io.FormatWarning`;
    nothing is renamed or dropped silently.  xy0 is read from LSST's 'A' pixel WCS
    (``CRVAL1A/2A``, ``CTYPE1A = 'LINEAR'``), else as −``LTV1/LTV2``, else (0, 0).  Image and
    variance come back float32, the mask int32 (int64 with planes past bit 30), all
    native-endian.

    Parameters
    ----------
    path : str or path-like
    hdu : int, str or (str, int), optional
        The HDU holding the pixels (``'IMAGE'``/``'SCI'`` or None for the layouts above;
        any other HDU is read as a single image).
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
    if gain is not None and not (
        isinstance(gain, (int, float, np.number)) and math.isfinite(gain) and gain > 0
    ):
        raise InvalidInputError(f"gain must be a positive number of e-/ADU, got {gain!r}")
    try:
        with open_fits(path) as hdul:
            hdus = Hdus(path, hdul)
            try:
                idx = None if hdu is None else hdul.index_of(hdu)
            except (KeyError, IndexError, TypeError, ValueError):
                raise FitsReadError(
                    f"{path}: no HDU {hdu!r}; the HDUs are {hdus.listing()}"
                ) from None
            layout = _detect(hdus)
            if idx is not None and hdus.roles[idx] not in layout.pixel_roles and layout.pixel_roles:
                layout = _BY_NAME["plain"]  # another HDU named: read it as a single image
            elif idx is None and layout.name in ("ccddata", "plain") and "VARIANCE" in hdus.roles:
                raise FitsReadError(
                    f"{path}: a VARIANCE HDU but no IMAGE HDU; the HDUs are {hdus.listing()}"
                )
            log.info("%s: read as the %s layout", path, layout.name)
            return layout.read(hdus, idx, gain, backend)
    except (FitsReadError, BackendUnavailableError):
        raise
    except GpudiffError as exc:  # a bad PSF, mask card or PHOTCAL: name the file
        raise FitsReadError(f"{path}: {exc}") from exc
    except Exception as exc:  # nothing raw from astropy or numpy escapes
        raise FitsReadError(
            f"{path}: cannot read an exposure ({type(exc).__name__}: {exc})"
        ) from exc
