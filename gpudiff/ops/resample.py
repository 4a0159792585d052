"""The resampling engine of :func:`gpudiff.ops.warp.warp_exposure` (docs/algorithms.md §8).

Given where every destination pixel falls in the source (the mapping of
:func:`gpudiff.ops.warp.pixel_mapping`) and a kernel's weight function, these functions
fill the destination image, variance and mask, in row bands (one CPU thread per core on
NumPy), vectorized over the band, never over pixels:

- :func:`resample_separable`: an axis-aligned mapping (or whole-pixel shift): ntaps
  horizontal then ntaps vertical gathers per band;
- :func:`resample_general`: any mapping, bilinearly interpolated between its nodes, then
  ntaps² gathers per pixel.

Both take the source as a dict prepared by ``warp_exposure``:

``shape``
    (H_src, W_src).
``planes``
    [image, variance] with bad pixels zeroed (backend arrays).
``iv``
    (general path only) image and variance interleaved, (H_src·W_src, 2) float32.
``aux``
    Flattened int32: the ``grow`` bits, and bit 31 for a bad source pixel, both already
    OR-dilated over the kernel footprint.
``aux_any``
    Whether ``aux`` has any bit set (known on the host).
``mask``
    The flattened source mask.
``grow``
    The bitmask of the planes ORed over the full footprint.
``itype``
    The index dtype (int32 when the source has < 2³¹ pixels).

Output pixels whose footprint leaves the source are NO_DATA alone with NaN image and
infinite variance; those whose footprint touches a bad source pixel get NO_DATA added to
their bits.
"""

from __future__ import annotations

import numpy as np

from ..backend import Backend
from ..backend.threads import cpu_workers, parallel_map

__all__ = ["interp_index", "resample_general", "resample_separable"]

#: Destination pixels per row band.  On the CPU the ~15 band temporaries must stay in the
#: cache (measured on 2048²: 2^14 px → 1.5 s, 2^20 → 5 s); on a GPU big bands fill the device.
_BAND_PIXELS = {"numpy": 1 << 15, "cupy": 1 << 22}
#: Bilinear mask weights below this count as zero (astropy round-off on exact shifts).
_MASK_EPS = 1e-6
#: Destination rows per band of the separable path on the CPU: the (rows + 5) × W × 2
#: float32 horizontal pass must stay in cache; the 5 extra source rows per band are the
#: redundant work (16 % at 32 rows).
_SEP_BAND_PIXELS = {"numpy": 1 << 17, "cupy": 1 << 24}


def interp_index(nodes: np.ndarray, p: np.ndarray):
    """Segment index and fraction of positions ``p`` along ``nodes`` (bilinear).

    Parameters
    ----------
    nodes : numpy.ndarray
        Increasing node positions (at least one).
    p : numpy.ndarray
        Positions, 1-D.

    Returns
    -------
    k0, k1 : numpy.ndarray (int64)
        The nodes before and after each position (clipped to the end segments, so
        positions outside the nodes extrapolate linearly).
    t : numpy.ndarray
        Fraction of the way from ``k0`` to ``k1``; zeros with a single node.
    """
    if nodes.size == 1:
        return np.zeros(p.size, np.int64), np.zeros(p.size, np.int64), np.zeros(p.size)
    k = np.clip(np.searchsorted(nodes, p, side="right") - 1, 0, nodes.size - 2)
    return k, k + 1, (p - nodes[k]) / (nodes[k + 1] - nodes[k])


