"""MaskedImage: a float32 image, its float32 variance and an integer mask, with an origin.

The mask is int32 while its planes sit on bits 0…30 (afw's and lsst-images' word) and int64
when a plane needs bit 31…62 (:func:`~gpudiff.image.maskplanes.mask_dtype`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import Backend, resolve_backend
from ..errors import AllMaskedError, InvalidInputError, InvalidVarianceError, ShapeMismatchError
from .maskplanes import MaskPlanes, mask_dtype

__all__ = ["MaskedImage", "Box"]


@dataclass(frozen=True)
class Box:
    """An integer pixel box in parent coordinates: columns x0..x1-1, rows y0..y1-1."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    def intersection(self, other: "Box") -> "Box | None":
        """The overlap of two boxes, or ``None`` when they do not overlap."""
        x0, y0 = max(self.x0, other.x0), max(self.y0, other.y0)
        x1, y1 = min(self.x1, other.x1), min(self.y1, other.y1)
        if x1 <= x0 or y1 <= y0:
            return None
        return Box(x0, y0, x1, y1)

    def contains(self, other: "Box") -> bool:
        return (
            self.x0 <= other.x0
            and self.y0 <= other.y0
            and self.x1 >= other.x1
            and self.y1 >= other.y1
        )


def _as_2d(name: str, a: Any, dtype: Any, be: Backend) -> Any:
    if a is None:
        raise InvalidInputError(f"MaskedImage {name} is None")
    try:
        arr = be.asarray(a)
    except (TypeError, ValueError) as exc:  # ragged lists, objects: not an array at all
        raise InvalidInputError(f"MaskedImage {name} is not a numeric array ({exc})") from None
    if arr.ndim != 2:
        raise InvalidInputError(f"MaskedImage {name} must be 2-D, got shape {tuple(arr.shape)}")
    kind = np.dtype(arr.dtype).kind
    if kind not in "fiub":
        raise InvalidInputError(f"MaskedImage {name} has non-numeric dtype {arr.dtype}")
    if name == "mask" and kind == "f":
        raise InvalidInputError(f"MaskedImage mask must be integer, got dtype {arr.dtype}")
    # Always copy: gpudiff never shares (and so never modifies) a caller's buffer.
    if name == "mask" and np.dtype(dtype).itemsize > np.dtype(arr.dtype).itemsize and kind == "i":
        # Widening a signed mask: take its bits, not its sign (bit 31 of an int32 is a plane
        # bit in afw files, and must not spread to bits 32…63).
        arr = arr.view(np.dtype(arr.dtype).str.replace("i", "u"))
    return arr.astype(dtype, copy=True)


def _fetch_planes(be: Backend, planes) -> tuple[np.ndarray, ...]:
    """Host copies of device arrays in one transfer: their bytes (C order) concatenated
    on the device, split and viewed back on the host; exact for every dtype.  (As
    ``gpudiff.ops._host.fetch``, which this layer may not import.)"""
    xp = be.xp
    dev = [a if a.flags.c_contiguous else xp.ascontiguousarray(a) for a in planes]
    flat = be.asnumpy(xp.concatenate([a.reshape(-1).view(xp.uint8) for a in dev]))
    out, at = [], 0
    for a in dev:
        n, dt = int(a.nbytes), np.dtype(a.dtype)
        piece = flat[at : at + n]
        # A view of the transferred buffer where aligned (no host copy of a whole plane).
        piece = piece if at % dt.itemsize == 0 else piece.copy()
        out.append(piece.view(dt).reshape(a.shape))
        at += n
    return tuple(out)


