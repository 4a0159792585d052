"""Scattering PSF stamps into an image: point sources and PSF-convolved Sérsic galaxies."""

from __future__ import annotations

import math

import numpy as np

from ..image.masked_image import Box
from ._util import _CHUNK_ELEMENTS, _odd
from .psfspec import _Renderer, _sample_offsets


#: Pending scatter entries before they are added into the image with one bincount.
_FLUSH_ENTRIES = 1 << 23

#: NumPy >= 2 has a fast ``np.add.at`` for 1-D integer indices; older versions scatter
#: with batched ``np.bincount`` instead (``add.at`` was ~100x slower there).
_FAST_ADD_AT = int(np.__version__.split(".")[0]) >= 2


class _Canvas:
    """Accumulates stamps into an image: ``np.add.at`` (NumPy >= 2) or batched ``np.bincount``."""

    def __init__(self, box: Box):
        self.box = box
        self.H, self.W = box.height, box.width
        self.flat = np.zeros(self.H * self.W, dtype=np.float64)
        self._idx: list[np.ndarray] = []
        self._val: list[np.ndarray] = []
        self._pending = 0

    def add(self, stamps: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> None:
        """Add stamps (n, S, S) whose centre pixels are at parent (cx, cy) (integers)."""
        n, S = stamps.shape[0], stamps.shape[1]
        if n == 0:
            return
        h = S // 2
        ox = np.asarray(cx, dtype=np.int64) - h - self.box.x0
        oy = np.asarray(cy, dtype=np.int64) - h - self.box.y0
        ar = np.arange(S, dtype=np.int64)
        ix = ox[:, None] + ar[None, :]
        iy = oy[:, None] + ar[None, :]
        vx = (ix >= 0) & (ix < self.W)
        vy = (iy >= 0) & (iy < self.H)
        if vx.all() and vy.all():
            idx = (iy[:, :, None] * self.W + ix[:, None, :]).ravel()
            val = stamps.ravel()
        else:
            valid = vy[:, :, None] & vx[:, None, :]
            idx = (iy[:, :, None] * self.W + ix[:, None, :])[valid]
            val = stamps[valid]
        val = np.ascontiguousarray(val, dtype=np.float64)
        if _FAST_ADD_AT:
            np.add.at(self.flat, idx, val)
            return
        self._idx.append(idx)
        self._val.append(val)
        self._pending += idx.size
        if self._pending >= max(_FLUSH_ENTRIES, self.H * self.W // 2):
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.flat += np.bincount(
                np.concatenate(self._idx),
                weights=np.concatenate(self._val),
                minlength=self.H * self.W,
            )
        self._idx, self._val, self._pending = [], [], 0

    def image(self) -> np.ndarray:
        self.flush()
        return self.flat.reshape(self.H, self.W)


def _overlapping(x: np.ndarray, y: np.ndarray, half: int, box: Box) -> np.ndarray:
    cx, cy = np.round(x), np.round(y)
    return (
        (cx + half >= box.x0)
        & (cx - half <= box.x1 - 1)
        & (cy + half >= box.y0)
        & (cy - half <= box.y1 - 1)
    )


def _render_points(canvas: _Canvas, renderer: _Renderer, x, y, flux) -> None:
    """Add point sources of total ``flux`` (ADU) at (x, y) rendered with ``renderer``."""
    x, y, flux = (np.asarray(v, dtype=np.float64) for v in (x, y, flux))
    keep = _overlapping(x, y, renderer.size // 2, canvas.box) & (flux != 0)
    x, y, flux = x[keep], y[keep], flux[keep]
    cx, cy = np.round(x).astype(np.int64), np.round(y).astype(np.int64)
    for a, b, st in renderer.stamps(x, y):
        st *= flux[a:b, None, None]
        canvas.add(st, cx[a:b], cy[a:b])


def _sersic_b(n: np.ndarray) -> np.ndarray:
    """b_n with I(r) ∝ exp(−b_n (r/r_e)^(1/n)) enclosing half the light within r_e
    (Ciotti & Bertin)."""
    return 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n) + 46.0 / (25515.0 * n * n)


def _galaxy_stamp_size(r_max: float, truncation: float = 5.0) -> int:
    """Odd side of the (unconvolved) galaxy stamps reaching ``truncation``·``r_max`` from the
    centre."""
    return _odd(2 * math.ceil(truncation * r_max) + 1)


def _render_galaxies(
    canvas: _Canvas,
    renderer: _Renderer,
    x,
    y,
    flux,
    r_eff,
    sersic_n,
    axis_ratio,
    theta,
    oversample: int = 5,
    truncation: float = 5.0,
) -> None:
    """Add elliptical Sérsic galaxies convolved with the local PSF.

    Each profile is rendered, pixel-integrated by ``oversample``, on a stamp reaching
    ``truncation``·r_eff along the major axis and normalized to unit sum, then convolved
    (FFT, full support, so the flux is kept) with the PSF kernel at the galaxy's pixel.
    """
    from scipy import fft as sfft

    x, y, flux, r_eff, sersic_n, axis_ratio, theta = (
        np.asarray(v, dtype=np.float64) for v in (x, y, flux, r_eff, sersic_n, axis_ratio, theta)
    )
    if x.size == 0:
        return
    G = max(_galaxy_stamp_size(float(r_eff.max()), truncation), 3)
    S = renderer.size
    L = G + S - 1
    keep = _overlapping(x, y, L // 2, canvas.box) & (flux != 0)
    if not keep.any():
        return
    x, y, flux, r_eff, sersic_n, axis_ratio, theta = (
        v[keep] for v in (x, y, flux, r_eff, sersic_n, axis_ratio, theta)
    )
    cx, cy = np.round(x).astype(np.int64), np.round(y).astype(np.int64)
    off = _sample_offsets(G, oversample)
    chunk = max(1, _CHUNK_ELEMENTS // (G * oversample) ** 2)
    nfft = sfft.next_fast_len(L, real=True)
    for a in range(0, x.size, chunk):
        b = min(x.size, a + chunk)
        c = b - a
        fx = (x[a:b] - cx[a:b])[:, None, None]
        fy = (y[a:b] - cy[a:b])[:, None, None]
        gx = off[None, None, :] - fx
        gy = off[None, :, None] - fy
        ct = np.cos(theta[a:b])[:, None, None]
        st = np.sin(theta[a:b])[:, None, None]
        u = gx * ct + gy * st
        v = (gy * ct - gx * st) / axis_ratio[a:b][:, None, None]
        r = np.sqrt(u * u + v * v) / r_eff[a:b][:, None, None]
        nn = sersic_n[a:b][:, None, None]
        prof = np.exp(-_sersic_b(nn) * r ** (1.0 / nn))
        # Cut at the truncation radius (elliptical), so the stamp shape does not show.
        prof[r > truncation] = 0.0
        gal = prof.reshape(c, G, oversample, G, oversample).mean(axis=(2, 4))
        gal /= gal.sum(axis=(1, 2), keepdims=True)
        ker = renderer.kernels(x[a:b], y[a:b])
        spec = sfft.rfft2(gal, s=(nfft, nfft)) * sfft.rfft2(ker, s=(nfft, nfft))
        conv = sfft.irfft2(spec, s=(nfft, nfft))[:, :L, :L]
        conv *= flux[a:b, None, None]
        canvas.add(conv, cx[a:b], cy[a:b])
