"""Registration check for two images said to share one pixel frame.

Two files without a WCS can only be paired through their ``xy0``; when a writer got that
wrong (afw cutouts whose IMAGE and MASK HDUs disagree on it, a template cut from another
box), the subtraction would fit a kernel to stars 15 px apart and report garbage.  The
cross-correlation of the two images over their overlap says where their content actually
coincides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError
from ..image import MaskedImage

__all__ = ["ContentOffset", "content_offset"]


@dataclass(frozen=True)
class ContentOffset:
    """Where the content of image ``b`` lies relative to image ``a`` in their common frame.

    Attributes
    ----------
    dx, dy : int
        Integer shift (pixels) that best aligns them: the feature at ``(x, y)`` in ``a``
        is at ``(x + dx, y + dy)`` in ``b``.
    zero_fraction : float
        The cross-correlation at zero shift over its peak (1 when they are registered).
    peak_sigma : float
        The peak's height in units of the correlation's robust scatter.
    """

    dx: int
    dy: int
    zero_fraction: float
    peak_sigma: float

    @property
    def registered(self) -> bool:
        """Within a pixel of zero shift, or no significant peak (nothing to register on).

        A peak below 8σ of the correlation's scatter is noise-like (an empty field); a
        shift of a pixel is what PSF differences and sub-pixel offsets give."""
        return (abs(self.dx) <= 1 and abs(self.dy) <= 1) or self.peak_sigma < 8.0


def _prepared(a: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Median-subtracted, clipped at ±(50 MADs) (so one saturated star or a garbage column
    does not decide the answer alone), zero where unusable."""
    v = a[ok]
    if v.size == 0:
        return np.zeros(a.shape, np.float64)
    med = float(np.median(v))
    mad = float(np.median(np.abs(v - med))) or 1.0
    return np.where(ok, np.clip(a - med, -50 * mad, 50 * mad), 0.0)


def content_offset(a: MaskedImage, b: MaskedImage, max_shift: int = 64) -> ContentOffset:
    """The integer shift between the contents of two images over their overlap.

    Parameters
    ----------
    a, b : MaskedImage
        The two images in their common parent frame (their ``xy0``).
    max_shift : int
        Largest shift searched, pixels, on each axis.

    Returns
    -------
    ContentOffset

    Raises
    ------
    InvalidInputError
        When the two boxes do not overlap.
    """
    over = a.bbox.intersection(b.bbox)
    if over is None:
        raise InvalidInputError(f"boxes {a.bbox} and {b.bbox} do not overlap")
    planes = []
    for mi in (a, b):
        sub = mi.subimage(over)
        img = np.asarray(sub.backend.asnumpy(sub.image), dtype=np.float64)
        msk = np.asarray(sub.backend.asnumpy(sub.mask))
        bad = sub.mask_planes.bitmask_if_present(["NO_DATA", "BAD", "SAT", "EDGE"])
        planes.append(_prepared(img, np.isfinite(img) & ((msk & bad) == 0)))
    h, w = over.shape
    # Zero-padded to twice the size: a linear, not circular, correlation.
    shape = (2 * h, 2 * w)
    corr = np.fft.irfft2(
        np.conj(np.fft.rfft2(planes[0], shape)) * np.fft.rfft2(planes[1], shape), shape
    )
    m = int(min(max_shift, h - 1, w - 1))
    rows = np.r_[0 : m + 1, shape[0] - m : shape[0]]
    cols = np.r_[0 : m + 1, shape[1] - m : shape[1]]
    win = corr[np.ix_(rows, cols)]
    shifts_y = np.r_[0 : m + 1, -m:0]
    shifts_x = np.r_[0 : m + 1, -m:0]
    iy, ix = np.unravel_index(int(np.argmax(win)), win.shape)
    peak = float(win[iy, ix])
    med = float(np.median(win))
    scatter = 1.4826 * float(np.median(np.abs(win - med))) or 1.0
    zero = float(win[0, 0])
    return ContentOffset(
        dx=int(shifts_x[ix]),
        dy=int(shifts_y[iy]),
        zero_fraction=zero / peak if peak > 0 else float("nan"),
        peak_sigma=(peak - med) / scatter,
    )
