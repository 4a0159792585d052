"""Cosmic-ray identification: pixels too sharp to be the PSF (LSST ``findCosmicRays`` idea).

A point source cannot fall off from its peak faster than the PSF does, so a pixel that
exceeds the mean of an opposite pair of neighbours by more than the PSF's own
peak-to-neighbour ratio allows (with ``cond3``·σ of slack on both) is a cosmic ray.
"""

from __future__ import annotations

import numpy as np

from ..backend import Backend, resolve_backend
from ..image import MaskedImage, Psf
from .stats import sky_level

__all__ = ["find_cosmic_rays"]


def find_cosmic_rays(
    mi: MaskedImage,
    psf: Psf,
    *,
    min_sigma: float = 6.0,
    cond3: float = 3.0,
    grow: int = 1,
    exclude_planes: tuple[str, ...] = (),
    subtract_sky: bool = False,
    extend_sigma: float | None = None,
    extend_cond3: float = 0.4,
    extend_passes: int = 16,
    backend: Backend | str | None = None,
):
    """Boolean array (on the backend) of cosmic-ray pixels, grown by ``grow`` pixels.

    Parameters
    ----------
    mi : MaskedImage
        Background-free image (a difference image, or sky-subtracted), unless
        ``subtract_sky``.
    psf : Psf
        The image's PSF; its central kernel image sets the sharpest allowed profile.
    min_sigma : float
        A CR pixel is at least this many σ (from the variance plane) above zero.
    cond3 : float
        Slack, in σ, on both the pixel and its neighbours (LSST's ``cond3_fac``).
    grow : int
        Grow the rays by this many pixels (4-connected).
    exclude_planes : tuple of str
        Pixels with any of these mask planes set (those present) never seed a ray: a
        garbage bad column is as sharp as a ray, and growing it would mark its clean
        neighbours too (they then lose the defect's own handling downstream).
    subtract_sky : bool
        Subtract the image's sky level first: the median of its finite, unmasked pixels
        (every 4th row and column).  The tests compare a pixel with ``ratio`` times its
        neighbours, so a sky level left in scales the required excess with it (a sky of
        1000 at σ = 32 hid every ray below ~26σ) and makes every pixel a candidate (on
        the CPU the sparse test then reads the whole image: 5.5 CPU-s at 4096²).
    extend_sigma : float, optional
        Extend the rays along their tracks (LSST's second pass with ``cond3_fac2``): an
        8-neighbour of a ray pixel joins it when it is at least ``extend_sigma`` σ above
        zero and passes the sharpness test with the slack ``extend_cond3`` (LSST's
        ``cond3_fac2`` = 0.4), repeated up to ``extend_passes`` times.  A track found over
        5 of its 20 pixels (its brightest) is then found whole.  None: no extension.
    extend_cond3, extend_passes : float, int
        See ``extend_sigma``.
    backend : Backend or str, optional
    """
    be = resolve_backend(backend) if backend is not None else mi.backend
    xp = be.xp
    finite = xp.isfinite(mi.image)
    img = xp.where(finite, mi.image, 0).astype(np.float32, copy=False)
    if subtract_sky:
        sky = sky_level(mi)
        # No usable pixel (NaN): nothing to subtract.
        sky = xp.where(xp.isnan(sky), xp.float32(0), sky) if be.is_gpu else np.nan_to_num(sky)
        img = img - xp.asarray(sky, dtype=np.float32)
    sig = xp.sqrt(
        xp.where(xp.isfinite(mi.variance) & (mi.variance > 0), mi.variance, np.inf)
    ).astype(np.float32, copy=False)
    k = np.asarray(psf.kernel_image(), dtype=np.float64)
    c = k.shape[0] // 2
    peak = k[c, c]
    # (dy, dx) of one neighbour of each opposite pair, and the PSF's peak-to-neighbour
    # ratio there.
    dirs = ((0, 1), (1, 0), (1, 1), (1, -1))
    ratios = [np.float32(peak / max(k[c + dy, c + dx], 1e-12)) for dy, dx in dirs]
    bright = img > min_sigma * sig
    skip = mi.mask_planes.bitmask_if_present(list(exclude_planes)) if exclude_planes else 0
    if skip:
        bright &= (mi.mask & skip) == 0
    if not be.is_gpu:
        # On the CPU only the bright pixels (a few percent) are tested and the few rays
        # are grown in place: ~5x less time than the whole-image arrays.
        rows, cols = _sharp_sparse(img, sig, bright, dirs, ratios, cond3)
        if extend_sigma is not None and rows.size:
            rows, cols = _extend_sparse(
                img, sig, rows, cols, dirs, ratios, extend_cond3, extend_sigma,
                (mi.mask & skip) != 0 if skip else None, int(extend_passes),
            )  # fmt: skip
        return _grow_sparse(img.shape, rows, cols, int(grow))
    if extend_sigma is None:
        cr = _sharp_dense(xp, img, sig, bright, dirs, ratios, cond3)
    else:
        # Every pixel that may join a track, tested once (sharing the seed test's
        # neighbour sums); the tracks then grow into them by a fixed number of masked
        # 8-connected dilations (no emptiness test: a sync).
        cr, can = _sharp_dense(
            xp, img, sig, bright, dirs, ratios, cond3,
            also=(img > extend_sigma * sig, extend_cond3),
        )  # fmt: skip
        if skip:
            can &= (mi.mask & skip) == 0
        cr = be.ndimage.binary_dilation(
            cr,
            structure=be.asarray(np.ones((3, 3), dtype=bool)),
            iterations=int(extend_passes),
            mask=can | cr,
        )
    if grow > 0:
        # No emptiness test first (a host sync on a device): an empty mask dilates to
        # itself.
        cr = be.ndimage.binary_dilation(cr, iterations=int(grow))
    return cr