class MaskedImage:
    """An image with variance and mask planes, all on one array backend.

    Parameters
    ----------
    image : 2-D array
        Pixel values; stored as float32.
    variance : 2-D array, optional
        Per-pixel variance; stored as float32.  Defaults to ones.
    mask : 2-D integer array, optional
        Bit mask; stored as int32, or int64 when ``mask_planes`` has a plane on bit 31…62.
        Defaults to zeros.
    xy0 : (int, int)
        Parent coordinates ``(x0, y0)`` of pixel ``[0, 0]`` (column, row), as in LSST.
    mask_planes : MaskPlanes, optional
        Name ↔ bit definition of ``mask``; LSST's defaults if omitted.  Copied.
    backend : Backend or str, optional
        Where the arrays live (``None``: the default backend).

    Notes
    -----
    Inputs are copied (and converted to native byte order), never modified.
    """

    __slots__ = ("image", "variance", "mask", "xy0", "mask_planes", "backend")

    def __init__(
        self,
        image: Any,
        variance: Any = None,
        mask: Any = None,
        xy0: tuple[int, int] = (0, 0),
        mask_planes: MaskPlanes | None = None,
        backend: Backend | str | None = None,
    ):
        be = resolve_backend(backend)
        planes = MaskPlanes() if mask_planes is None else mask_planes.copy()
        mdtype = mask_dtype(planes)
        img = _as_2d("image", image, np.float32, be)
        var = (
            be.xp.ones_like(img)
            if variance is None
            else _as_2d("variance", variance, np.float32, be)
        )
        msk = (
            be.xp.zeros(img.shape, dtype=mdtype)
            if mask is None
            else _as_2d("mask", mask, mdtype, be)
        )
        for name, arr in (("variance", var), ("mask", msk)):
            if tuple(arr.shape) != tuple(img.shape):
                raise ShapeMismatchError(
                    f"MaskedImage {name} has shape {tuple(arr.shape)} but image has shape "
                    f"{tuple(img.shape)}"
                )
        self.image = img
        self.variance = var
        self.mask = msk
        self.xy0 = (int(xy0[0]), int(xy0[1]))
        self.mask_planes = planes
        self.backend = be

    # --- geometry ---------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns)."""
        return tuple(self.image.shape)  # type: ignore[return-value]

    @property
    def bbox(self) -> Box:
        """The parent-coordinate box covered by this image."""
        x0, y0 = self.xy0
        return Box(x0, y0, x0 + self.shape[1], y0 + self.shape[0])

    # --- copies and transfers ---------------------------------------------------------
    @classmethod
    def _wrap(cls, image, variance, mask, *, xy0, mask_planes, backend) -> "MaskedImage":
        """A MaskedImage holding these backend arrays as they are: no copy, no checks.

        Library-internal, for planes the caller has just computed (or holds no other
        reference to) with the right dtypes and shapes: the public constructor's three
        copies are a device launch each.
        """
        out = cls.__new__(cls)
        out.image, out.variance, out.mask = image, variance, mask
        out.xy0 = (int(xy0[0]), int(xy0[1]))
        out.mask_planes = mask_planes.copy()
        out.backend = backend
        return out

    @classmethod
    def _adopt(cls, image, variance, mask, *, xy0, mask_planes, backend) -> "MaskedImage":
        """:meth:`_wrap` when the three planes are 2-D backend arrays of one shape with
        the constructor's dtypes (float32, float32, the planes' mask dtype), else the
        public constructor (which converts and copies them).  Library-internal: the
        caller hands over planes nobody else holds."""
        xp = backend.xp
        shape = getattr(image, "shape", None)
        if (
            isinstance(image, xp.ndarray)
            and isinstance(variance, xp.ndarray)
            and isinstance(mask, xp.ndarray)
            and len(shape) == 2
            and variance.shape == shape
            and mask.shape == shape
            and image.dtype == np.float32
            and variance.dtype == np.float32
            and mask.dtype == mask_dtype(mask_planes)
        ):
            return cls._wrap(
                image, variance, mask, xy0=xy0, mask_planes=mask_planes, backend=backend
            )
        return cls(image, variance, mask, xy0=xy0, mask_planes=mask_planes, backend=backend)

    def _new(
        self, image, variance, mask, xy0=None, mask_planes=None, backend=None
    ) -> "MaskedImage":
        return MaskedImage(
            image,
            variance,
            mask,
            xy0=self.xy0 if xy0 is None else xy0,
            mask_planes=self.mask_planes if mask_planes is None else mask_planes,
            backend=self.backend if backend is None else backend,
        )

    def copy(self) -> "MaskedImage":
        """A deep copy."""
        return self._new(self.image, self.variance, self.mask)

    def to_backend(self, backend: Backend | str | None) -> "MaskedImage":
        """A copy of this image with its arrays on ``backend``."""
        be = resolve_backend(backend)
        if be.name == self.backend.name:
            return self.copy()
        planes = (self.image, self.variance, self.mask)
        if self.backend.is_gpu and not be.is_gpu:
            # The three planes cross in one transfer (one host sync, not three), and the
            # host copies it makes are new arrays: held as they are, not copied again.
            planes = _fetch_planes(self.backend, planes)
        elif be.is_gpu and not self.backend.is_gpu:
            # The upload is the copy (the constructor would copy each plane once more on
            # the device: a launch each).
            planes = tuple(be.asarray(a) for a in planes)
        else:
            return self._new(*(self.backend.asnumpy(a) for a in planes), backend=be)
        return MaskedImage._adopt(*planes, xy0=self.xy0, mask_planes=self.mask_planes, backend=be)

    def to_numpy(self) -> "MaskedImage":
        """A copy on the NumPy backend."""
        return self.to_backend("numpy")

    def subimage(self, box: Box) -> "MaskedImage":
        """A copy of the part of this image inside ``box`` (parent coordinates)."""
        if not self.bbox.contains(box):
            raise InvalidInputError(f"subimage box {box} is not inside the image box {self.bbox}")
        x0, y0 = self.xy0
        sl = (slice(box.y0 - y0, box.y1 - y0), slice(box.x0 - x0, box.x1 - x0))
        return self._new(self.image[sl], self.variance[sl], self.mask[sl], xy0=(box.x0, box.y0))

    def on_box(self, box: Box) -> "MaskedImage":
        """A copy of this image on ``box`` (parent coordinates): its pixels where the two
        boxes overlap, NO_DATA (NaN image, infinite variance) elsewhere.

        As LSST's template retrieval leaves the science pixels no template covers: a
        template given on a partly overlapping box of the same pixel frame becomes one on
        the science box.  The boxes must overlap.
        """
        over = self.bbox.intersection(box)
        if over is None:
            raise InvalidInputError(f"box {box} does not overlap the image box {self.bbox}")
        xp = self.backend.xp
        planes = self.mask_planes.copy()
        no_data = 1 << planes.add("NO_DATA")
        mdtype = mask_dtype(planes)
        img = xp.full(box.shape, np.nan, dtype=np.float32)
        var = xp.full(box.shape, np.inf, dtype=np.float32)
        msk = xp.full(box.shape, no_data, dtype=mdtype)
        dst = (slice(over.y0 - box.y0, over.y1 - box.y0), slice(over.x0 - box.x0, over.x1 - box.x0))
        x0, y0 = self.xy0
        src = (slice(over.y0 - y0, over.y1 - y0), slice(over.x0 - x0, over.x1 - x0))
        img[dst] = self.image[src]
        var[dst] = self.variance[src]
        msk[dst] = self.mask[src].astype(mdtype, copy=False)
        return MaskedImage._wrap(
            img, var, msk, xy0=(box.x0, box.y0), mask_planes=planes, backend=self.backend
        )

    # --- arithmetic -------------------------------------------------------------------
    def divided_by(self, divisor: float) -> "MaskedImage":
        """A copy with the image divided by ``divisor`` and the variance by its square
        (afw ``MaskedImage /= c``); the mask is kept."""
        d = float(divisor)
        # The quotients are new arrays: held as they are (the constructor would copy them
        # again, a device launch each); the mask is copied.
        return MaskedImage._adopt(
            self.image / np.float32(d),
            self.variance / np.float32(d * d),
            self.mask.copy(),
            xy0=self.xy0,
            mask_planes=self.mask_planes,
            backend=self.backend,
        )

    def subtract(self, other: "MaskedImage", background: Any = None) -> "MaskedImage":
        """self − other (− background) as afw MaskedImage arithmetic.

        Variances add, masks OR (plane names merged, ``other``'s bits conformed onto the
        merged definition).  ``background`` is an array or scalar subtracted from the image
        only.  Both images must cover the same box.
        """
        if self.bbox != other.bbox:
            raise ShapeMismatchError(
                f"cannot subtract an image on {other.bbox} from one on {self.bbox}"
            )
        xp = self.backend.xp
        if other.backend.name != self.backend.name:
            other = other.to_backend(self.backend)
        planes = self.mask_planes.merge(other.mask_planes)
        mask = planes.conform(self.mask, self.mask_planes, xp) | planes.conform(
            other.mask, other.mask_planes, xp
        )
        image = self.image - other.image
        if background is not None:
            image = image - background
        # Three new planes: held as they are (no copies) when their dtypes are right.
        return MaskedImage._adopt(
            image,
            self.variance + other.variance,
            mask,
            xy0=self.xy0,
            mask_planes=planes,
            backend=self.backend,
        )

    # --- masks ------------------------------------------------------------------------
    def bitmask(self, names) -> int:
        """Bit mask of the named planes in this image's definition."""
        return self.mask_planes.bitmask(names)

    def mask_of(self, name: str) -> Any:
        """Boolean array: where plane ``name`` (under any of its spellings, e.g. ``SAT`` or
        ``SATURATED``) is set; all False when the plane is not defined."""
        bm = self.mask_planes.bitmask_if_present(name)
        return (self.mask & self.mask.dtype.type(bm)) != 0

    def with_plane_set(self, name: str, where: Any) -> "MaskedImage":
        """A copy with plane ``name`` (added if undefined; an alias counts) set where ``where`` is
        True."""
        mask, planes = self._plane_set(name, where)
        return self._with_mask(mask, planes)

    def _plane_set(self, name: str, where: Any) -> tuple[Any, MaskPlanes]:
        """The (mask, mask planes) of :meth:`with_plane_set`, not wrapped (nor copied)."""
        planes = self.mask_planes.copy()
        bit = planes.add(name)
        dtype = mask_dtype(planes)  # a plane on bit 31+ widens the mask to int64
        # (copy=False: the OR makes the new mask; a copy first is a launch for nothing)
        mask = self.mask.astype(dtype, copy=False) | (
            self.backend.xp.asarray(where).astype(dtype) << dtype.type(bit)
        )
        return mask, planes

    def with_planes_cleared(self, names) -> "MaskedImage":
        """A copy with the named planes (those defined) cleared; ``self`` if none is."""
        bm = self.mask_planes.bitmask_if_present(list(names))
        if not bm:
            return self
        return self._with_mask(self.mask & ~bm, self.mask_planes)

    def _with_mask(self, mask, mask_planes: MaskPlanes) -> "MaskedImage":
        """A copy with the new ``mask`` (an array made by the caller, held as it is: the
        constructor would copy it again, a device launch) and ``mask_planes``."""
        return MaskedImage._adopt(
            self.image.copy(),
            self.variance.copy(),
            mask,
            xy0=self.xy0,
            mask_planes=mask_planes,
            backend=self.backend,
        )

    def good_pixels(self, bad_planes=("NO_DATA",)) -> Any:
        """Boolean array: finite image and variance, and none of ``bad_planes`` set."""
        xp = self.backend.xp
        bm = self.mask_planes.bitmask_if_present(bad_planes)
        return ((self.mask & bm) == 0) & xp.isfinite(self.image) & xp.isfinite(self.variance)

    def validate(self, name: str = "image", bad_planes=("NO_DATA",)) -> None:
        """Check that this image can be used as an algorithm input.

        Raises
        ------
        AllMaskedError
            No pixel is usable.
        InvalidVarianceError
            Some usable pixel (not in ``bad_planes``, finite image) has zero, negative or
            non-finite variance.
        """
        counts = self.backend.asnumpy(self._validity_counts(bad_planes))
        self._check_validity(name, counts, bad_planes)

    def _validity_counts(self, bad_planes=("NO_DATA",)) -> Any:
        """Backend vector (usable pixels, usable pixels with a bad variance) of
        :meth:`validate`: callers validating several images fetch them together."""
        xp = self.backend.xp
        bm = self.mask_planes.bitmask_if_present(bad_planes)
        unmasked = ((self.mask & bm) == 0) & xp.isfinite(self.image)
        bad_var = unmasked & ~(xp.isfinite(self.variance) & (self.variance > 0))
        return xp.stack([unmasked.sum(), bad_var.sum()])

    def _check_validity(self, name: str, counts, bad_planes=("NO_DATA",)) -> None:
        """:meth:`validate`'s verdict on its host ``counts``."""
        n_ok, n_bad = (int(v) for v in counts)
        if n_ok == 0:
            raise AllMaskedError(
                f"{name}: every pixel is masked ({', '.join(bad_planes)}) or non-finite; nothing "
                "to work with"
            )
        if n_bad:
            xp = self.backend.xp
            bm = self.mask_planes.bitmask_if_present(bad_planes)
            unmasked = ((self.mask & bm) == 0) & xp.isfinite(self.image)
            bad_var = unmasked & ~(xp.isfinite(self.variance) & (self.variance > 0))
            raise InvalidVarianceError(
                f"{name}: {n_bad} unmasked pixel(s) have zero, negative or non-finite variance "
                f"(e.g. {float(self.variance[bad_var][0]):.3g} at the first one); "
                f"variance must be > 0 wherever the pixel is not masked ({', '.join(bad_planes)})"
            )

    def __repr__(self) -> str:
        return f"MaskedImage(shape={self.shape}, xy0={self.xy0}, backend={self.backend.name!r})"
