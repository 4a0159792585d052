"""Warp sources for coaddition: read a warp one row band at a time.

A coadd of N warps must never need all N warps in memory at once (design.md, "Performance
principles"), so the assembly tasks do not take images: they take **warp sources**, small
objects that hand out any box of a warp on request.  The protocol is:

``name : str``
    Used in messages and summaries.
``bbox : Box``
    The parent-coordinate box the warp covers (warps share the coadd's pixel grid).
``mask_planes : MaskPlanes``
    The name ↔ bit definition of the masks it returns.
``psf : Psf or None``, ``wcs``, ``photo_calib : PhotoCalib``
    Metadata read once, without the pixels.
``read(box) -> MaskedImage``
    The pixels of ``box`` (which lies inside ``bbox``), on any backend.

Three implementations cover the usual cases: :class:`ExposureWarp` (an Exposure or a
MaskedImage already in memory, on the host or on the device), :class:`FitsWarp` (an
LSST-layout FITS file read lazily, one section per call, through astropy's memory map) and
anything else that follows the protocol.  :func:`as_warp` turns a path, an Exposure or a
MaskedImage into a source.  This module is the I/O seam of the coadd tasks: FITS files are
only *read*, and only when the caller handed paths in.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

import numpy as np
from astropy.io import fits

from ..backend import Backend
from ..backend.threads import parallel_map
from ..errors import FitsReadError, GpudiffError, InvalidInputError
from ..image import Box, Exposure, MaskedImage, MaskPlanes, PhotoCalib, Psf
from ..image import io as _io

__all__ = ["WarpSource", "ExposureWarp", "FitsWarp", "as_warp", "read_padded", "stream_map"]


@runtime_checkable
class WarpSource(Protocol):
    """What the coadd tasks need of a warp (see the module docstring)."""

    name: str
    bbox: Box
    mask_planes: MaskPlanes
    psf: Psf | None
    wcs: Any
    photo_calib: PhotoCalib

    def read(self, box: Box) -> MaskedImage:  # pragma: no cover - protocol
        ...


class ExposureWarp:
    """A warp held in memory (an :class:`Exposure` or a :class:`MaskedImage`).

    ``read`` returns views' copies on the image's own backend, so device-resident warps
    are sliced on the device without a transfer.
    """

    def __init__(
        self, image: Exposure | MaskedImage, name: str | None = None, psf: Psf | None = None
    ):
        if isinstance(image, Exposure):
            self._mi = image.masked_image
            self.psf = image.psf if psf is None else psf
            self.wcs = image.wcs
            self.photo_calib = image.photo_calib
            visit = image.metadata.get("VISIT")
        elif isinstance(image, MaskedImage):
            self._mi, self.psf, self.wcs, self.photo_calib, visit = (
                image,
                psf,
                None,
                PhotoCalib(),
                None,
            )
        else:
            raise InvalidInputError(
                f"ExposureWarp needs an Exposure or MaskedImage, got {type(image).__name__}"
            )
        self.name = (
            name if name is not None else (f"visit {visit}" if visit is not None else "warp")
        )
        self.bbox = self._mi.bbox
        self.mask_planes = self._mi.mask_planes

    @property
    def backend(self) -> Backend:
        return self._mi.backend

    def read(self, box: Box) -> MaskedImage:
        if box == self.bbox:
            return self._mi
        return self._mi.subimage(box)

    def __repr__(self) -> str:
        return f"ExposureWarp({self.name!r}, bbox={self.bbox})"


class FitsWarp:
    """A warp in an LSST-layout FITS file (``IMAGE``, ``MASK``, ``VARIANCE``), read lazily.

    The headers (shape, xy0, mask planes, WCS, calibration) and the PSF HDU are read when
    the object is made; pixels are read per :meth:`read` call as a section of the
    memory-mapped HDUs, so a row band of a 4096² warp costs only that band.  A file in
    another layout (CCDData, plain image) is read whole on first use by
    :func:`gpudiff.image.read_exposure` and kept (it is not an LSST warp).

    Raises
    ------
    FitsReadError
        The file is missing or unreadable, or its HDUs are inconsistent (message names it).
    """

    def __init__(self, path: str | os.PathLike, name: str | None = None):
        self.path = os.fspath(path)
        self.name = name if name is not None else self.path
        self._whole: Exposure | None = None
        if not os.path.isfile(self.path):
            raise FitsReadError(
                f"{self.path}: "
                + ("not a regular file" if os.path.exists(self.path) else "no such file")
            )
        try:
            with fits.open(self.path, memmap=True) as hdul:
                names = [str(h.name).upper() for h in hdul]
                if "IMAGE" not in names or "VARIANCE" not in names:
                    self._adopt(_io.read_exposure(self.path, backend="numpy"))
                    return
                hdr = hdul["IMAGE"].header
                shape = (int(hdr.get("NAXIS2", 0)), int(hdr.get("NAXIS1", 0)))
                if hdr.get("NAXIS", 0) != 2 or min(shape) <= 0:
                    raise FitsReadError(
                        f"{self.path}[IMAGE]: not a 2-D image (NAXIS={hdr.get('NAXIS')})"
                    )
                for other in ("VARIANCE", "MASK"):
                    if other in names and tuple(hdul[other].shape) != shape:
                        raise FitsReadError(
                            f"{self.path}[{other}]: shape {hdul[other].shape} differs from "
                            f"the IMAGE shape {shape}"
                        )
                x0, y0 = _io.read_xy0(hdr)
                self.bbox = Box(x0, y0, x0 + shape[1], y0 + shape[0])
                self.mask_planes = (
                    MaskPlanes.from_header(hdul["MASK"].header) if "MASK" in names else MaskPlanes()
                )
                self._has_mask = "MASK" in names
                self.psf = _io.psf_from_hdus(hdul)
                self.wcs = _io.read_wcs(self.path, hdr, hdul)
                self.photo_calib = _io.read_photocalib(hdul[0].header, hdr)
        except GpudiffError as exc:
            raise (
                exc if isinstance(exc, FitsReadError) else FitsReadError(f"{self.path}: {exc}")
            ) from exc
        except Exception as exc:
            raise FitsReadError(
                f"{self.path}: cannot open as a warp ({type(exc).__name__}: {exc})"
            ) from exc

    def _adopt(self, exposure: Exposure) -> None:
        self._whole = exposure
        self.bbox, self.mask_planes, self.psf = exposure.bbox, exposure.mask_planes, exposure.psf
        self.wcs, self.photo_calib, self._has_mask = exposure.wcs, exposure.photo_calib, True

    def read(self, box: Box) -> MaskedImage:
        if not self.bbox.contains(box):
            raise InvalidInputError(
                f"{self.path}: box {box} is not inside the warp box {self.bbox}"
            )
        if self._whole is not None:
            return self._whole.masked_image.subimage(box)
        x0, y0 = self.bbox.x0, self.bbox.y0
        sl = (slice(box.y0 - y0, box.y1 - y0), slice(box.x0 - x0, box.x1 - x0))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with fits.open(self.path, memmap=True) as hdul:
                    img = np.asarray(hdul["IMAGE"].section[sl], dtype=np.float32)
                    var = np.asarray(hdul["VARIANCE"].section[sl], dtype=np.float32)
                    msk = (
                        np.asarray(hdul["MASK"].section[sl]).astype(np.int32)
                        if self._has_mask
                        else np.zeros(img.shape, np.int32)
                    )
        except Exception as exc:
            raise FitsReadError(
                f"{self.path}: cannot read rows {box.y0}..{box.y1 - 1} "
                f"({type(exc).__name__}: {exc}); the file is truncated or corrupt"
            ) from exc
        return MaskedImage(
            img, var, msk, xy0=(box.x0, box.y0), mask_planes=self.mask_planes, backend="numpy"
        )

    def __repr__(self) -> str:
        return f"FitsWarp({self.path!r}, bbox={self.bbox})"


def as_warp(obj: Any, name: str | None = None) -> Any:
    """A warp source for ``obj``: a path (:class:`FitsWarp`, named by its path), an Exposure
    or MaskedImage (:class:`ExposureWarp`, named ``name`` plus its visit), or an object that
    already follows :class:`WarpSource`.

    Raises
    ------
    InvalidInputError
        ``obj`` is none of these; the message names it (``name``) and its type.
    """
    if isinstance(obj, (str, os.PathLike)):
        return FitsWarp(obj)
    if isinstance(obj, (Exposure, MaskedImage)):
        visit = obj.metadata.get("VISIT") if isinstance(obj, Exposure) else None
        label = name if visit is None or name is None else f"{name} (visit {visit})"
        return ExposureWarp(obj, name=label)
    if all(hasattr(obj, a) for a in ("read", "bbox", "mask_planes")):
        return obj
    what = f"{name}: " if name else ""
    raise InvalidInputError(
        f"{what}a warp must be a FITS path, an Exposure, a MaskedImage or an object with "
        f"read(box), bbox and mask_planes; got {type(obj).__name__}"
    )


def read_padded(warp: Any, box: Box, backend: Backend) -> MaskedImage | None:
    """``warp.read`` of the part of ``box`` the warp covers, padded to ``box`` with no-data
    pixels (image NaN, variance +inf, ``NO_DATA``), on backend ``backend``; None without overlap."""
    inter = warp.bbox.intersection(box)
    if inter is None:
        return None
    mi = warp.read(inter)
    if not isinstance(mi, MaskedImage) or mi.bbox != inter:
        raise InvalidInputError(
            f"{warp.name}: read({inter}) returned {mi!r}, not a MaskedImage on that box"
        )
    if mi.backend.name != backend.name:
        mi = mi.to_backend(backend)
    if inter == box:
        return mi
    xp = backend.xp
    planes = mi.mask_planes.copy()
    nd = np.int32(1 << planes.add("NO_DATA"))
    img = xp.full(box.shape, xp.nan, dtype=xp.float32)
    var = xp.full(box.shape, xp.inf, dtype=xp.float32)
    msk = xp.full(box.shape, nd, dtype=xp.int32)
    sl = (slice(inter.y0 - box.y0, inter.y1 - box.y0), slice(inter.x0 - box.x0, inter.x1 - box.x0))
    img[sl], var[sl], msk[sl] = mi.image, mi.variance, mi.mask
    return MaskedImage(img, var, msk, xy0=(box.x0, box.y0), mask_planes=planes, backend=backend)


def stream_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """``fn(x)`` for each of ``items``, in order, computed ``workers`` at a time.

    The coadd tasks' per-band and per-warp workers *return* their results (they write no
    shared arrays), and the caller folds each into its outputs as it comes.  Handing them
    over one batch of ``workers`` at a time, rather than all at the end, keeps at most
    ``workers`` results alive: a per-warp result is a coadd-sized image, so N of them would
    undo the point of reading warps band by band.

    Parameters
    ----------
    fn : callable
    items : iterable
    workers : int
        Threads per batch (:func:`gpudiff.backend.threads.parallel_map`); 1 runs the
        items one by one on the calling thread.

    Yields
    ------
    object
        ``fn(x)``, in the order of ``items``.
    """
    items = list(items)
    step = max(1, int(workers))
    for k in range(0, len(items), step):
        yield from parallel_map(fn, items[k : k + step], step)