def _warp_band(be: Backend, u, v, src: dict, ntaps: int, wfun):
    """Resample one band; ``u``, ``v`` (nb, W) source coordinates.  Returns image,
    variance, mask (without NO_DATA), 'footprint off the image' and 'footprint touches
    bad source pixels'."""
    xp = be.xp
    Hs, Ws = src["shape"]
    finite = xp.isfinite(u) & xp.isfinite(v)
    u, v = xp.where(finite, u, 0.0), xp.where(finite, v, 0.0)
    fu, fv = xp.floor(u), xp.floor(v)
    iu, iv = fu.astype(src["itype"]), fv.astype(src["itype"])
    lo = ntaps // 2 - 1  # taps run from floor − lo to floor − lo + ntaps − 1
    off = ~finite | (iu < lo) | (iv < lo) | (iu - lo + ntaps > Ws) | (iv - lo + ntaps > Hs)
    # float32 weights: half the memory traffic; 36 terms keep float32 rounding ~1e-7.
    wx, wy = wfun(xp, u - fu).astype(xp.float32), wfun(xp, v - fv).astype(xp.float32)
    wx2, wy2 = wx * wx, wy * wy
    img, var = xp.zeros(u.shape, dtype=xp.float32), xp.zeros(u.shape, dtype=xp.float32)
    ri, rv, tmp = xp.empty_like(img), xp.empty_like(img), xp.empty_like(img)
    idx = xp.empty(u.shape, dtype=iu.dtype)
    cols = [xp.clip(iu + (j - lo), 0, Ws - 1) for j in range(ntaps)]
    for i in range(ntaps):  # taps, not pixels; in-place arithmetic keeps the bands in cache
        row = xp.clip(iv + (i - lo), 0, Hs - 1) * Ws
        ri.fill(0)
        rv.fill(0)
        for j in range(ntaps):
            xp.add(row, cols[j], out=idx)
            g = xp.take(src["iv"], idx, axis=0)  # image and variance in one gather
            xp.multiply(wx[j], g[..., 0], out=tmp)
            ri += tmp
            xp.multiply(wx2[j], g[..., 1], out=tmp)
            rv += tmp
        xp.multiply(wy[i], ri, out=tmp)
        img += tmp
        xp.multiply(wy2[i], rv, out=tmp)
        var += tmp
    # Bad source pixels and grow_full_mask bits, pre-dilated over the kernel footprint in
    # the source frame: one gather at the floor pixel replaces ntaps² gathers.
    ctr = xp.clip(iv, 0, Hs - 1) * Ws + xp.clip(iu, 0, Ws - 1)
    aux = xp.take(src["aux"], ctr)
    # Bilinear mask kernel: the 2×2 neighbours whose weight is not (numerically) zero.
    fx, fy = u - fu, v - fv
    msk = aux & np.int32(src["grow"])
    for dy, oky in ((0, 1.0 - fy > _MASK_EPS), (1, fy > _MASK_EPS)):
        for dx, okx in ((0, 1.0 - fx > _MASK_EPS), (1, fx > _MASK_EPS)):
            idx = xp.clip(iv + dy, 0, Hs - 1) * Ws + xp.clip(iu + dx, 0, Ws - 1)
            msk |= xp.where(oky & okx, xp.take(src["mask"], idx), 0)
    touch = (aux & np.int32(-(2**31))) != 0  # bit 31 carries "bad source pixel"
    return img, var, msk, off, touch


def _index_or_slice(be: Backend, idx: np.ndarray):
    """A host index array as a slice when it is a run of consecutive indices (a shift: a
    view instead of a gather), else the array on the backend."""
    idx = np.asarray(idx)
    if idx.size and (idx.size == 1 or bool(np.all(np.diff(idx) == 1))):
        return slice(int(idx[0]), int(idx[0]) + idx.size)
    return be.asarray(idx)


def _take(xp, a, idx, axis: int):
    """``xp.take(a, idx, axis)``, or the slice view when ``idx`` is a slice."""
    if isinstance(idx, slice):
        key = [slice(None)] * a.ndim
        key[axis] = idx
        return a[tuple(key)]
    return xp.take(a, idx, axis=axis)


