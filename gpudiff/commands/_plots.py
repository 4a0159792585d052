"""Diagnostic PNGs of ``gpudiff subtract --plots DIR`` without a plotting dependency.

PNG is written with the standard library (zlib + struct); the two figures are simple
bitmaps: the matching kernel at a 3×3 grid of positions, and the histogram of
difference/σ over unmasked pixels against the N(0, 1) curve it should follow.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = ["write_png", "kernel_grid_png", "residual_histogram_png"]


def write_png(path, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 array as an 8-bit RGB PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))  # filter type 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    from ..image.atomic import atomic_write

    atomic_write(path, lambda f: f.write(png), overwrite=True)  # never a half-written PNG


def kernel_grid_png(path, kernel, box, scale: int = 6) -> None:
    """The kernel K(x, y) at 3×3 positions over ``box`` (parent coordinates), each tile
    scaled to its own peak, magnified ``scale``×, on a 2-px grey grid."""
    xs = [box.x0 + f * (box.width - 1) for f in (0.1, 0.5, 0.9)]
    ys = [box.y0 + f * (box.height - 1) for f in (0.9, 0.5, 0.1)]  # top row = high y
    tiles = []
    for y in ys:
        row = []
        for x in xs:
            k = np.asarray(kernel.kernel_image(x, y), dtype=np.float64)
            k = np.clip(k / max(np.abs(k).max(), 1e-30), -1, 1)
            t = np.kron(k[::-1], np.ones((scale, scale)))  # y up, as in ds9
            rgb = np.empty(t.shape + (3,))
            rgb[..., 0] = np.where(t >= 0, 255 * t, 0)  # positive: yellow-white; negative: blue
            rgb[..., 1] = np.where(t >= 0, 255 * t, 0)
            rgb[..., 2] = np.where(t >= 0, 255 * t, -255 * t)
            row.append(np.pad(rgb, ((2, 2), (2, 2), (0, 0)), constant_values=128))
        tiles.append(np.concatenate(row, axis=1))
    write_png(path, np.concatenate(tiles, axis=0).astype(np.uint8))


def residual_histogram_png(path, z: np.ndarray, width: int = 500, height: int = 320) -> None:
    """Histogram of z = difference/σ in [−5, 5] (grey bars) with the N(0, 1) density (red)."""
    z = np.asarray(z, dtype=np.float64)
    z = z[np.isfinite(z)]
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    margin = 20
    edges = np.linspace(-5, 5, 81)
    counts, _ = np.histogram(z, bins=edges)
    dens = counts / max(counts.sum(), 1) / np.diff(edges)
    centers = 0.5 * (edges[1:] + edges[:-1])
    gauss = np.exp(-0.5 * centers ** 2) / np.sqrt(2 * np.pi)
    top = max(dens.max(initial=0), gauss.max()) * 1.05
    px = lambda v: margin + (v + 5) / 10 * (width - 2 * margin)  # noqa: E731
    py = lambda d: height - margin - d / top * (height - 2 * margin)  # noqa: E731
    for lo, hi, d in zip(edges[:-1], edges[1:], dens):
        x0, x1, y0 = int(px(lo)), max(int(px(hi)) - 1, int(px(lo)) + 1), int(py(d))
        img[y0:height - margin, x0:x1] = 170
    xs = np.linspace(-5, 5, 4 * width)
    cy = py(np.exp(-0.5 * xs ** 2) / np.sqrt(2 * np.pi)).astype(int)
    cx = px(xs).astype(int)
    for dy in (-1, 0, 1):
        img[np.clip(cy + dy, 0, height - 1), np.clip(cx, 0, width - 1)] = (220, 30, 30)
    img[height - margin, margin:width - margin] = 0  # x axis
    img[margin:height - margin, int(px(0))] = 90  # zero line
    write_png(path, img)
