"""TractGrid: the pixel geometry of one tract and its patches (a stand-in for LSST's skyMap).

A tract is a box of pixels in one coordinate frame; it is cut into patches of a fixed
*inner* size, each grown by an *overlap* border (clipped to the tract) to make the outer
box that a warp or coadd of that patch covers.  Warps are :class:`~gpudiff.image.Exposure`
s whose ``xy0`` places them in the tract frame, so the patch of a warp is found from its
box, and any two warps are compared pixel by pixel where their boxes intersect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from ..errors import InvalidInputError, NoOverlapError
from .masked_image import Box

__all__ = ["TractGrid"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise InvalidInputError(f"TractGrid {name} must be a positive integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class TractGrid:
    """Tract bounding box and patch layout, in tract pixel coordinates.

    Parameters
    ----------
    bbox : Box
        The tract's pixels (parent coordinates: columns x0..x1-1, rows y0..y1-1).
    patch_inner : int or (int, int)
        Inner patch size (width, height) in pixels; LSST's default is 4000.
    patch_overlap : int
        Border added on every side of a patch's inner box (LSST: 100 px); the outer box is
        clipped to the tract.

    Notes
    -----
    Patches are numbered like LSST's sequential patch index, ``iy * nx + ix``, with
    ``ix`` along x (columns).  Patches at the top/right edge may have a smaller inner box
    when the tract is not a multiple of the patch size.
    """

    bbox: Box
    patch_inner: tuple[int, int] = (4000, 4000)
    patch_overlap: int = 100

    def __post_init__(self):
        if not isinstance(self.bbox, Box):
            raise InvalidInputError(f"TractGrid bbox must be a Box, got {type(self.bbox).__name__}")
        if self.bbox.width < 1 or self.bbox.height < 1:
            raise InvalidInputError(f"TractGrid bbox {self.bbox} is empty")
        pi = self.patch_inner
        pw, ph = (pi, pi) if isinstance(pi, (int,)) else tuple(pi)
        object.__setattr__(
            self,
            "patch_inner",
            (_positive_int("patch_inner", pw), _positive_int("patch_inner", ph)),
        )
        ov = self.patch_overlap
        if isinstance(ov, bool) or int(ov) != ov or int(ov) < 0:
            raise InvalidInputError(
                f"TractGrid patch_overlap must be a non-negative integer, got {ov!r}"
            )
        object.__setattr__(self, "patch_overlap", int(ov))

    @classmethod
    def from_size(
        cls,
        width: int,
        height: int | None = None,
        patch_inner=None,
        patch_overlap: int = 100,
        xy0: tuple[int, int] = (0, 0),
    ) -> "TractGrid":
        """A tract of ``width`` × ``height`` pixels starting at ``xy0``.

        ``patch_inner`` defaults to half the tract (2 × 2 patches)."""
        width = _positive_int("width", width)
        height = width if height is None else _positive_int("height", height)
        if patch_inner is None:
            patch_inner = (-(-width // 2), -(-height // 2))
        x0, y0 = int(xy0[0]), int(xy0[1])
        return cls(Box(x0, y0, x0 + width, y0 + height), patch_inner, patch_overlap)

    # --- layout ----------------------------------------------------------------------
    @property
    def n_patches_x(self) -> int:
        return -(-self.bbox.width // self.patch_inner[0])

    @property
    def n_patches_y(self) -> int:
        return -(-self.bbox.height // self.patch_inner[1])

    @property
    def n_patches(self) -> int:
        return self.n_patches_x * self.n_patches_y

    def patch_ids(self) -> Iterator[int]:
        """Sequential patch indices, row by row."""
        return iter(range(self.n_patches))

    def patch_xy(self, patch: int) -> tuple[int, int]:
        """(ix, iy) of a sequential patch index."""
        if isinstance(patch, bool) or int(patch) != patch or not 0 <= int(patch) < self.n_patches:
            raise InvalidInputError(f"patch index must lie in [0, {self.n_patches}), got {patch!r}")
        return int(patch) % self.n_patches_x, int(patch) // self.n_patches_x

    def inner_box(self, patch: int) -> Box:
        """The patch's inner box (the region the patch owns)."""
        ix, iy = self.patch_xy(patch)
        pw, ph = self.patch_inner
        b = self.bbox
        x0, y0 = b.x0 + ix * pw, b.y0 + iy * ph
        return Box(x0, y0, min(x0 + pw, b.x1), min(y0 + ph, b.y1))

    def outer_box(self, patch: int) -> Box:
        """The inner box grown by the overlap, clipped to the tract (a warp's extent)."""
        i, o = self.inner_box(patch), self.patch_overlap
        return Box(i.x0 - o, i.y0 - o, i.x1 + o, i.y1 + o).intersection(self.bbox)

    def patch_of(self, box: Box) -> int:
        """The patch whose inner box holds the centre of ``box`` (e.g. a warp's bbox).

        Raises
        ------
        NoOverlapError
            ``box`` does not lie within the tract.
        """
        if not self.bbox.contains(box):
            raise NoOverlapError(f"box {box} is not inside the tract {self.bbox}")
        cx, cy = (box.x0 + box.x1 - 1) // 2, (box.y0 + box.y1 - 1) // 2
        ix = (cx - self.bbox.x0) // self.patch_inner[0]
        iy = (cy - self.bbox.y0) // self.patch_inner[1]
        return iy * self.n_patches_x + ix

    def __repr__(self) -> str:
        return (
            f"TractGrid(bbox={self.bbox}, patches {self.n_patches_x}x{self.n_patches_y} of "
            f"{self.patch_inner[0]}x{self.patch_inner[1]} px + {self.patch_overlap} px overlap)"
        )
