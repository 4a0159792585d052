"""Is the light at a position sharper than the PSF along a line?  (faint cosmic-ray tracks)

A cosmic ray too faint for the per-pixel test of :func:`~gpudiff.ops.cosmic_rays.
find_cosmic_rays` (a track of 3–7σ pixels: LSST's ``cond3`` slack needs ~8σ) survives
into the difference, where convolveScience smooths it with the matching kernel into a
PSF-sized blob that no test on the difference can tell from a transient.  On the science
image it is still a one-pixel-wide line.  At each position this module compares two
matched filters of the science image, in units of its noise:

* ``P``: the PSF's (the S/N of a point source there);
* ``L``: a line of ``length`` pixels, one pixel wide, in 4 directions (rows, columns,
  diagonals), through the position and its neighbours within ``search`` px.

For a point source ``L = ρ·P`` (ρ = the correlation of the line with the PSF, ≈ 0.6 for a
2-px FWHM); white noise leaves ``L − ρP`` with variance ``1 − ρ²``.  The statistic is the
largest ``T = (L − ρP) / sqrt(1 − ρ²)`` over directions and centres, and ``ratio = L/P``.
A track of 5σ pixels gives ``T`` ≈ 4–6 and ``ratio`` ≈ 1; point sources ``T`` ≈ 1 ± 1
and ``ratio`` ≈ ρ, up to the PSF model's error, which grows with S/N (hence a ratio
threshold as well as a significance one).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ..backend import Backend, resolve_backend
from ..image import MaskedImage, Psf
from .stats import gather_stamps_many

__all__ = ["line_sharpness"]

#: Directions of the line filters (dy, dx): rows, columns, both diagonals.
_DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))


def _line_taps(length: int, dy: int, dx: int) -> list[tuple[int, int]]:
    h = length // 2
    return [(k * dy, k * dx) for k in range(-h, h + 1)]


def line_sharpness(
    mi: MaskedImage,
    psf: Psf,
    x: Any,
    y: Any,
    *,
    length: int = 5,
    search: int = 1,
    bad_planes=("NO_DATA", "BAD", "SAT", "EDGE", "CR", "INTRP"),
    backend: Backend | str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Line-versus-PSF sharpness of an image at given positions.

    Parameters
    ----------
    mi : MaskedImage
        The image (not background-subtracted is fine: each stamp's median is removed).
    psf : Psf
        Its PSF.
    x, y : array (n,)
        Parent positions.
    length : int
        Line filter length, pixels (odd).
    search : int
        Centres within this many pixels of the position are tried.
    bad_planes : tuple of str
        Pixels with these planes (those present), non-finite pixels and pixels off the
        image count as zero signal.
    backend : Backend or str, optional

    Returns
    -------
    t, ratio, rho : ndarray (n,)
        The largest significance ``T`` of line over point-source light, the largest
        ``L/P`` (with ``P`` at its largest over the centres), and the PSF's ρ.
    """
    be = resolve_backend(backend) if backend is not None else mi.backend
    xp = be.xp
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    n = x.size
    if n == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    length = int(length) | 1
    fwhm = float(psf.fwhm())
    hp = max(int(np.ceil(1.5 * fwhm)), length // 2, 2)
    sp = 2 * hp + 1
    half = hp + int(search)
    xi, yi = np.floor(x + 0.5).astype(np.int64), np.floor(y + 0.5).astype(np.int64)
    # The PSF centred on the pixel (a filter, not a fit: the search covers the sub-pixel
    # offset), unit norm.
    p = np.stack([psf.compute_image(float(a), float(b), size=sp) for a, b in zip(xi, yi)])
    p = p / np.sqrt((p * p).sum(axis=(1, 2), keepdims=True))
    rho = np.zeros((n, len(_DIRECTIONS)))
    for j, (dy, dx) in enumerate(_DIRECTIONS):
        taps = _line_taps(length, dy, dx)
        rho[:, j] = sum(p[:, hp + a, hp + b] for a, b in taps) / np.sqrt(len(taps))
    rho = np.clip(rho, 0.0, 0.99)
    img = mi.image if mi.backend.name == be.name else be.asarray(mi.backend.asnumpy(mi.image))
    var = mi.variance if mi.backend.name == be.name else be.asarray(mi.backend.asnumpy(mi.variance))
    msk = mi.mask if mi.backend.name == be.name else be.asarray(mi.backend.asnumpy(mi.mask))
    rows, cols = yi - mi.xy0[1], xi - mi.xy0[0]
    (si, sv, sm), inside = gather_stamps_many(be, (img, var, msk), rows, cols, half, (0, 0, 0))
    bm = mi.mask_planes.bitmask_if_present(list(bad_planes))
    good = inside & ((sm & bm) == 0) & xp.isfinite(si) & xp.isfinite(sv) & (sv > 0)
    si = si.astype(np.float64)
    # Each stamp's sky: its median over good pixels (NaN elsewhere); its noise: the
    # variance plane's median there (the science noise is near white and smooth).
    with warnings.catch_warnings():
        # A stamp with no usable pixel (NO_DATA, off the image) has a NaN median: its z
        # is zero below, and its T and ratio NaN (never flagged).
        warnings.simplefilter("ignore", RuntimeWarning)
        sky = xp.nanmedian(xp.where(good, si, xp.nan).reshape(n, -1), axis=1)
        sig = xp.sqrt(xp.nanmedian(xp.where(good, sv, xp.nan).reshape(n, -1), axis=1))
    z = xp.where(good, (si - sky[:, None, None]) / sig[:, None, None], 0.0)
    z = xp.where(xp.isfinite(z), z, 0.0)
    # Every centre's PSF window and every direction's line taps are gathers of flat
    # indices into the stamps (a handful of device calls for all sources, not one per
    # centre, direction and tap).
    S = 2 * half + 1
    zf = z.reshape(n, S * S)
    s = int(search)
    offs = [(oy, ox) for oy in range(-s, s + 1) for ox in range(-s, s + 1)]
    centres = np.array([(half + oy) * S + (half + ox) for oy, ox in offs], dtype=np.int64)
    dy, dx = np.mgrid[-hp : hp + 1, -hp : hp + 1]
    window = centres[:, None] + (dy * S + dx).ravel()[None, :]  # (centres, sp²)
    lines = np.array(
        [[a * S + b for a, b in _line_taps(length, *d)] for d in _DIRECTIONS], dtype=np.int64
    )  # (directions, length)
    pd = be.asarray(p.reshape(n, 1, sp * sp))
    Ps = (zf[:, be.asarray(window)] * pd).sum(axis=2)  # (n, centres)
    # The centre: where the PSF filter peaks (the light's position).  Lines through an
    # off-peak centre would pass beside a point source's peak while its P drops: the
    # comparison is made at one centre.
    k = xp.argmax(Ps, axis=1)
    best_p = xp.take_along_axis(Ps, k[:, None], axis=1)[:, 0]
    taps = be.asarray(centres)[k][:, None] + be.asarray(lines.ravel())[None, :]
    L = xp.take_along_axis(zf, taps, axis=1).reshape(n, len(_DIRECTIONS), -1).sum(axis=2)
    L = L / np.sqrt(lines.shape[1])
    rd = be.asarray(rho)
    best_t = ((L - rd * best_p[:, None]) / xp.sqrt(1.0 - rd * rd)).max(axis=1)
    best_l = L.max(axis=1)
    ratio = best_l / xp.where(best_p > 0, best_p, xp.nan)
    t, ratio = (np.asarray(v) for v in be.asnumpy(xp.stack([best_t, ratio])))
    return t, ratio, rho.max(axis=1)
