"""Files written by Rubin's afw-free image package ``lsst-images`` (``VisitImage``,
``DifferenceImage``, cell coadds, ...), read from the file's own facts, without the package.

The primary HDU carries ``DATAMODL``; ``IMAGE``, ``MASK``, ``VARIANCE`` are tile-compressed
images (GZIP_2, or RICE-quantized: astropy decompresses both); the mask planes are
``MSKNnnnn`` (name), ``MSKMnnnn`` (bit mask), ``MSKDnnnn`` (description) cards, one ``MASK``
HDU per 31 planes (``EXTVER`` 2 for planes 31…61); xy0 is the 'A' pixel WCS (``CRVAL1A/2A``;
there is no ``LTV``); the celestial WCS is the ``IMAGE`` header's FITS approximation (the
exact mapping is an AST frame set in the ``JSON`` tree).  The PSF comes from the ``JSON``
tree: a Gaussian (``sigma``, ``stamp_size``), a Piff model (rebuilt with ``piff`` when it is
installed, from the tree's structs and the ``PSF/PIFF/*`` tables), or, for a cell coadd, the
4-D ``PSF`` HDU (cells × kernel, one kernel per cell, NaN for missing cells), read as a
:class:`CellPsf` and never taken for a 2-D PSF image.  Other HDUs (``MASK_FRACTIONS/*``,
``NOISE_REALIZATIONS/*``, ``KERNEL/*``, provenance) are not part of an exposure; they are listed
at INFO level.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re

import numpy as np

from ...errors import FitsReadError
from ..exposure import Exposure, PhotoCalib
from ..masked_image import Box
from ..psf import GaussianPsf, Psf
from ._common import Hdus, log, plane, read_wcs, read_xy0, strip, warn
from .masks import read_mask
from .plain import variance_plane
from .psf_models import CellPsf, PiffPsf, piff_available

__all__ = ["detect", "read", "read_psf_of", "json_tree"]

NAME = "lsst-images"
# lsst-images' container cards (HDU index and JSON tree addresses, schema): not metadata.
_CONTAINER = re.compile(r"^(FMTVER|INDXADDR|INDXSIZE|JSONADDR|JSONSIZE|DATAMODL|DATE)$")
_OWN = {"PRIMARY", "IMAGE", "MASK", "VARIANCE", "JSON", "INDEX", "PSF"}


def detect(hdus: Hdus) -> bool:
    """``DATAMODL`` naming an lsst-images schema, or a ``JSON`` tree beside ``IMAGE``."""
    model = str(hdus.primary.get("DATAMODL", "") or "")
    return "images.lsst.io" in model or ("JSON" in hdus and "IMAGE" in hdus and "INDEX" in hdus)


def json_tree(hdus: Hdus) -> dict:
    """The file's JSON tree ({} when it has none or it cannot be parsed, with a warning)."""
    h = hdus.get("JSON")
    if h is None:
        return {}
    try:
        return json.loads(bytes(np.asarray(h.data[0][0], dtype=np.uint8)).decode("utf-8"))
    except Exception as exc:
        warn(
            hdus.path,
            f"the JSON tree of this lsst-images file could not be parsed ({type(exc).__name__}: "
            f"{exc}); "
            "its PSF is not read",
        )
        return {}


