"""Diagnostic PNGs of ``gpudiff subtract --plots DIR``.

Two figures: ``kernel_grid.png``, the PSF-matching kernel at a 3×3 grid of positions over
the image, and ``residual_histogram.png``, the histogram of difference/σ over unmasked
pixels against the N(0, 1) density it should follow.

With matplotlib (the ``plots`` extra, ``pip install 'gpudiff[plots]'``) they are figures
with axes, labels, titles and a colour bar (kernel value, one shared symmetric scale).
Without it they are plain bitmaps written by the standard library (zlib + struct), without
axes or text: the kernel tiles at 6× each scaled to its own peak (positive yellow-white,
negative blue; top row = high y, as ds9), and the histogram as grey bars on z ∈ [−5, 5]
with the N(0, 1) curve in red and a grey line at z = 0; :data:`PLOTS_NOTE` says so and
``gpudiff subtract`` logs it.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = [
    "write_png",
    "kernel_grid_png",
    "residual_histogram_png",
    "have_matplotlib",
    "PLOTS_NOTE",
]

#: What ``--plots`` draws without matplotlib.
PLOTS_NOTE = (
    "matplotlib is not installed (pip install 'gpudiff[plots]'): the PNGs are plain bitmaps "
    "without axes or labels: kernel_grid.png = the kernel at 3x3 positions (top row = high y), "
    "each tile scaled to its peak, positive yellow-white, negative blue; residual_histogram.png = "
    "grey histogram of difference/sigma over [-5, 5] with the N(0,1) density in red"
)


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (the optional ``plots`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _save_figure(path, fig) -> None:
    import io

    from ..image.atomic import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data), overwrite=True)


def _figure(**kw):
    # The object-oriented API with the Agg canvas: no pyplot state, no display needed,
    # safe in worker threads and processes.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def _kernel_grid_mpl(path, kernel, box, xs, ys) -> None:
    imgs = [[np.asarray(kernel.kernel_image(x, y), dtype=np.float64) for x in xs] for y in ys]
    vmax = max(float(np.abs(k).max()) for row in imgs for k in row) or 1.0
    fig = _figure(figsize=(8.4, 7.6))
    axes = fig.subplots(3, 3, sharex=True, sharey=True)
    half = imgs[0][0].shape[0] // 2
    ext = (-half - 0.5, half + 0.5, -half - 0.5, half + 0.5)
    for r, (y, row) in enumerate(zip(ys, imgs)):
        for c, (x, k) in enumerate(zip(xs, row)):
            ax = axes[r, c]
            im = ax.imshow(
                k,
                origin="lower",
                cmap="RdBu_r",
                vmin=-vmax,
                vmax=vmax,
                extent=ext,
                interpolation="nearest",
            )
            ax.set_title(f"x={x:.0f}, y={y:.0f}; sum {k.sum():.4f}", fontsize=8)
            if r == 2:
                ax.set_xlabel("dx [px]")
            if c == 0:
                ax.set_ylabel("dy [px]")
    fig.suptitle("PSF-matching kernel K(x, y) at 3x3 positions (parent pixels)")
    fig.colorbar(im, ax=axes, shrink=0.8, label="kernel value")
    _save_figure(path, fig)


def _histogram_mpl(path, z: np.ndarray) -> None:
    fig = _figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    edges = np.linspace(-5, 5, 81)
    ax.hist(z, bins=edges, density=True, color="0.6", label=f"difference/σ ({z.size} px)")
    xs = np.linspace(-5, 5, 400)
    ax.plot(xs, np.exp(-0.5 * xs**2) / np.sqrt(2 * np.pi), color="C3", label="N(0, 1)")
    if z.size:
        q25, q50, q75 = np.percentile(z, [25, 50, 75])
        ax.set_title(f"median {q50:+.3f}, robust σ {(q75 - q25) / 1.349:.3f}", fontsize=9)
    ax.set_xlabel("difference / sqrt(variance)")
    ax.set_ylabel("probability density")
    ax.set_xlim(-5, 5)
    ax.legend(fontsize=8)
    _save_figure(path, fig)


def write_png(path, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 array as an 8-bit RGB PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))  # filter type 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + tag
            + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )
    from ..image.atomic import atomic_write

    atomic_write(path, lambda f: f.write(png), overwrite=True)  # never a half-written PNG


def kernel_grid_png(path, kernel, box, scale: int = 6) -> None:
    """The kernel K(x, y) at 3×3 positions over ``box`` (parent coordinates): with matplotlib
    panels with pixel axes, positions and sums as titles and a shared colour bar; without it
    each tile scaled to its own peak, magnified ``scale``×, on a 2-px grey grid."""
    xs = [box.x0 + f * (box.width - 1) for f in (0.1, 0.5, 0.9)]
    ys = [box.y0 + f * (box.height - 1) for f in (0.9, 0.5, 0.1)]  # top row = high y
    if have_matplotlib():
        _kernel_grid_mpl(path, kernel, box, xs, ys)
        return
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
    if have_matplotlib():
        _histogram_mpl(path, z)
        return
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    margin = 20
    edges = np.linspace(-5, 5, 81)
    counts, _ = np.histogram(z, bins=edges)
    dens = counts / max(counts.sum(), 1) / np.diff(edges)
    centers = 0.5 * (edges[1:] + edges[:-1])
    gauss = np.exp(-0.5 * centers**2) / np.sqrt(2 * np.pi)
    top = max(dens.max(initial=0), gauss.max()) * 1.05
    px = lambda v: margin + (v + 5) / 10 * (width - 2 * margin)  # noqa: E731
    py = lambda d: height - margin - d / top * (height - 2 * margin)  # noqa: E731
    for lo, hi, d in zip(edges[:-1], edges[1:], dens):
        x0, x1, y0 = int(px(lo)), max(int(px(hi)) - 1, int(px(lo)) + 1), int(py(d))
        img[y0 : height - margin, x0:x1] = 170
    xs = np.linspace(-5, 5, 4 * width)
    cy = py(np.exp(-0.5 * xs**2) / np.sqrt(2 * np.pi)).astype(int)
    cx = px(xs).astype(int)
    for dy in (-1, 0, 1):
        img[np.clip(cy + dy, 0, height - 1), np.clip(cx, 0, width - 1)] = (220, 30, 30)
    img[height - margin, margin : width - margin] = 0  # x axis
    img[margin : height - margin, int(px(0))] = 90  # zero line
    write_png(path, img)
