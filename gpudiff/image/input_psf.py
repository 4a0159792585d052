"""PSFs handed beside an image, and the PSF fallback chain (:mod:`gpudiff.image.inputs`).

PSF fallback order (:func:`resolve_psf`), first that applies wins:

1. ``option``      -- a PSF given by the caller (``--science-psf FILE``, a Psf, an array);
2. ``file``        -- the PSF stored in the image file;
3. ``stars``       -- estimated from the image's stars (:func:`gpudiff.image.estimate_psf`);
4. ``header-fwhm`` -- a Gaussian of the header's ``FWHM`` card (pixels);
5. ``fwhm-option`` -- a Gaussian of the caller's ``--fwhm`` (the last resort).

A PSF file is gpudiff's own (or an exposure's ``PSF`` HDU), a cube of PSFs on a grid of
positions, or a PSF image (WebbPSF's ``DET_SAMP``); :func:`read_psf_file` says how each is
recognised.  The input exposure is never modified: a new one carries the PSF.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable

import numpy as np
from astropy.io import fits

from ..errors import FitsReadError, InvalidInputError, PsfError
from .exposure import Exposure
from .input_maps import image_hdus, open_input
from .psf import GaussianPsf, GridPsf, ImagePsf, Psf

__all__ = ["PSF_SOURCES", "as_psf", "read_psf_file", "resolve_psf"]

#: Where a PSF came from, in fallback order.
PSF_SOURCES = ("option", "file", "stars", "header-fwhm", "fwhm-option")
# A PSF image whose light-weighted centroid is further than this from its central pixel
# is not centred the way every gpudiff PSF model is (kernel_image's centre pixel): using it
# would shift the matched template.  Half a pixel is the most a centred, undersampled PSF
# can be off by pixelisation; 1 px leaves room for an asymmetric (e.g. coma) wing.
_MAX_CENTROID_OFFSET = 1.0


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
    with open_input(path) as hdul:
        names = [str(h.name).upper() for h in hdul]
        images = image_hdus(hdul)
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


def as_psf(value, *, name: str = "psf") -> Psf:
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
        model = as_psf(psf, name=f"{name}: given PSF")
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
