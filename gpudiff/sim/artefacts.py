"""Detector and optical artefacts: satellite trails, ghosts, cosmic rays, bad columns and
NO_DATA regions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import InvalidInputError
from ..image.masked_image import Box
from ._util import _finite_number, _loguniform


@dataclass(frozen=True)
class Trail:
    """A satellite trail: an infinite straight line with a Gaussian cross-section.

    Parameters
    ----------
    x, y : float
        A parent position on the line.
    angle : float
        Direction of the line, degrees counter-clockwise from +x.
    brightness : float
        Peak surface brightness on the line (ADU per pixel).
    width : float
        Gaussian σ of the cross-section, pixels.
    """

    x: float
    y: float
    angle: float
    brightness: float
    width: float = 1.5

    def __post_init__(self):
        for name in ("x", "y", "angle", "brightness"):
            _finite_number(f"Trail {name}", getattr(self, name))
        _finite_number("Trail width", self.width, positive=True)


@dataclass(frozen=True)
class Ghost:
    """An optical ghost: a uniform disk or annulus with soft (tanh) edges.

    Parameters
    ----------
    x, y : float
        Parent position of the centre.
    radius : float
        Outer radius, pixels.
    brightness : float
        Surface brightness inside (ADU per pixel).
    inner_radius : float
        Inner radius of a pupil-like annulus (0: a disk).
    softness : float
        Edge width, pixels.
    """

    x: float
    y: float
    radius: float
    brightness: float
    inner_radius: float = 0.0
    softness: float = 1.0

    def __post_init__(self):
        for name in ("x", "y", "brightness"):
            _finite_number(f"Ghost {name}", getattr(self, name))
        _finite_number("Ghost radius", self.radius, positive=True)
        _finite_number("Ghost inner_radius", self.inner_radius, nonneg=True)
        _finite_number("Ghost softness", self.softness, positive=True)
        if self.inner_radius >= self.radius:
            raise InvalidInputError("Ghost inner_radius must be smaller than radius")


def _render_trails(trails: Sequence[Trail], box: Box) -> tuple[np.ndarray, np.ndarray]:
    """Trail light (H, W) and the truth mask of the pixels within 3σ of a trail's line."""
    H, W = box.shape
    light = np.zeros((H, W))
    mask = np.zeros((H, W), dtype=bool)
    for t in trails:
        ang = math.radians(t.angle)
        ca, sa = math.cos(ang), math.sin(ang)
        reach = 6.0 * t.width
        if abs(ca) >= abs(sa):  # mostly horizontal: one window of rows per column
            cols = np.arange(W)
            xc = cols + box.x0
            yc = t.y + (xc - t.x) * sa / ca
            half = int(math.ceil(reach / abs(ca))) + 1
            rows = (
                np.round(yc).astype(np.int64)[:, None]
                + np.arange(-half, half + 1)[None, :]
                - box.y0
            )
            ci = np.broadcast_to(cols[:, None], rows.shape)
            ok = (rows >= 0) & (rows < H)
            ri, ci = rows[ok], ci[ok]
        else:  # mostly vertical: one window of columns per row
            rws = np.arange(H)
            yc = rws + box.y0
            xc = t.x + (yc - t.y) * ca / sa
            half = int(math.ceil(reach / abs(sa))) + 1
            cols = (
                np.round(xc).astype(np.int64)[:, None]
                + np.arange(-half, half + 1)[None, :]
                - box.x0
            )
            ri = np.broadcast_to(rws[:, None], cols.shape)
            ok = (cols >= 0) & (cols < W)
            ri, ci = ri[ok], cols[ok]
        d = -sa * (ci + box.x0 - t.x) + ca * (ri + box.y0 - t.y)
        val = t.brightness * np.exp(-0.5 * (d / t.width) ** 2)
        light[ri, ci] += val  # (row, column) pairs are unique within one trail
        mask[ri[np.abs(d) <= 3 * t.width], ci[np.abs(d) <= 3 * t.width]] = True
    return light, mask


