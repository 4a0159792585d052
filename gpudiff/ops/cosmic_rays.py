"""Cosmic-ray identification: pixels too sharp to be the PSF (LSST ``findCosmicRays`` idea).

A point source cannot fall off from its peak faster than the PSF does, so a pixel that
exceeds the mean of an opposite pair of neighbours by more than the PSF's own
peak-to-neighbour ratio allows (with ``cond3``·σ of slack on both) is a cosmic ray.
"""

from __future__ import annotations

import numpy as np

from ..backend import Backend, resolve_backend
from ..image import MaskedImage, Psf

__all__ = ["find_cosmic_rays"]


def find_cosmic_rays(
    mi: MaskedImage,
    psf: Psf,
    *,
    min_sigma: float = 6.0,
    cond3: float = 3.0,
    grow: int = 1,
    backend: Backend | str | None = None,
):
    """Boolean array (on the backend) of cosmic-ray pixels, grown by ``grow`` pixels.

    Parameters
    ----------
    mi : MaskedImage
        Background-free image (a difference image, or sky-subtracted).
    psf : Psf
        The image's PSF; its central kernel image sets the sharpest allowed profile.
    min_sigma : float
        A CR pixel is at least this many σ (from the variance plane) above zero.
    cond3 : float
        Slack, in σ, on both the pixel and its neighbours (LSST's ``cond3_fac``).
    """
    be = resolve_backend(backend) if backend is not None else mi.backend
    xp = be.xp
    img = xp.where(xp.isfinite(mi.image), mi.image, 0).astype(np.float32)
    sig = xp.sqrt(
        xp.where(xp.isfinite(mi.variance) & (mi.variance > 0), mi.variance, np.inf)
    ).astype(np.float32)
    k = np.asarray(psf.kernel_image(), dtype=np.float64)
    c = k.shape[0] // 2
    peak = k[c, c]
    pad = xp.pad(img, 1, mode="edge")
    spad = xp.pad(sig, 1, mode="edge")
    H, W = img.shape
    hi = img - cond3 * sig
    bright = img > min_sigma * sig
    cr = xp.zeros((H, W), dtype=bool)
    # (dy, dx) of one neighbour of each opposite pair, and the PSF's value there.
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        ratio = np.float32(peak / max(k[c + dy, c + dx], 1e-12))
        a = pad[1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W]
        b = pad[1 - dy : 1 - dy + H, 1 - dx : 1 - dx + W]
        sa = spad[1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W]
        sb = spad[1 - dy : 1 - dy + H, 1 - dx : 1 - dx + W]
        nb = 0.5 * (a + b) + cond3 * 0.5 * (sa + sb)
        cr |= bright & (hi > ratio * nb)
    if grow > 0:
        # No emptiness test first (a host sync on a device): an empty mask dilates to
        # itself.
        cr = be.ndimage.binary_dilation(cr, iterations=int(grow))
    return cr
