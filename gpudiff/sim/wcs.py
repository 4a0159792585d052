"""World coordinate systems of simulated exposures."""

from __future__ import annotations

from typing import Any

from astropy.wcs import WCS

from ..image.masked_image import Box
from ._util import _as_box, _box_centre


def make_wcs(
    box: Any,
    *,
    ra: float = 150.0,
    dec: float = 2.2,
    pixel_scale: float = 0.2,
    reference: tuple[float, float] | None = None,
    xy0=(0, 0),
) -> WCS:
    """A TAN WCS (north up, east left) for an exposure covering ``box``.

    ``reference`` is the parent pixel at (ra, dec) (default: the box centre).  As
    :class:`~gpudiff.image.Exposure` requires, the WCS maps *array* pixels: array pixel
    [0, 0] is FITS pixel (1, 1), so CRPIX = reference − xy0 + 1.  Two exposures built with
    the same reference, ra, dec and scale agree on the sky position of every parent pixel.
    """
    box = _as_box(box, xy0)
    rx, ry = _box_centre(box) if reference is None else (float(reference[0]), float(reference[1]))
    s = float(pixel_scale) / 3600.0
    return _tan_wcs(box, (float(ra), float(dec)), (rx, ry), [[-s, 0.0], [0.0, s]])


def _tan_wcs(box: Box, crval, reference, cd) -> WCS:
    """A TAN WCS of the array pixels of ``box``, with parent pixel ``reference`` at sky
    position ``crval``."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.crval = list(crval)
    w.wcs.crpix = [reference[0] - box.x0 + 1.0, reference[1] - box.y0 + 1.0]
    w.wcs.cd = cd
    w.array_shape = box.shape
    return w
