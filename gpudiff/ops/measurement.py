"""Batched measurement of detected peaks (the measurement half of
:func:`gpudiff.ops.detection.detect_sources`).

Every peak of one polarity is measured at once, on stacks of stamps (n, s, s) cut by
:func:`gpudiff.ops.stats.gather_stamps_many`: a log-parabola peak refinement, the
Gaussian-weighted centroid, the PSF flux, adaptive moments and extendedness, the mask bits
in the central 5×5 and in the footprint, and the footprint's size and box.  On a device the
work is a fixed number of launches whatever the number of sources, and the results cross to
the host in one transfer at the end (the centroids too: the PSF stamps are cut and shifted
on the device, and the PSF moments, evaluated on the host, only need them once fetched).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..backend import Backend
from ..image import Box, Psf
from .stats import adaptive_moments_batch, gather_stamps_many, weighted_centroid

__all__ = ["measure_peaks"]

#: Mask bits ORed over a footprint (``mask_footprint``): the planes of an int32 mask word.
_FOOTPRINT_BITS = 31


def _parabola(xp, c, lo, hi):
    """Vertex offset of the parabola through (−1, lo), (0, c), (1, hi), clipped to ±1."""
    den = lo - 2 * c + hi
    neg = den < 0  # once: a launch per comparison on a device
    return xp.clip(xp.where(neg, 0.5 * (lo - hi) / xp.where(neg, den, -1.0), 0.0), -1.0, 1.0)


def _signed(x, sign: int):
    """``sign`` × ``x`` (the same values): no launch for the positive polarity."""
    return x if sign > 0 else -x


def _or_last_axis(x):
    """Bitwise OR along the last axis, by halving (log₂ of its length device calls)."""
    while x.shape[-1] > 1:
        k = x.shape[-1]
        h = k // 2
        y = x[..., :h] | x[..., h : 2 * h]
        if k % 2:
            y = y | x[..., 2 * h :]  # the odd last column, broadcast over the halves
        x = y
    return x[..., 0]


def _mask_center(xp, m5):
    """The OR of each (5, 5) stamp of mask bits, float64-exact for the transfer (the
    column is int32: an int32 mask's OR is its own int32, row by row and then along it,
    with no reshape copy; a wider mask keeps its low 32 bits)."""
    if m5.dtype == np.int32:
        return _or_last_axis(_or_last_axis(m5))
    n = m5.shape[0]
    return _or_last_axis(m5.reshape(n, -1).astype(xp.int64)) & 0xFFFFFFFF


def _or_in_footprints(be: Backend, mask, lab, fy, fx, n: int):
    """Per footprint 0..n, the OR of bits 0–30 of ``mask`` over its pixels (fy, fx) with
    labels ``lab``: one histogram of (footprint, bit) pairs, no host sync."""
    xp = be.xp
    bits = xp.arange(_FOOTPRINT_BITS, dtype=xp.int64)
    mv = mask[fy, fx]
    if not be.is_gpu:
        # Pixels without a bit add nothing: on the host, where compacting costs no sync,
        # histogram only the (usually few) masked ones.
        sel = xp.flatnonzero(mv & ((1 << _FOOTPRINT_BITS) - 1))
        mv, lab = mv[sel], lab[sel]
    hit = (mv[:, None] & (1 << bits)[None, :]) != 0  # (pixels, bits)
    dump = (n + 1) * _FOOTPRINT_BITS  # pairs whose bit is clear land past the table
    key = xp.where(hit, lab[:, None] * _FOOTPRINT_BITS + bits[None, :], dump)  # int64
    cnt = be.bincount(key.ravel(), dump + 1)[:dump].reshape(n + 1, _FOOTPRINT_BITS)
    return ((cnt > 0) << bits[None, :]).sum(axis=1)


def _fetch(be: Backend, **cols) -> dict[str, np.ndarray]:
    """Host copies of several device columns (n,) in one transfer: stacked as float64
    (exact for the bool, integer < 2⁵³ and float columns measured here), split and cast
    back to each column's dtype on the host."""
    if not be.is_gpu:
        return {k: be.asnumpy(v) for k, v in cols.items()}
    names = list(cols)
    h = be.asnumpy(be.xp.stack([cols[k] for k in names]).astype(be.xp.float64, copy=False))
    return {k: h[i].astype(cols[k].dtype) for i, k in enumerate(names)}