def read(hdus: Hdus, backend) -> Exposure:
    path = hdus.path
    img_hdu = hdus.get("IMAGE")
    image = plane(path, img_hdu, "IMAGE", np.float32)
    xy0 = read_xy0(img_hdu.header)
    tree = json_tree(hdus)
    yx0 = ((tree.get("image") or {}).get("yx0")) if isinstance(tree.get("image"), dict) else None
    if yx0 is not None and tuple(int(v) for v in yx0[::-1]) != xy0:
        warn(
            path,
            f"the 'A' WCS gives xy0 = {xy0}, the JSON tree {tuple(yx0[::-1])}; used the 'A' WCS",
        )
    metadata = strip(hdus.primary, _CONTAINER)
    if "BUNIT" in img_hdu.header and "BUNIT" not in metadata:
        metadata["BUNIT"] = (img_hdu.header["BUNIT"], "unit of the IMAGE pixels")
    var_hdu = hdus.get("VARIANCE")
    variance = variance_plane(path, var_hdu, image, metadata, "lsst-images")
    masks = hdus.all("MASK")
    if masks:
        mask, planes = read_mask(path, masks, image.shape)
    else:
        from ..maskplanes import MaskPlanes

        mask, planes = np.zeros(image.shape, np.int32), MaskPlanes()
    skipped = [r for r in hdus.roles if r not in _OWN and not r.startswith("PSF/")]
    if skipped:
        log.info("%s: HDUs not part of an exposure, not read: %s", path, ", ".join(skipped))
    bbox = Box(xy0[0], xy0[1], xy0[0] + image.shape[1], xy0[1] + image.shape[0])
    return Exposure.from_arrays(
        image,
        variance,
        mask,
        xy0=xy0,
        mask_planes=planes,
        psf=read_psf_of(hdus, tree, bbox),
        wcs=read_wcs(path, img_hdu.header, hdus.hdul),
        photo_calib=PhotoCalib(),
        metadata=metadata,
        backend=backend,
    )


def _bbox_from(hdus: Hdus) -> Box | None:
    h = hdus.get("IMAGE")
    if h is None:
        return None
    x0, y0 = read_xy0(h.header)
    ny, nx = int(h.header.get("NAXIS2", 0)), int(h.header.get("NAXIS1", 0))
    return Box(x0, y0, x0 + nx, y0 + ny)


def read_psf_of(hdus: Hdus, tree: dict | None = None, bbox: Box | None = None) -> Psf | None:
    """The PSF of an lsst-images file (module docstring); None, with a warning saying why,
    when it has one that cannot be read; None, logged, when it has none."""
    path = hdus.path
    tree = json_tree(hdus) if tree is None else tree
    bbox = _bbox_from(hdus) if bbox is None else bbox
    psf = tree.get("psf") if isinstance(tree, dict) else None
    if not isinstance(psf, dict):
        if "PSF" in hdus:
            warn(path, "a PSF HDU but no PSF description in the JSON tree: the PSF is not read")
        else:
            log.info("%s: no PSF in this lsst-images file", path)
        return None
    schema = str(psf.get("schema_url", ""))
    centre = (
        (bbox.x0 + (bbox.width - 1) / 2.0, bbox.y0 + (bbox.height - 1) / 2.0)
        if bbox is not None
        else (0.0, 0.0)
    )
    try:
        if "gaussian_psf" in schema or (
            "sigma" in psf and "piff" not in psf and "array" not in psf
        ):
            size = int(psf.get("stamp_size", 0) or 0)
            return GaussianPsf(
                sigma=float(psf["sigma"]),
                size=size if size % 2 == 1 else None,
                average_position=centre,
            )
        if "cell_psf" in schema or "array" in psf:
            return _cell_psf(hdus, psf)
        if "piff_psf" in schema or "piff" in psf:
            return _piff_psf(hdus, psf, bbox, centre)
    except FitsReadError:
        raise
    except Exception as exc:
        warn(
            path,
            f"the PSF ({schema or 'unknown type'}) could not be read ({type(exc).__name__}: "
            f"{exc}); "
            "no PSF read",
        )
        return None
    warn(
        path,
        f"the PSF is of a type gpudiff does not read ({schema or list(psf)}): no PSF read "
        "(give the PSF separately)",
    )
    return None


