"""Files written by the LSST Science Pipelines' afw (``Exposure.writeFits``), both generations.

- **before May 2021**: HDUs typed by an ``EXTTYPE`` card (``IMAGE``, ``MASK``, ``VARIANCE``,
  ``ARCHIVE_INDEX``, ``ARCHIVE_DATA``) and no ``EXTNAME``;
- **after**: the same, plus ``EXTNAME`` (archive HDUs named by class, e.g. ``PiffPsf``).

Read without afw: the pixels, the file's own ``MP_*`` mask bits (they differ from file to
file), the ``VARIANCE`` HDU (never re-estimated when it is there), xy0 from the 'A' pixel WCS
or ``LTV1/2``, the WCS from the ``IMAGE`` header's FITS cards (TAN-SIP included), the
photometric calibration from the archive's ``PhotoCalib`` (or ``FLUXMAG0``), and the PSF
from the archive when it can be rebuilt without afw: ``GaussianPsf``/``SingleGaussianPsf``,
``DoubleGaussianPsf``, a ``KernelPsf`` holding a ``FixedKernel`` image, or a ``PiffPsf``
when ``piff`` is installed.  A PSF that cannot be read leaves ``psf = None`` with a
:class:`FormatWarning` naming its class, never silently.
"""

from __future__ import annotations

import math
import re

import numpy as np
from astropy.io import fits

from ...errors import FitsReadError
from ..exposure import Exposure, PhotoCalib
from ..masked_image import Box
from ..psf import DoubleGaussianPsf, GaussianPsf, ImagePsf, Psf
from ._common import Hdus, log, plane, read_photocalib, read_wcs, read_xy0, role_of, strip, warn
from .masks import read_mask
from .plain import variance_plane
from .psf_models import PiffPsf, load_piff_pickle, piff_available, piff_average_position

__all__ = ["detect", "read", "read_psf_of", "AfwArchive"]

NAME = "afw"
_AFW_TYPES = ("IMAGE", "MASK", "VARIANCE", "ARCHIVE_INDEX", "ARCHIVE_DATA")
# Primary cards that point into the archive (or at its HDU): meaningless once the file is
# rewritten without that archive, so they are not metadata.
_ARCHIVE_POINTERS = re.compile(
    r"^(AR_HDU|ARCHIVE_ID_[A-Z0-9_]+|(PSF|SKYWCS|WCS|DETECTOR|PHOTOCALIB|CALIB|FILTER"
    r"|FILTERLABEL|APCORR|VALIDPOLYGON|TRANSMISSIONCURVE|COADDINPUTS|VISITINFO"
    r"|SUMMARYSTATS|BACKGROUND)_ID)$"
)
_AB_NJY = 3631e9  # nJy of an AB magnitude-0 source (afw's FLUXMAG0 reference)


def detect(hdus: Hdus) -> bool:
    """An HDU with afw's ``EXTTYPE`` card (IMAGE, MASK, VARIANCE or archive tables)."""
    return any(str(h.header.get("EXTTYPE", "")).strip().upper() in _AFW_TYPES for h in hdus.hdul)


def read(hdus: Hdus, backend) -> Exposure:
    path = hdus.path
    img_hdu = hdus.get("IMAGE")
    if img_hdu is None:
        raise FitsReadError(
            f"{path}: an afw file (EXTTYPE cards) without an IMAGE HDU; the HDUs are "
            f"{hdus.listing()}"
        )
    image = plane(path, img_hdu, "IMAGE", np.float32)
    xy0 = read_xy0(img_hdu.header)
    var_hdu, mask_hdu = hdus.get("VARIANCE"), hdus.get("MASK")
    for what, h in (("MASK", mask_hdu), ("VARIANCE", var_hdu)):
        if h is not None and read_xy0(h.header) != xy0 and _has_xy0(h.header):
            warn(
                path,
                f"the {what} HDU says xy0 = {read_xy0(h.header)}, the IMAGE HDU {xy0}; "
                "used the IMAGE's",
            )
    metadata = strip(hdus.primary, _ARCHIVE_POINTERS)
    variance = variance_plane(path, var_hdu, image, metadata, "afw")
    if mask_hdu is not None:
        mask, planes = read_mask(path, [mask_hdu], image.shape)
    else:
        from ..maskplanes import MaskPlanes

        mask, planes = np.zeros(image.shape, np.int32), MaskPlanes()
    bbox = Box(xy0[0], xy0[1], xy0[0] + image.shape[1], xy0[1] + image.shape[0])
    archive = AfwArchive.find(hdus)
    return Exposure.from_arrays(
        image,
        variance,
        mask,
        xy0=xy0,
        mask_planes=planes,
        psf=read_psf_of(hdus, archive, bbox),
        wcs=read_wcs(path, img_hdu.header, hdus.hdul),
        photo_calib=_photocalib(hdus, archive),
        metadata=metadata,
        backend=backend,
    )