def resample_separable(
    backend: Backend,
    ux,
    vy,
    src: dict,
    ntaps: int,
    wfun,
    outs,
    no_data: int,
    *,
    exact_shift: bool = False,
) -> None:
    """Resample an axis-aligned mapping into ``outs`` = (image, variance, mask).

    Parameters
    ----------
    backend : Backend
        Where the source arrays and ``outs`` live.
    ux : numpy.ndarray (W,)
        Source column of each destination column.
    vy : numpy.ndarray (H,)
        Source row of each destination row.
    src : dict
        The source, as described in the module docstring.
    ntaps : int
        Taps per axis of the kernel.
    wfun : callable
        ``wfun(xp, frac)`` → (ntaps, ...) weights of the fractional offsets.
    outs : tuple of arrays
        (image float32, variance float32, mask int32), each (H, W), filled in place.
    no_data : int
        The NO_DATA bitmask.
    exact_shift : bool
        ``ux``, ``vy`` are whole (the grids agree): the taps reduce to one copy.

    Notes
    -----
    Per band of destination rows: a horizontal pass (ntaps column
    gathers of the source rows the band needs) and a vertical pass (ntaps row gathers),
    image and variance together as the last axis of one (…, 2) array, weights (w, w²).
    The sums run in the general path's order (Σ_i wy_i Σ_j wx_j S), so the two agree to
    float32 round-off.
    """
    xp = backend.xp
    Hs, Ws = src["shape"]
    lo = ntaps // 2 - 1
    out_i, out_v, out_m = outs
    H, W = out_i.shape
    # Plane-major (Hs, 2, Ws): every multiply below runs along contiguous rows of W values
    # (an interleaved last axis of 2 would make NumPy's inner loops 2 long).
    S = xp.stack(src["planes"], axis=1).astype(xp.float32, copy=False)
    aux2 = src["aux"].reshape(Hs, Ws)
    mask2 = src["mask"].reshape(Hs, Ws)

    def axis(p, n_src):
        p = np.asarray(p, dtype=np.float64)
        fin = np.isfinite(p)
        p = np.where(fin, p, 0.0)
        f = np.floor(p)
        i = f.astype(np.int64)
        off = ~fin | (i < lo) | (i - lo + ntaps > n_src)
        frac = p - f
        w = np.zeros((ntaps, p.size)) if exact_shift else wfun(np, frac)
        if exact_shift:
            w[lo] = 1.0
        w = w.astype(np.float32)
        # Bilinear mask neighbours with a nonzero weight (as the general path).
        nb = (1.0 - frac > _MASK_EPS, frac > _MASK_EPS)
        return i, off, w, nb

    iu, offx, wx, nbx = axis(ux, Ws)
    iv, offy, wy, nby = axis(vy, Hs)
    cols = [_index_or_slice(backend, np.clip(iu + (j - lo), 0, Ws - 1)) for j in range(ntaps)]
    wxp = backend.asarray(np.stack([wx, wx * wx], axis=1))  # (ntaps, 2, W): (w, w²)
    wyp = backend.asarray(np.stack([wy, wy * wy], axis=-1))[:, :, :, None]  # (ntaps, H, 2, 1)
    c_ctr = _index_or_slice(backend, np.clip(iu, 0, Ws - 1))
    c_nb = [_index_or_slice(backend, np.clip(iu + d, 0, Ws - 1)) for d in (0, 1)]
    # Row and column factors of the off-image and neighbour masks; their (band, W) outer
    # products are formed on the device only where needed.
    offy_d, offx_d = backend.asarray(offy[:, None]), backend.asarray(offx[None, :])
    nby_d = [backend.asarray(m[:, None]) for m in nby]
    nbx_d = [backend.asarray(m[None, :]) for m in nbx]
    band = max(1, _SEP_BAND_PIXELS.get(backend.name, 1 << 17) // W)
    grow = np.int32(src["grow"])
    nod = np.int32(no_data)

    def one(r0):
        r1 = min(H, r0 + band)
        rows = np.clip(iv[r0:r1, None] + (np.arange(ntaps) - lo)[None, :], 0, Hs - 1)
        s0, s1 = int(rows.min()), int(rows.max()) + 1
        Sb = S[s0:s1]
        if exact_shift:  # one tap of weight 1: a copy
            hb = _take(xp, Sb, c_ctr, 2)
            acc = _take(xp, hb, _index_or_slice(backend, rows[:, lo] - s0), 0)
        else:
            hb = _take(xp, Sb, cols[0], 2) * wxp[0]
            for j in range(1, ntaps):
                g = _take(xp, Sb, cols[j], 2) * wxp[j]
                hb += g
            acc = _take(xp, hb, _index_or_slice(backend, rows[:, 0] - s0), 0) * wyp[0, r0:r1]
            for i in range(1, ntaps):
                g = _take(xp, hb, _index_or_slice(backend, rows[:, i] - s0), 0) * wyp[i, r0:r1]
                acc += g
        # What is known on the host is not computed on the device: no pre-dilated bits at
        # all (``aux_any``), neighbours whose weight is zero everywhere (exact shifts),
        # footprints inside the source (``off`` all false).
        touch, msk = None, None
        if src["aux_any"]:
            rc = _index_or_slice(backend, np.clip(iv[r0:r1], 0, Hs - 1))
            aux = _take(xp, _take(xp, aux2, rc, 0), c_ctr, 1)
            msk = aux & grow
            touch = (aux & np.int32(-(2**31))) != 0
        for dy in (0, 1):
            if not nby[dy][r0:r1].any():
                continue
            mrow = _take(xp, mask2, _index_or_slice(backend, np.clip(iv[r0:r1] + dy, 0, Hs - 1)), 0)
            for dx in (0, 1):
                if not nbx[dx].any():
                    continue
                m = _take(xp, mrow, c_nb[dx], 1)
                if not (nby[dy][r0:r1].all() and nbx[dx].all()):
                    m = xp.where(nby_d[dy][r0:r1] & nbx_d[dx], m, 0)
                msk = m if msk is None else (msk | m)
        if msk is None:
            msk = xp.zeros((r1 - r0, W), dtype=xp.int32)
        off = (offy_d[r0:r1] | offx_d) if (offy[r0:r1].any() or offx.any()) else None
        bad = off if touch is None else (touch if off is None else off | touch)
        if bad is None:
            out_i[r0:r1] = acc[:, 0]
            out_v[r0:r1] = acc[:, 1]
            out_m[r0:r1] = msk
            return
        out_i[r0:r1] = xp.where(bad, xp.float32(np.nan), acc[:, 0])
        out_v[r0:r1] = xp.where(bad, xp.float32(np.inf), acc[:, 1])
        if touch is not None:
            msk = xp.where(touch, msk | nod, msk)
        out_m[r0:r1] = msk if off is None else xp.where(off, nod, msk)

    starts = list(range(0, H, band))
    parallel_map(one, starts, cpu_workers(len(starts), parallel=not backend.is_gpu))


def resample_general(
    backend: Backend, xs, ys, u, v, src: dict, ntaps: int, wfun, outs, no_data: int
) -> None:
    """Resample any mapping into ``outs`` = (image, variance, mask): per row band, the
    mapping interpolated bilinearly between nodes, then ntaps² (36) gathers per pixel.

    Parameters
    ----------
    backend : Backend
        Where the source arrays and ``outs`` live.
    xs, ys : numpy.ndarray
        Destination columns / rows of the mapping's nodes.
    u, v : numpy.ndarray (len(ys), len(xs))
        Source column / row of each node.
    src : dict
        The source, as described in the module docstring (with ``iv``).
    ntaps : int
        Taps per axis of the kernel.
    wfun : callable
        ``wfun(xp, frac)`` → (ntaps, ...) weights of the fractional offsets.
    outs : tuple of arrays
        (image float32, variance float32, mask int32), each (H, W), filled in place.
    no_data : int
        The NO_DATA bitmask.
    """
    xp = backend.xp
    out_i, out_v, out_m = outs
    H, W = out_i.shape
    ud, vd = backend.asarray(u), backend.asarray(v)
    kx0, kx1, tx = interp_index(xs, np.arange(W, dtype=np.float64))
    kx0, kx1, tx = backend.asarray(kx0), backend.asarray(kx1), backend.asarray(tx)[None, :]
    band = max(1, _BAND_PIXELS.get(backend.name, 1 << 15) // W)

    def one(r0):  # row bands bound the memory; each writes only its own rows
        r1 = min(H, r0 + band)
        rows = np.arange(r0, r1, dtype=np.float64)
        ky0, ky1, ty = (backend.asarray(a) for a in interp_index(ys, rows))
        ty = ty[:, None]

        def lerp(g):
            top = (1 - tx) * g[ky0][:, kx0] + tx * g[ky0][:, kx1]
            return (1 - ty) * top + ty * ((1 - tx) * g[ky1][:, kx0] + tx * g[ky1][:, kx1])

        img, var, msk, off, touch = _warp_band(backend, lerp(ud), lerp(vd), src, ntaps, wfun)
        nod = off | touch
        out_i[r0:r1] = xp.where(nod, xp.float32(np.nan), img)
        out_v[r0:r1] = xp.where(nod, xp.float32(np.inf), var)
        # afw's edge pixel is NO_DATA alone; a footprint that touches NO_DATA keeps its bits.
        nd = np.int32(no_data)
        out_m[r0:r1] = xp.where(off, nd, xp.where(touch, msk | nd, msk))

    starts = list(range(0, H, band))
    parallel_map(one, starts, cpu_workers(len(starts), parallel=not backend.is_gpu))