def _cell_psf(hdus: Hdus, psf: dict) -> CellPsf:
    src = str((psf.get("array") or {}).get("source", "fits:PSF"))
    h = hdus.get(src.split(":", 1)[-1].split("[", 1)[0] or "PSF")
    if h is None:
        raise FitsReadError(f"{hdus.path}: the cell PSF's array ({src}) is not in the file")
    data = np.asarray(h.data, dtype=np.float64)
    if data.ndim != 4:
        raise FitsReadError(
            f"{hdus.path}[PSF]: a cell PSF must be 4-D (cells × kernel), got shape {data.shape}"
        )
    bounds = psf["bounds"]
    grid, box = bounds["grid"], bounds["bbox"]
    cy, cx = int(grid["cell_shape"]["y"]), int(grid["cell_shape"]["x"])
    gy0, gx0 = int(grid["bbox"]["y"]["start"]), int(grid["bbox"]["x"]["start"])
    i0 = (int(box["y"]["start"]) - gy0) // cy
    j0 = (int(box["x"]["start"]) - gx0) // cx
    data = data.copy()
    for cell in bounds.get("missing", []) or []:
        i, j = int(cell["i"]) - i0, int(cell["j"]) - j0
        if 0 <= i < data.shape[0] and 0 <= j < data.shape[1]:
            data[i, j] = np.nan
    return CellPsf(data, gx0 + j0 * cx, gy0 + i0 * cy, cx, cy)


class _PiffTreeReader:
    """Piff's reader interface (``read_struct``, ``read_table``, ``read_wcs_map``, ``nested``)
    over an lsst-images PSF tree and its ``PSF/PIFF/*`` tables, as lsst-images' own adapter."""

    def __init__(self, model: dict, hdus: Hdus, base: str = ""):
        self._m, self._hdus, self._base = model, hdus, base

    def read_struct(self, name):
        return (self._m.get("structs") or {}).get(name)

    def read_table(self, name, metadata=None):
        t = (self._m.get("tables") or {}).get(name)
        if t is None:
            return None
        if metadata is not None:
            metadata.update(t.get("metadata") or {})
        cols = []
        for c in t["table"]["columns"]:
            ext, idx = str(c["data"]["source"]).split(":", 1)[-1].rsplit("[", 1)
            h = self._hdus.get(ext)
            if h is None:
                raise FitsReadError(f"{self._hdus.path}: the Piff table HDU {ext!r} is missing")
            a = np.asarray(h.data.field(int(idx.rstrip("]")) - 1))
            cols.append((c["name"], a.astype(a.dtype.newbyteorder("="))))
        out = np.empty(len(cols[0][1]), dtype=[(n, a.dtype, a.shape[1:]) for n, a in cols])
        for n, a in cols:
            out[n] = a
        return out

    def read_wcs_map(self, name, logger=None):
        import galsim

        w = (self._m.get("wcs") or {}).get(name)
        if w is None:
            return None, None
        if w.get("wcs_type") != "pixel_scale":
            raise ValueError(f"Piff WCS of type {w.get('wcs_type')!r} is not supported")
        return {0: galsim.PixelScale(float(w["scale"]))}, None

    @contextlib.contextmanager
    def nested(self, name):
        yield _PiffTreeReader(
            (self._m.get("objects") or {})[name], self._hdus, self.get_full_name(name)
        )

    def get_full_name(self, name):
        return f"{self._base}/{name}"


def _piff_psf(hdus: Hdus, psf: dict, bbox, centre) -> Psf | None:
    if not piff_available():
        warn(
            hdus.path,
            "the PSF is a Piff model; reading it needs the optional 'piff' package, which is not "
            "installed: no PSF read (install piff, or give the PSF separately)",
        )
        return None
    import piff
    from piff.config import PiffLogger

    model = piff.PSF._read(
        _PiffTreeReader(psf["piff"], hdus), "piff", PiffLogger(logging.getLogger("gpudiff.piff"))
    )
    stars = [
        s for s in psf.get("stars") or [] if not s.get("is_flagged") and not s.get("is_reserve")
    ]
    avg = (
        (
            float(np.mean([s["image_pos"]["x"] for s in stars])),
            float(np.mean([s["image_pos"]["y"] for s in stars])),
        )
        if stars
        else centre
    )
    return PiffPsf(model, int(psf.get("stamp_size", 25)), avg, bbox=bbox)