def _has_xy0(header) -> bool:
    return any(k in header for k in ("LTV1", "CRVAL1A"))


# ------------------------------------------------------------------------------ archive
class AfwArchive:
    """afw's object archive: an ``ARCHIVE_INDEX`` table and ``ARCHIVE_DATA`` tables
    (``AR_CATN``)."""

    def __init__(self, index, catalogs: dict):
        self.index = index  # FITS_rec with id, cat.archive, cat.persistable, row0, nrows, name
        self.catalogs = catalogs  # AR_CATN -> BinTableHDU

    @classmethod
    def find(cls, hdus: Hdus) -> "AfwArchive | None":
        index = next(
            (
                h
                for h in hdus.hdul
                if isinstance(h, fits.BinTableHDU)
                and (
                    str(h.header.get("EXTTYPE", "")).strip().upper() == "ARCHIVE_INDEX"
                    or role_of(h) == "ARCHIVE_INDEX"
                )
            ),
            None,
        )
        if index is None or index.data is None:
            return None
        cats = {
            int(h.header["AR_CATN"]): h
            for h in hdus.hdul
            if isinstance(h, fits.BinTableHDU) and "AR_CATN" in h.header and h is not index
        }
        return cls(index.data, cats)

    def class_of(self, obj_id: int) -> str | None:
        rows = self.index[np.asarray(self.index["id"]) == obj_id]
        return None if len(rows) == 0 else str(rows["name"][0]).strip()

    def records(self, obj_id: int) -> list:
        """The object's catalogs, in its own order: each a list of table rows."""
        rows = self.index[np.asarray(self.index["id"]) == obj_id]
        out = []
        for r in sorted(rows, key=lambda r: int(r["cat.persistable"])):
            hdu = self.catalogs.get(int(r["cat.archive"]))
            if hdu is None or hdu.data is None:
                raise FitsReadError(
                    f"afw archive catalog {int(r['cat.archive'])} of object {obj_id} is missing"
                )
            out.append(hdu.data[int(r["row0"]) : int(r["row0"]) + int(r["nrows"])])
        return out

    def ids_of_class(self, *names: str) -> list[int]:
        return sorted(
            {
                int(i)
                for i, n in zip(self.index["id"], self.index["name"])
                if str(n).strip() in names
            }
        )


def _archive_id(primary, what: str) -> int | None:
    for key in (f"ARCHIVE_ID_{what}", f"{what}_ID"):
        if key in primary:
            try:
                v = int(primary[key])
            except (TypeError, ValueError):
                continue
            return v if v > 0 else None
    return None


def _field(rec, *names, default=None):
    cols = {c.lower(): c for c in rec.array.dtype.names}
    for n in names:
        if n.lower() in cols:
            return rec[cols[n.lower()]]
    if default is not None:
        return default
    raise KeyError(f"none of the columns {names}")


def _dimension(rec) -> int:
    try:
        return int(_field(rec, "dimensions_x", "width"))
    except KeyError:
        return 0


def read_psf_of(
    hdus: Hdus, archive: "AfwArchive | None" = None, bbox: Box | None = None
) -> Psf | None:
    """The PSF of an afw file's archive (module docstring); None, with a warning saying why,
    when the file has one that cannot be read; None, logged, when it has none."""
    path = hdus.path
    archive = AfwArchive.find(hdus) if archive is None else archive
    psf_id = _archive_id(hdus.primary, "PSF")
    if archive is None:
        if psf_id is not None:
            warn(
                path,
                f"the primary header points at a PSF (archive id {psf_id}) but the file has no afw "
                "archive: no PSF read",
            )
        else:
            log.info("%s: no PSF in this afw file", path)
        return None
    if psf_id is None:  # files whose primary lost the pointer: any PSF-like object of the archive
        ids = [
            i
            for i in archive.ids_of_class(
                "PiffPsf",
                "KernelPsf",
                "GaussianPsf",
                "SingleGaussianPsf",
                "DoubleGaussianPsf",
                "CoaddPsf",
                "PcaPsf",
                "PsfexPsf",
            )
        ]
        if not ids:
            log.info("%s: no PSF in this afw file", path)
            return None
        psf_id = ids[0]
    cls = archive.class_of(psf_id)
    if cls is None:
        warn(path, f"the PSF (archive id {psf_id}) is not in the file's afw archive: no PSF read")
        return None
    try:
        psf = _decode(archive, psf_id, cls, path, bbox)
    except Exception as exc:  # a malformed table: say so, never a silent None
        warn(
            path,
            f"the {cls} PSF in the afw archive could not be read ({type(exc).__name__}: {exc}); no "
            "PSF read",
        )
        return None
    if psf is not None:
        log.info("%s: PSF read from the afw archive (%s)", path, cls)
    return psf