def _render_ghosts(ghosts: Sequence[Ghost], box: Box) -> tuple[np.ndarray, np.ndarray]:
    H, W = box.shape
    light = np.zeros((H, W))
    mask = np.zeros((H, W), dtype=bool)
    for g in ghosts:
        reach = g.radius + 6 * g.softness
        xa, xb = (
            max(box.x0, int(math.floor(g.x - reach))),
            min(box.x1, int(math.ceil(g.x + reach)) + 1),
        )
        ya, yb = (
            max(box.y0, int(math.floor(g.y - reach))),
            min(box.y1, int(math.ceil(g.y + reach)) + 1),
        )
        if xa >= xb or ya >= yb:
            continue
        xx = np.arange(xa, xb, dtype=np.float64)[None, :]
        yy = np.arange(ya, yb, dtype=np.float64)[:, None]
        r = np.hypot(xx - g.x, yy - g.y)
        val = 0.5 * (1.0 - np.tanh((r - g.radius) / g.softness))
        if g.inner_radius > 0:
            val = val * 0.5 * (1.0 + np.tanh((r - g.inner_radius) / g.softness))
        val *= g.brightness
        sl = (slice(ya - box.y0, yb - box.y0), slice(xa - box.x0, xb - box.x0))
        light[sl] += val
        mask[sl] |= np.abs(val) >= 0.01 * abs(g.brightness)
    return light, mask


def _cosmic_rays(
    rng: np.random.Generator, n: int, box: Box, amplitude: tuple[float, float], max_length: float
) -> np.ndarray:
    """Cosmic-ray charge (ADU) per pixel: straight, one-pixel-wide tracks and point hits.

    Each ray has a uniformly random start, direction and length in [0, max_length]
    (lengths below 1 px are single-pixel hits); every pixel it crosses gets its
    amplitude (log-uniform in ``amplitude``) times a random factor in [0.5, 1].
    """
    H, W = box.shape
    if n == 0:
        return np.zeros((H, W))
    x0 = rng.uniform(-0.5, W - 0.5, n)
    y0 = rng.uniform(-0.5, H - 0.5, n)
    length = rng.uniform(0.0, max_length, n)
    ang = rng.uniform(0.0, math.pi, n)
    amp = _loguniform(rng, amplitude[0], amplitude[1], n)
    nsamp = np.ceil(length * 4).astype(np.int64) + 1
    ray = np.repeat(np.arange(n), nsamp)
    start = np.concatenate([[0], np.cumsum(nsamp)[:-1]])
    k = np.arange(ray.size) - start[ray]
    t = np.where(nsamp[ray] > 1, k / np.maximum(nsamp[ray] - 1, 1), 0.0)
    px = x0[ray] + t * length[ray] * np.cos(ang[ray])
    py = y0[ray] + t * length[ray] * np.sin(ang[ray])
    ix, iy = np.round(px).astype(np.int64), np.round(py).astype(np.int64)
    ok = (ix >= 0) & (ix < W) & (iy >= 0) & (iy < H)
    key = np.unique(ray[ok] * (H * W) + iy[ok] * W + ix[ok])
    which, pix = key // (H * W), key % (H * W)
    dep = amp[which] * rng.uniform(0.5, 1.0, key.size)
    return np.bincount(pix, weights=dep, minlength=H * W).reshape(H, W)


def _no_data_mask(spec: Any, box: Box) -> np.ndarray:
    H, W = box.shape
    if isinstance(spec, np.ndarray):
        if spec.shape != (H, W):
            raise InvalidInputError(f"no_data array has shape {spec.shape}, the image {(H, W)}")
        return spec.astype(bool)
    out = np.zeros((H, W), dtype=bool)
    if isinstance(spec, Box) or (
        isinstance(spec, tuple)
        and len(spec) == 4
        and all(isinstance(v, (int, np.integer)) for v in spec)
    ):
        spec = [spec]
    for region in spec:
        if isinstance(region, Box):
            x0, y0, x1, y1 = region.x0, region.y0, region.x1, region.y1
        else:
            try:
                x0, y0, x1, y1 = (int(v) for v in region)
            except (TypeError, ValueError):
                raise InvalidInputError(
                    f"no_data regions must be Box or (x0, y0, x1, y1), got {region!r}"
                ) from None
        xa, xb = max(x0, box.x0) - box.x0, min(x1, box.x1) - box.x0
        ya, yb = max(y0, box.y0) - box.y0, min(y1, box.y1) - box.y0
        if xa < xb and ya < yb:
            out[ya:yb, xa:xb] = True
    return out


def _bad_column_mask(spec: Any, rng: np.random.Generator, box: Box) -> np.ndarray:
    H, W = box.shape
    out = np.zeros((H, W), dtype=bool)
    if isinstance(spec, (int, np.integer)):
        n = int(spec)
        if n == 0:
            return out
        if n > W:
            raise InvalidInputError(f"bad_columns={n} exceeds the image width {W}")
        cols = rng.choice(W, size=n, replace=False)
        full = rng.uniform(size=n) < 0.5
        start = np.where(full, 0, rng.integers(0, H, size=n))
        for c, s in zip(cols, start):
            out[s:, c] = True
        return out
    for c in spec:
        if box.x0 <= c < box.x1:
            out[:, c - box.x0] = True
    return out
