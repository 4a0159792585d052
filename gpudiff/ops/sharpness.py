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

__all__ = ["line_sharpness", "line_sharpness_many"]

#: Planes whose pixels count as no light.
_BAD_PLANES = ("NO_DATA", "BAD", "SAT", "EDGE", "CR", "INTRP")

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
    bad_planes=_BAD_PLANES,
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
    return line_sharpness_many(
        [(mi, psf, x, y)], length=length, search=search, bad_planes=bad_planes, backend=backend
    )[0]


def line_sharpness_many(
    jobs,
    *,
    length: int = 5,
    search: int = 1,
    bad_planes=_BAD_PLANES,
    backend: Backend | str | None = None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`line_sharpness` of several images at once (the science at the positive DIA
    records, the template at the negative ones): each image's stamps are cut on its own,
    the filters run on all of them together and the results cross to the host in one
    transfer.

    Parameters
    ----------
    jobs : sequence of (MaskedImage, Psf, x, y)
    length, search, bad_planes, backend
        As :func:`line_sharpness`.

    Returns
    -------
    list of (t, ratio, rho)
        One per job, as :func:`line_sharpness` returns.
    """
    jobs = [
        (
            mi,
            psf,
            np.atleast_1d(np.asarray(x, np.float64)),
            np.atleast_1d(np.asarray(y, np.float64)),
        )
        for mi, psf, x, y in jobs
    ]
    counts = [x.size for _, _, x, _ in jobs]
    out = [(np.zeros(0), np.zeros(0), np.zeros(0)) for _ in jobs]
    live = [j for j, c in enumerate(counts) if c]
    if not live:
        return out
    be = resolve_backend(backend) if backend is not None else jobs[live[0]][0].backend
    xp = be.xp
    length = int(length) | 1
    # One filter size for all: the broadest PSF's (1.5 FWHM, at least the line's half).
    hp = max([int(np.ceil(1.5 * float(jobs[j][1].fwhm()))) for j in live] + [length // 2, 2])
    sp = 2 * hp + 1
    half = hp + int(search)
    zs, ps = [], []
    for j in live:
        mi, psf, x, y = jobs[j]
        xi, yi = np.floor(x + 0.5).astype(np.int64), np.floor(y + 0.5).astype(np.int64)
        # The PSF centred on the pixel (a filter, not a fit: the search covers the
        # sub-pixel offset), unit norm.
        if getattr(psf, "spatially_constant", False):  # one image everywhere
            p0 = psf.compute_image(float(xi[0]), float(yi[0]), size=sp)
            p = np.broadcast_to(p0, (xi.size,) + p0.shape)
        else:
            p = np.stack([psf.compute_image(float(a), float(b), size=sp) for a, b in zip(xi, yi)])
        ps.append(p / np.sqrt((p * p).sum(axis=(1, 2), keepdims=True)))
        zs.append(_z_stamps(be, mi, yi - mi.xy0[1], xi - mi.xy0[0], half, bad_planes))
    p = np.concatenate(ps)
    n = p.shape[0]
    z = zs[0] if len(zs) == 1 else xp.concatenate(zs)
    rho = np.zeros((n, len(_DIRECTIONS)))
    for j, (dy, dx) in enumerate(_DIRECTIONS):
        taps = _line_taps(length, dy, dx)
        rho[:, j] = sum(p[:, hp + a, hp + b] for a, b in taps) / np.sqrt(len(taps))
    rho = np.clip(rho, 0.0, 0.99)
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
    rho = rho.max(axis=1)
    start = 0
    for j in live:
        sl = slice(start, start + counts[j])
        out[j] = (t[sl], ratio[sl], rho[sl])
        start += counts[j]
    return out


def _z_stamps(be: Backend, mi: MaskedImage, rows, cols, half: int, bad_planes):
    """Stamps (n, 2·half+1, 2·half+1) of ``mi`` in units of its noise, each stamp's sky
    (median of its usable pixels) removed; unusable pixels zero."""
    xp = be.xp
    n = rows.size
    img = mi.image if mi.backend.name == be.name else be.asarray(mi.backend.asnumpy(mi.image))
    var = mi.variance if mi.backend.name == be.name else be.asarray(mi.backend.asnumpy(mi.variance))
    msk = mi.mask if mi.backend.name == be.name else be.asarray(mi.backend.asnumpy(mi.mask))
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
    return xp.where(xp.isfinite(z), z, 0.0)