def _decode(archive: AfwArchive, obj_id: int, cls: str, path: str, bbox) -> Psf | None:
    (rec, *_), *_ = archive.records(obj_id)
    avg = (
        (bbox.x0 + (bbox.width - 1) / 2.0, bbox.y0 + (bbox.height - 1) / 2.0)
        if bbox is not None
        else (0.0, 0.0)
    )
    if cls in ("GaussianPsf", "SingleGaussianPsf"):
        size = _dimension(rec)
        return GaussianPsf(
            sigma=float(_field(rec, "sigma")),
            size=size if size % 2 == 1 else None,
            average_position=avg,
        )
    if cls == "DoubleGaussianPsf":
        size = _dimension(rec)
        return DoubleGaussianPsf(
            float(_field(rec, "sigma1")),
            float(_field(rec, "sigma2")),
            b=float(_field(rec, "b")),
            size=size if size % 2 == 1 else None,
            average_position=avg,
        )
    if cls == "KernelPsf":
        kernel_id = int(_field(rec, "kernel"))
        kcls = archive.class_of(kernel_id)
        if kcls != "FixedKernel":
            warn(path, f"the KernelPsf's kernel is a {kcls}, which only afw evaluates: no PSF read")
            return None
        (krec, *_), *_ = archive.records(kernel_id)
        w, h = (
            int(_field(krec, "dimensions_x", "width")),
            int(_field(krec, "dimensions_y", "height")),
        )
        img = np.asarray(_field(krec, "image"), dtype=np.float64).reshape(h, w)
        with_avg = (
            float(_field(rec, "averagePosition_x", default=avg[0])),
            float(_field(rec, "averagePosition_y", default=avg[1])),
        )
        return ImagePsf(img, average_position=with_avg)
    if cls == "PiffPsf":
        if not piff_available():
            warn(
                path,
                "the PSF is a PiffPsf (a pickled Piff model); reading it needs the optional 'piff' "
                "package, which is not installed: no PSF read (install piff, or give the PSF "
                "separately)",
            )
            return None
        width, _, model = load_piff_pickle(bytes(np.asarray(_field(rec, "bytes"), dtype=np.uint8)))
        return PiffPsf(model, width, piff_average_position(model, avg), bbox=bbox)
    warn(
        path,
        f"the PSF is an afw {cls}, which gpudiff cannot rebuild without afw: no PSF read "
        "(give the PSF separately)",
    )
    return None


def _photocalib(hdus: Hdus, archive: "AfwArchive | None") -> PhotoCalib:
    """The archive's ``PhotoCalib`` (its mean), else ``FLUXMAG0``, else gpudiff's ``PHOTCAL``, else
    1."""
    pid = _archive_id(hdus.primary, "PHOTOCALIB")
    if archive is not None and pid is not None and archive.class_of(pid) == "PhotoCalib":
        try:
            (rec, *_), *_ = archive.records(pid)
            mean, err = float(_field(rec, "calibrationMean")), float(_field(rec, "calibrationErr"))
            if math.isfinite(mean) and mean > 0:
                return PhotoCalib(mean, err if math.isfinite(err) and err >= 0 else 0.0)
        except Exception as exc:
            warn(
                hdus.path,
                f"the afw PhotoCalib could not be read ({type(exc).__name__}: {exc}); "
                "calibration 1",
            )
    p = hdus.primary
    try:
        f0 = float(p.get("FLUXMAG0", 0.0) or 0.0)
        f0err = float(p.get("FLUXMAG0ERR", 0.0) or 0.0)
    except (TypeError, ValueError):
        f0 = 0.0
    if math.isfinite(f0) and f0 > 0:
        mean = _AB_NJY / f0
        return PhotoCalib(mean, mean * f0err / f0 if math.isfinite(f0err) and f0err > 0 else 0.0)
    return read_photocalib(p)
