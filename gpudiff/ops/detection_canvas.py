"""Both polarities of a detection at once on a device: one labelling, one peak search and
one measurement of a side-by-side canvas.

:func:`gpudiff.ops.detection.detect_sources` with ``polarity="both"`` finds positive
footprints where S/N ≥ t and negative ones where S/N ≤ −t.  On the CPU each polarity is one
thread.  On a device each polarity was a sequence of ~180 small launches and three host
syncs (the footprint count, the footprint pixels and the plateau count, whose sizes the
host must learn).  Here the two polarities become the halves of one canvas, side by side::

    [ +S/N | gap | −S/N ]        (H, 2·W + gap)

so that "negative" is "positive on the right half", and the whole detection (threshold,
labels, growth, peaks, stamps, PSF photometry, moments, footprint reductions) runs once,
with the syncs of one polarity.  The gap is as wide as the largest reach of any step
(stamp half-width, peak window, footprint growth) plus one pixel, and holds what a pixel
off the image holds for that step (S/N −∞ for the peak search and the threshold; zero
image, variance and mask, no good pixel for the stamps), so no step sees across it: every
value measured is the value the per-polarity measurement gives (the tests hold the two
bit-identical).  Only what is tied to the image frame is mapped back on the host: the
columns of right-half sources, the stamp-inside-the-image test, the sign of the S/N.

Memory: the canvas doubles the planes it is made of (float32 image, variance, S/N, mask
and the labels: ~0.6 GB at 4096², transient) for about half the launches and syncs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import Backend
from ..image import Box, Psf
from .measurement import _fetch_many, _measure_on_backend, _measure_on_host

__all__ = ["detect_both_on_canvas"]


def _canvas(xp, left, right, gap: int, fill):
    """``[left | gap columns of fill | right]``: one concatenation."""
    H = left.shape[0]
    g = xp.full((H, gap), fill, dtype=left.dtype)
    return xp.concatenate([left, g, right], axis=1)


def detect_both_on_canvas(
    be: Backend,
    label_fn,
    peaks_fn,
    snr: Any,
    d: Any,
    var: Any,
    good: Any,
    mask: Any,
    threshold: float,
    min_pixels: int,
    grow: int,
    peak_radius: int,
    psf: Psf | None,
    bbox: Box,
    stamp: int,
    sigma_w: float,
    weighting: str,
) -> list[tuple[int, Any, dict[str, Any]] | None]:
    """Detect and measure both polarities of ``snr`` on one canvas (device backends).

    Parameters
    ----------
    be : Backend
    label_fn, peaks_fn : callables
        :func:`gpudiff.ops.detection._label` and ``_peaks`` (passed in: that module
        imports this one).
    snr, d, var, good, mask : arrays (H, W) on ``be``
        As :func:`gpudiff.ops.measurement.measure_peaks` takes them.
    threshold, min_pixels, grow, peak_radius : as ``detect_sources``
    psf, bbox, stamp, sigma_w, weighting : as ``measure_peaks``

    Returns
    -------
    list of two entries, positive then negative polarity
        None for a polarity without footprints, else ``(sign, labels, columns)``: its
        label image (a view of the canvas's half: > 0 on its footprints) and the host
        columns of :func:`~gpudiff.ops.measurement.measure_peaks` for its peaks, in the
        order the per-polarity detection lists them.
    """
    xp = be.xp
    H, W = snr.shape
    hc = max(2, int(np.ceil(3 * sigma_w)))
    gap = max(stamp // 2, hc, int(peak_radius), int(grow), 2) + 1
    off = W + gap  # canvas column of the right half's column 0
    # −S/N on the right: "S/N ≤ −t" is "canvas ≥ t" there, and a local minimum of the S/N
    # is a local maximum of the canvas (negation is exact).
    snr_c = _canvas(xp, snr, -snr, gap, -np.inf)
    on = snr_c >= threshold
    labels, n_fp = label_fn(be, on, int(min_pixels), int(grow), gap_columns=(W, off))
    if n_fp == 0:
        return [None, None]
    fp = xp.nonzero(labels)
    py, px = peaks_fn(be, snr_c, labels, peak_radius, fp, 1)
    d_c = _canvas(xp, d, -d, gap, 0)
    dev, _ = _measure_on_backend(
        be,
        1,
        d_c,
        _canvas(xp, var, var, gap, 0),
        _canvas(xp, good, good, gap, False),
        _canvas(xp, mask, mask, gap, 0),
        snr_c,
        labels,
        n_fp,
        py,
        px,
        psf,
        bbox,
        stamp,
        sigma_w,
        weighting,
        footprint_pixels=fp,
        fold=(W, off),
    )
    (h,) = _fetch_many(be, [dev])
    return _split(h, labels, W, off, H, stamp, psf, bbox)


def _split(h: dict, labels, W: int, off: int, H: int, stamp: int, psf, bbox) -> list:
    """The canvas's host columns ``h`` as the two polarities' measurements."""
    right = h["peak_x"] >= off
    hs = stamp // 2
    out: list = []
    for sign, sel in ((1, ~right), (-1, right)):
        if not sel.any():
            out.append(None)
            continue
        p = {k: v[sel] for k, v in h.items()}
        if sign < 0:
            for k in ("peak_x", "box0", "box2"):  # (fx is in the image's columns)
                p[k] = p[k] - off
            p["peak_significance"] = -p["peak_significance"]
        # The stamp wholly inside the image (gather_stamps_many's ``inside`` of the
        # per-polarity measurement), from the same rounded centre.
        rx, ry = np.rint(p["fx"]).astype(np.int64), np.rint(p["fy"]).astype(np.int64)
        p["inside_all"] = (rx >= hs) & (rx < W - hs) & (ry >= hs) & (ry < H - hs)
        cols = _measure_on_host(p, (int(sel.sum()), sign, psf, bbox))
        half = labels[:, :W] if sign > 0 else labels[:, off:]
        out.append((sign, half, cols))
    return out