# Both tests below evaluate, for each pair of opposite neighbours a, b (edge pixels
# repeated beyond the border) with noise σ_a, σ_b, the same float32 expression
#     img − cond3·σ > ratio · (½(a + b) + cond3·½(σ_a + σ_b))
# on the bright pixels (img > min_sigma·σ): the same bits either way.


def _sharp_dense(xp, img, sig, bright, dirs, ratios, cond3: float, also=None):
    """The test on every pixel, the four directions stacked: ~25 device launches.

    ``also``: (bright, cond3) of a second test of the same image (the track extension's
    looser one), sharing the neighbour sums; then both masks are returned."""
    H, W = img.shape
    pad = xp.pad(img, 1, mode="edge")
    spad = xp.pad(sig, 1, mode="edge")

    def shifted(a, sign):
        return xp.stack(
            [
                a[1 + sign * dy : 1 + sign * dy + H, 1 + sign * dx : 1 + sign * dx + W]
                for dy, dx in dirs
            ]
        )

    mean_nb = 0.5 * (shifted(pad, 1) + shifted(pad, -1))
    mean_snb = 0.5 * (shifted(spad, 1) + shifted(spad, -1))
    ratio = xp.asarray(np.asarray(ratios, dtype=np.float32))[:, None, None]

    def test(b, c3):
        # The float32 expression of the sparse test: (img − c3·σ) > ratio·(mean + c3·σ̄).
        return b & ((img - c3 * sig)[None] > ratio * (mean_nb + c3 * mean_snb)).any(axis=0)

    first = test(bright, cond3)
    return first if also is None else (first, test(*also))


def _sharp_sparse(img, sig, bright, dirs, ratios, cond3: float):
    """The test on the bright pixels only (NumPy): a few percent of the image.  Returns
    the (rows, columns) of the sharp pixels, row-major."""
    r, c = np.divmod(np.flatnonzero(bright), img.shape[1])
    hit = _sharp_at(img, sig, r, c, dirs, ratios, cond3)
    return r[hit], c[hit]


def _sharp_at(img, sig, r, c, dirs, ratios, cond3: float):
    """The test at the pixels (r, c) (NumPy): a bool per pixel."""
    H, W = img.shape
    idx = r * W + c
    hi = img.ravel()[idx] - cond3 * sig.ravel()[idx]
    hit = np.zeros(idx.size, dtype=bool)
    for (dy, dx), ratio in zip(dirs, ratios):
        # Clamped coordinates: numpy.pad's "edge" mode.
        ia = np.clip(r + dy, 0, H - 1) * W + np.clip(c + dx, 0, W - 1)
        ib = np.clip(r - dy, 0, H - 1) * W + np.clip(c - dx, 0, W - 1)
        a, b = img.ravel()[ia], img.ravel()[ib]
        sa, sb = sig.ravel()[ia], sig.ravel()[ib]
        nb = 0.5 * (a + b) + cond3 * 0.5 * (sa + sb)
        hit |= hi > ratio * nb
    return hit


def _extend_sparse(img, sig, rows, cols, dirs, ratios, cond3, min_sigma, skip, passes):
    """Rays (rows, cols) extended along their tracks, on the host: each pass tests the
    8-neighbours of the previous pass's new pixels (see ``extend_sigma``); the same
    pixels as the device's masked dilation."""
    H, W = img.shape
    cr = np.zeros((H, W), dtype=bool)
    cr[rows, cols] = True
    fr, fc = rows, cols
    offs = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    for _ in range(passes):
        rr = np.concatenate([fr + dy for dy, _ in offs])
        cc = np.concatenate([fc + dx for _, dx in offs])
        ok = (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
        rr, cc = rr[ok], cc[ok]
        keep = ~cr[rr, cc]
        rr, cc = rr[keep], cc[keep]
        if not rr.size:
            break
        flat = np.unique(rr * W + cc)
        rr, cc = np.divmod(flat, W)
        cand = img[rr, cc] > min_sigma * sig[rr, cc]
        if skip is not None:
            cand &= ~skip[rr, cc]
        rr, cc = rr[cand], cc[cand]
        if not rr.size:
            break
        hit = _sharp_at(img, sig, rr, cc, dirs, ratios, cond3)
        nr, nc = rr[hit], cc[hit]
        if not nr.size:
            break
        cr[nr, nc] = True
        fr, fc = nr, nc
    return np.nonzero(cr)


def _grow_sparse(shape, rows, cols, grow: int):
    """The bool image of the pixels (rows, cols) grown ``grow`` times by the 4-connected
    cross: ``scipy.ndimage.binary_dilation(cr, iterations=grow)`` (outside the image
    counts as unset), from the few set pixels instead of the whole image."""
    H, W = shape
    cr = np.zeros((H, W), dtype=bool)
    cr[rows, cols] = True
    for _ in range(grow):
        if not rows.size:
            break
        rr = np.concatenate([rows - 1, rows + 1, rows, rows])
        cc = np.concatenate([cols, cols, cols - 1, cols + 1])
        ok = (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
        new = ~cr[rr[ok], cc[ok]]
        rows, cols = rr[ok][new], cc[ok][new]  # the next pass grows only the new pixels
        cr[rows, cols] = True
    return cr