def _fetch_many(be: Backend, cols: list[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
    """:func:`_fetch` of several sets of columns (of different lengths: the polarities of
    a detection) in one transfer."""
    if not be.is_gpu:
        return [_fetch(be, **c) for c in cols]
    from ._host import fetch

    xp = be.xp
    stacks = [xp.stack([c[k] for k in c]).astype(xp.float64, copy=False) for c in cols]
    return [
        {k: h[i].astype(c[k].dtype) for i, k in enumerate(c)}
        for h, c in zip(fetch(be, *stacks), cols)
    ]


def _psf_stamps(be: Backend, psf: Psf, bbox: Box, rx, ry, dx, dy, size: int):
    """Unit-sum PSF images at sub-pixel offsets (dx, dy) from the pixels (rx, ry) of the
    image on ``bbox`` (array indices; host or backend arrays, as the offsets).

    Kernel images on a lattice (one node for a constant PSF, else 8×8 host calls, not one
    per source), bilinearly interpolated to each source on the backend (only the lattice
    crosses to the device, not a stamp per source), then shifted by a phase ramp: exact
    for a band-limited PSF, ~1e-4 of the peak from ``psf.compute_image`` for the
    pixel-integrated models when FWHM ≳ 2.5 px.
    """
    xp = be.xp
    n = int(rx.shape[0])
    probe = [
        (bbox.x0, bbox.y0),
        (bbox.x1 - 1, bbox.y1 - 1),
        (bbox.x0, bbox.y1 - 1),
        (bbox.x1 - 1, bbox.y0),
    ]
    k0 = psf.kernel_image(*probe[0], size=size)
    if all(np.array_equal(psf.kernel_image(x, y, size=size), k0) for x, y in probe[1:]):
        K = xp.broadcast_to(be.asarray(k0), (n, size, size))
    else:
        g = 8
        xs, ys = np.linspace(bbox.x0, bbox.x1 - 1, g), np.linspace(bbox.y0, bbox.y1 - 1, g)
        lat = be.asarray(
            np.array([[psf.kernel_image(x, y, size=size) for x in xs] for y in ys])
        )  # 64 host calls

        def w1(nodes, v, origin):
            # On the backend: the source pixels may be device arrays (no host round trip).
            v = be.asarray(v).astype(np.float64) + float(origin)  # parent pixels
            nd_ = be.asarray(nodes)
            i = xp.clip(xp.searchsorted(nd_, v) - 1, 0, g - 2)
            return i, xp.clip((v - nd_[i]) / (nd_[i + 1] - nd_[i]), 0.0, 1.0)

        (i, ty), (j, tx) = w1(ys, ry, bbox.y0), w1(xs, rx, bbox.x0)
        ty, tx = ty[:, None, None], tx[:, None, None]
        K = (1 - ty) * ((1 - tx) * lat[i, j] + tx * lat[i, j + 1]) + ty * (
            (1 - tx) * lat[i + 1, j] + tx * lat[i + 1, j + 1]
        )
    # out(q) = K(q − d): the star sits d from the central pixel, as in compute_image.
    # ifft2(fft2(K)·e^{−2πi(f·dy + f·dx)}).real, written as P = A(dy) K A(dx)ᵀ with the
    # (circulant) Fourier shift matrices A(d)_ab = D(a − b − d), D(t) = Σ_f e^{2πi f t}/s:
    # small matrix products instead of two complex FFTs and a complex exponential per
    # pixel; the same values to rounding (~1e-16 of the peak).
    Ay, Ax = _shift_matrices(be, (dy, dx), size)
    P = (Ay @ K) @ Ax.transpose(0, 2, 1)
    if P.dtype.kind == "c":
        P = P.real
    return P / P.sum(axis=(1, 2), keepdims=True)


def _shift_matrices(be: Backend, ds: tuple[Any, ...], size: int) -> list[Any]:
    """(n, size, size) Fourier (periodic-sinc) shift matrices A(d)_ab = D(a − b − d) with
    D(t) = Σ_f e^{2πi f t}/size over the FFT frequencies f, one stack per offset vector d
    of ``ds``: applied to a signal they move it by d as an FFT phase ramp does.  Real for
    odd ``size`` (the frequencies are symmetric; the Nyquist term of an even size makes
    them complex).  Every vector's phases and products are one pass each: the product
    with the frequency table is a stacked (n, 1, size) @ (size, 2·size − 1) product, one
    row per offset, whose rounding does not depend on what else is in the batch (a 2-D
    matrix product's rows do: BLAS blocks them by the row count, measured 3e-16 apart),
    so the sources of both polarities, or of any batch, are measured alike."""
    xp = be.xp
    f = np.fft.fftfreq(size)
    m = np.arange(-(size - 1), size)  # the offsets a − b
    E = be.asarray(np.exp(2j * np.pi * f[:, None] * m[None, :]) / size)  # (size, 2·size − 1)
    d = [be.asarray(v).astype(np.float64, copy=False) for v in ds]
    d_all = d[0] if len(d) == 1 else xp.concatenate(d)
    phase = xp.exp(-2j * np.pi * d_all[:, None, None] * be.asarray(f)[None, None, :])
    D = (phase @ E)[:, 0]
    if size % 2:
        D = xp.ascontiguousarray(D.real)
    a = np.arange(size)
    D = D[:, be.asarray(a[:, None] - a[None, :] + size - 1)]
    out, at = [], 0
    for v in d:
        n = int(v.shape[0])
        out.append(D[at : at + n])  # views
        at += n
    return out


def _psf_moments(psf: Psf, x: np.ndarray, y: np.ndarray, cell: int = 128) -> tuple[np.ndarray, ...]:
    """PSF moments (Ixx, Iyy, Ixy) at each source, bilinearly interpolated from a lattice
    of ``cell``-px spacing: the PSF varies slowly, and per-source adaptive moments of PSF
    stamps cost more than the rest of the measurement together."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    if getattr(psf, "spatially_constant", False):  # one image everywhere: one measurement
        m = np.asarray(psf.moments(float(x[0]), float(y[0])), dtype=np.float64)
        return tuple(np.full(x.size, v) for v in m)
    gx = (
        np.arange(np.floor(x.min()), x.max() + cell, cell) if np.ptp(x) > 0 else np.array([x.min()])
    )
    gy = (
        np.arange(np.floor(y.min()), y.max() + cell, cell) if np.ptp(y) > 0 else np.array([y.min()])
    )
    mom = np.array([[psf.moments(float(a), float(b)) for a in gx] for b in gy], dtype=np.float64)
    if gx.size == 1 or gy.size == 1:  # degenerate lattice: nearest node
        ix = np.clip(np.searchsorted(gx, x), 0, gx.size - 1)
        iy = np.clip(np.searchsorted(gy, y), 0, gy.size - 1)
        out = mom[iy, ix]
    else:
        # Imported here: scipy.interpolate costs ~0.2-0.4 CPU-s, which a constant PSF
        # (one measurement above) need not pay.
        from scipy.interpolate import RegularGridInterpolator

        out = RegularGridInterpolator((gy, gx), mom, bounds_error=False, fill_value=None)(
            np.stack([y, x], 1)
        )
    return out[:, 0], out[:, 1], out[:, 2]


def measure_peaks(
    backend: Backend,
    sign: int,
    d: Any,
    var: Any,
    good: Any,
    mask: Any,
    snr: Any,
    labels: Any,
    n_fp: int,
    py: Any,
    px: Any,
    psf: Psf | None,
    bbox: Box,
    stamp: int,
    sigma_w: float,
    weighting: str,
    footprint_pixels: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Measure the peaks (py, px) of one polarity of a detection.

    Parameters
    ----------
    backend : Backend
    sign : {1, -1}
        The polarity: sources are ``sign`` × the image.
    d, var : float32 arrays (H, W) on ``backend``
        Background-subtracted image and variance, zero where not ``good``.
    good : bool array (H, W)
        Pixels with weight.
    mask : integer array (H, W)
        The mask whose bits are reported (``mask_center``, ``mask_footprint``).
    snr : float32 array (H, W)
        The thresholded significance image (signed).
    labels : integer array (H, W)
        Footprints 1..``n_fp`` of this polarity.
    n_fp : int
    py, px : int64 arrays (n,) on ``backend``
        The peak pixels.
    psf : Psf or None
        Model of the PSF flux and extendedness (None: those columns are NaN).
    bbox : Box
        The image's parent box (PSF evaluation points are parent pixels).
    stamp : int
        Side of the PSF-flux and moments stamps.
    sigma_w : float
        σ of the centroid weight and start of the adaptive moments (px).
    weighting : {"uniform", "inverse_variance"}
        Of the PSF flux.
    footprint_pixels : (rows, cols), optional
        ``nonzero(labels)`` when the caller has it (saves a pass and a host sync).

    Returns
    -------
    dict of host columns
        ``x``, ``y`` (array frame), ``peak_x``, ``peak_y``, ``peak_significance``,
        ``psf_flux``, ``psf_flux_err``, ``ixx``, ``iyy``, ``ixy``, ``psf_ixx``, ``psf_iyy``,
        ``psf_ixy``, ``extendedness``, ``footprint_npix``, ``mask_center``,
        ``mask_footprint``, the flags ``flag_edge``, ``flag_centroid``, ``flag_negative``,
        ``flag_shape``, ``flag_psf_flux``, and ``_fp`` (footprint label) and ``_box``
        (footprint x0, y0, x1, y1, inclusive) for the catalog assembly.
    """
    dev, ctx = _measure_on_backend(
        backend,
        sign,
        d,
        var,
        good,
        mask,
        snr,
        labels,
        n_fp,
        py,
        px,
        psf,
        bbox,
        stamp,
        sigma_w,
        weighting,
        footprint_pixels,
    )
    return _measure_on_host(_fetch(backend, **dev), ctx)  # every column in one transfer


def _measure_on_backend(
    backend: Backend,
    sign: int,
    d: Any,
    var: Any,
    good: Any,
    mask: Any,
    snr: Any,
    labels: Any,
    n_fp: int,
    py: Any,
    px: Any,
    psf: Psf | None,
    bbox: Box,
    stamp: int,
    sigma_w: float,
    weighting: str,
    footprint_pixels: tuple[Any, Any] | None = None,
    fold: tuple[int, int] | None = None,
) -> tuple[dict[str, Any], tuple]:
    """The backend half of :func:`measure_peaks` (same parameters): its columns on the
    backend, not fetched (a caller measuring both polarities fetches them together), and
    the context of :func:`_measure_on_host`.  ``fold`` (W, off): the images are a canvas
    of both polarities whose columns ≥ off are the image's columns − off
    (:mod:`gpudiff.ops.detection_canvas`); ``x`` is then in the image's columns."""
    xp, nd = backend.xp, backend.ndimage
    n = int(py.shape[0])
    # Centroid stamps (sources positive, pixels without weight zeroed) and, cropped from
    # the same gather, the 3×3 of the smoothed S/N around the peak.
    hc = max(2, int(math.ceil(3 * sigma_w)))
    (s_st, d_st, g_st), _ = gather_stamps_many(
        backend, [snr, d, good], py, px, hc, [0.0, 0.0, False]
    )
    # Peak refinement on the smoothed S/N (log-parabola, exact for a Gaussian peak): the
    # start and the fallback of the Gaussian-weighted centroid on the unsmoothed image.
    # The 3×3 flattened: 4 = centre, (3, 5) its row neighbours, (1, 7) its column ones;
    # both axes in one pass, column 0 x and column 1 y.
    core = _signed(s_st[:, hc - 1 : hc + 2, hc - 1 : hc + 2], sign)
    lg = xp.log(xp.maximum(core, 1e-30)).reshape(n, 9)
    d0 = _parabola(xp, lg[:, 4:5], lg[:, [3, 1]], lg[:, [5, 7]])
    dx0, dy0 = d0[:, 0], d0[:, 1]
    st = xp.where(g_st, _signed(d_st, sign), 0)
    cx, cy, ok_c = weighted_centroid(backend, st, dx0, dy0, sigma_w)
    # The centroids stay on the backend (fetched with the other columns at the end).
    # On a canvas (``fold``), in the image's columns: the right half's sources are
    # shifted back before the centroid is added, as the per-polarity measurement adds it
    # (x + off − off is not x in floating point).
    shift = None if fold is None else xp.where(px >= fold[1], fold[1], 0)
    fx = xp.where(ok_c, cx, dx0) + (px if shift is None else px - shift)
    fy = xp.where(ok_c, cy, dy0) + py
    # PSF flux, moments and mask bits in the PSF-sized stamp on the nearest pixel.
    rx_img, ry = xp.rint(fx).astype(np.int64), xp.rint(fy).astype(np.int64)
    rx = rx_img if shift is None else rx_img + shift  # the canvas column
    hs = stamp // 2
    (d2, v2, ok_pix, m2), inside = gather_stamps_many(
        backend, [d, var, good, mask], ry, rx, hs, [0.0, 0.0, False, 0]
    )
    img_st = xp.where(ok_pix, _signed(d2, sign), 0)
    var_st = xp.where(ok_pix, v2, 0)
    if hs >= 2:
        m5 = m2[:, hs - 2 : hs + 3, hs - 2 : hs + 3]
    else:
        (m5,), _ = gather_stamps_many(backend, [mask], ry, rx, 2, [0])
    dev: dict[str, Any] = dict(fx=fx, fy=fy, ok_c=ok_c)
    sm = adaptive_moments_batch(backend, img_st, ok_pix, sigma_w**2)
    dev.update(ixx=sm[2], iyy=sm[3], ixy=sm[4], ok_m=sm[5])
    if psf is not None:
        P = _psf_stamps(backend, psf, bbox, rx_img, ry, fx - rx_img, fy - ry, stamp)
        w = ok_pix.astype(xp.float64)
        if weighting == "inverse_variance":
            w = w / xp.where(var_st > 0, var_st, xp.inf)
        ppw = P * P * w  # shared: P·P·w·w·V below is ((P·P·w)·w)·V, the same roundings
        den = ppw.sum(axis=(1, 2))
        den_ok = den > 0
        den_s = xp.where(den_ok, den, 1.0)
        dev.update(
            flux=(P * img_st * w).sum(axis=(1, 2)) / den_s,
            err=xp.sqrt((ppw * w * var_st).sum(axis=(1, 2))) / den_s,
            den_ok=den_ok,
        )
    # Footprint sizes, boxes and mask bits: reductions over the labelled pixels, per label.
    fy_all, fx_all = xp.nonzero(labels) if footprint_pixels is None else footprint_pixels
    lab, idx = labels[fy_all, fx_all], xp.arange(1, n_fp + 1)
    ids = labels[py, px]
    box = xp.stack(
        [
            nd.minimum(fx_all, lab, idx),
            nd.minimum(fy_all, lab, idx),
            nd.maximum(fx_all, lab, idx),
            nd.maximum(fy_all, lab, idx),
        ]
    )[:, ids - 1]
    dev.update(
        peak_x=px,
        peak_y=py,
        peak_significance=snr[py, px],
        inside_all=inside.all(axis=(1, 2)),
        mask_center=_mask_center(xp, m5),
        ids=ids,
        box0=box[0],
        box1=box[1],
        box2=box[2],
        box3=box[3],
        mask_footprint=_or_in_footprints(backend, mask, lab, fy_all, fx_all, n_fp)[ids],
        npix=backend.bincount(lab, n_fp + 1)[ids],
    )
    return dev, (n, sign, psf, bbox)


def _measure_on_host(h: dict[str, np.ndarray], ctx: tuple) -> dict[str, Any]:
    """The host half of :func:`measure_peaks`: its columns from the fetched ones of
    :func:`_measure_on_backend` (``h``) and that function's context."""
    n, sign, psf, bbox = ctx
    fx, fy, ok_c = h["fx"], h["fy"], h["ok_c"]
    rx, ry = np.rint(fx).astype(np.int64), np.rint(fy).astype(np.int64)  # as on the backend
    nan = np.full(n, np.nan)
    c: dict[str, Any] = dict(
        psf_flux=nan,
        psf_flux_err=nan,
        flag_psf_flux=np.ones(n, bool),
        psf_ixx=nan,
        psf_iyy=nan,
        psf_ixy=nan,
    )
    ok_m = h["ok_m"]
    c.update(
        ixx=np.where(ok_m, h["ixx"], np.nan),
        iyy=np.where(ok_m, h["iyy"], np.nan),
        ixy=np.where(ok_m, h["ixy"], np.nan),
        extendedness=nan,
        flag_shape=~ok_m,
    )
    if psf is not None:
        flux, err = h["flux"], h["err"]
        okf = h["den_ok"] & (err > 0) & np.isfinite(flux)
        c.update(
            psf_flux=np.where(okf, sign * flux, np.nan),
            psf_flux_err=np.where(okf, err, np.nan),
            flag_psf_flux=~okf,
        )
        pm = _psf_moments(psf, rx + bbox.x0, ry + bbox.y0)
        c.update(
            psf_ixx=pm[0],
            psf_iyy=pm[1],
            psf_ixy=pm[2],
            extendedness=np.where(ok_m, (h["ixx"] + h["iyy"]) / (pm[0] + pm[1]) - 1.0, np.nan),
        )
    c.update(
        x=fx,
        y=fy,
        peak_x=h["peak_x"],
        peak_y=h["peak_y"],
        peak_significance=h["peak_significance"].astype(np.float64),
        flag_edge=~h["inside_all"],
        flag_centroid=~ok_c,
        flag_negative=np.full(n, sign < 0),
        mask_center=h["mask_center"].astype(np.int32),
        _fp=h["ids"],
        _box=[h[f"box{i}"].astype(np.int64) for i in range(4)],
        mask_footprint=h["mask_footprint"].astype(np.int32),
        footprint_npix=h["npix"].astype(np.int64),
    )
    return c
