"""afw statistics (``MEANCLIP``/``VARIANCECLIP``/``NPOINT``, or plain ``MEAN``) of a grid of
windows made of blocks of cells, the step of tract-background binning.

The windows of LSST's ``TractBackground`` are 2 × 2 bins and overlap by one bin, so each
pixel is in four windows; the generic ``clipped_stack`` would see every pixel four times
and make three float64 passes over them per clipping iteration.  Here the image is cut
into cells (half-bin-shifted bins), each cell is **sorted once**, with float64 prefix sums
of its values and squares (centred on the cell's median so nothing cancels).  Then, for
every window (a block of cells):

- afw's first pass needs the median and quartiles of the window: order statistics of a
  union of sorted cells, found by bisection on the float32 bit patterns (counting with
  per-cell binary searches), exactly;
- every later pass keeps the samples within ``centre ± width``: a contiguous run of each
  sorted cell, whose count, sum and sum of squares come from the prefix sums at two
  binary-searched indices.

The semantics are exactly :func:`gpudiff.backend.reference.clipped_stack`'s (re-clipping
the full sample every pass, inclusive bounds, ddof = 1 variance, NaN on an empty pass),
which is the test oracle.  Written against ``be.xp``: the sort, cumsums and gathers run on
the device under CuPy; the searches are loops of ~17 small vectorized steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import Backend, resolve_backend
from ..backend.reference import IQ_TO_STDEV
from ..errors import InvalidInputError, ShapeMismatchError

__all__ = ["window_statistics"]

_STATISTICS = ("MEANCLIP", "MEAN")
_SIGN = np.int64(0x7FFFFFFF)


def _search(xp, s, rows, v, right: bool):
    """Per-row ``searchsorted`` in rows ``rows`` of the row-sorted ``s``: the first index i
    with s[row, i] >= v (``right``: > v).  NaN thresholds compare False: 0."""
    L = s.shape[1]
    lo = xp.zeros(rows.shape, dtype=xp.int64)
    hi = xp.full(rows.shape, L, dtype=xp.int64)
    for _ in range(int(L).bit_length()):
        active = lo < hi
        mid = (lo + hi) // 2
        val = s[rows, xp.minimum(mid, L - 1)]
        go = ((val <= v) if right else (val < v)) & active
        lo = xp.where(go, mid + 1, lo)
        hi = xp.where(go | ~active, hi, mid)
    return lo


def _key_to_float(xp, key):
    """Inverse of the monotone float32 → int key map (key = bits, or bits ^ 0x7fffffff
    for negative floats)."""
    bits = xp.where(key >= 0, key, key ^ _SIGN).astype(xp.int32)
    return bits.view(xp.float32).astype(xp.float64)


class _Cells:
    """Sorted cells with prefix sums, and the windows (blocks of cells) over them."""

    def __init__(self, xp, s, groups):
        self.xp, self.s, self.groups = xp, s, groups  # s (ncell, L); groups (nwin, c)
        m, L = s.shape
        self.n_cell = (s < xp.inf).sum(axis=1).astype(xp.int64)
        idx = xp.maximum(self.n_cell - 1, 0) // 2
        med = xp.take_along_axis(s, idx[:, None], axis=1)[:, 0].astype(xp.float64)
        self.shift = xp.where(self.n_cell > 0, med, 0.0)
        # Excluded samples (+inf, at the end of each row) make +inf sums there, which are
        # never read: a run ends at most at n_cell.
        z = xp.subtract(s, self.shift[:, None], dtype=xp.float64)
        self.p1 = xp.empty((m, L + 1))
        self.p2 = xp.empty((m, L + 1))
        self.p1[:, 0] = 0.0
        self.p2[:, 0] = 0.0
        xp.cumsum(z, axis=1, out=self.p1[:, 1:])
        xp.multiply(z, z, out=z)
        xp.cumsum(z, axis=1, out=self.p2[:, 1:])
        del z
        self.n = self.n_cell[groups].sum(axis=1)

    def count_le(self, v):
        """Samples <= v in every window."""
        xp = self.xp
        return sum(
            xp.minimum(
                _search(xp, self.s, self.groups[:, j], v, True), self.n_cell[self.groups[:, j]]
            )
            for j in range(self.groups.shape[1])
        )

    def kth(self, k):
        """The k-th smallest (0-based) valid sample of every window (k < n), exactly: the
        smallest float32 whose count_le exceeds k, by bisection on its bit pattern."""
        xp = self.xp
        # keys of -inf and +inf: every probe stays on a real float32 (no NaN patterns)
        lo = xp.full(k.shape, -2139095041, dtype=xp.int64)
        hi = xp.full(k.shape, 2139095040, dtype=xp.int64)
        for _ in range(32):
            mid = (lo + hi) // 2
            ge = self.count_le(_key_to_float(xp, mid)) >= k + 1
            hi = xp.where(ge, mid, hi)
            lo = xp.where(ge, lo, mid + 1)
        return _key_to_float(xp, lo)

    def next_after(self, v):
        """The smallest valid sample > v of every window (+inf if none)."""
        xp = self.xp
        best = xp.full(v.shape, xp.inf)
        for j in range(self.groups.shape[1]):
            rows = self.groups[:, j]
            i = _search(xp, self.s, rows, v, True)
            ok = i < self.n_cell[rows]
            val = self.s[rows, xp.minimum(i, self.s.shape[1] - 1)].astype(xp.float64)
            best = xp.minimum(best, xp.where(ok, val, xp.inf))
        return best

    def quantile(self, frac: float):
        """afw ``medianAndQuartiles``: linear interpolation at idx = frac·(n − 1)."""
        xp = self.xp
        nm1 = xp.maximum(self.n - 1, 0)
        idx = frac * nm1.astype(xp.float64)
        q1 = idx.astype(xp.int64)
        v1 = self.kth(q1)
        v2 = xp.where(q1 + 1 <= nm1, self.next_after(v1), v1)
        # equal values: the (q1+1)-th sample may equal the q1-th one
        v2 = xp.where(self.count_le(v1) >= q1 + 2, v1, v2)
        w2 = idx - q1.astype(xp.float64)
        val = (1.0 - w2) * v1 + w2 * xp.where(w2 > 0, v2, 0.0)
        return xp.where(self.n > 0, val, xp.nan)

    def run(self, lo_v, hi_v, centre):
        """Count, mean and ddof-1 variance of the samples in [lo_v, hi_v] of every window
        (lo_v/hi_v None: all valid samples); ``centre`` keeps the sums small."""
        xp = self.xp
        cnt = xp.zeros(self.n.shape, dtype=xp.int64)
        s1 = xp.zeros(self.n.shape)
        s2 = xp.zeros(self.n.shape)
        for j in range(self.groups.shape[1]):
            rows = self.groups[:, j]
            nc = self.n_cell[rows]
            if lo_v is None:
                lo, hi = xp.zeros_like(nc), nc
            else:
                hi = xp.minimum(_search(xp, self.s, rows, hi_v, True), nc)
                lo = xp.minimum(_search(xp, self.s, rows, lo_v, False), hi)
            c = (hi - lo).astype(xp.float64)
            a1 = self.p1[rows, hi] - self.p1[rows, lo]
            a2 = self.p2[rows, hi] - self.p2[rows, lo]
            d = self.shift[rows] - centre  # cell shift relative to the window centre
            cnt += hi - lo
            s1 += a1 + d * c
            s2 += a2 + 2.0 * d * a1 + d * d * c
        cf = cnt.astype(xp.float64)
        ok = cnt > 0
        cs = xp.where(ok, cf, 1.0)
        mz = xp.where(ok, s1 / cs, xp.nan)
        ok2 = cnt > 1
        var = xp.where(
            ok2, xp.maximum(s2 / cs - mz * mz, 0.0) * (cs / xp.where(ok2, cs - 1.0, 1.0)), xp.nan
        )
        return mz + centre, var, cnt


def _statistics(xp, cells: _Cells, statistic: str, nsigma: float, niter: int):
    if statistic == "MEAN":
        mean, var, cnt = cells.run(None, None, cells.shift[cells.groups[:, 0]])
        return mean, var, cnt
    centre = cells.quantile(0.5)
    iqr_width = (nsigma * IQ_TO_STDEV) * (cells.quantile(0.75) - cells.quantile(0.25))
    c0 = xp.where(xp.isfinite(centre), centre, 0.0)
    c, w = centre, iqr_width
    mean = var = cnt = None
    for it in range(int(niter)):
        if it > 0:
            # afw: centre = previous clipped mean, width = nσ·(previous clipped stdev); with
            # one valid sample the IQR width again.  A NaN variance (one survivor) makes
            # the next pass keep nothing, as in afw.
            c = mean
            w = xp.where(cells.n > 1, nsigma * xp.sqrt(var), iqr_width)
        mean, var, cnt = cells.run(c - w, c + w, c0)
    return mean, var, cnt


def window_statistics(
    image: Any,
    good: Any,
    row_starts: Any,
    col_starts: Any,
    size: Any,
    *,
    span: int = 1,
    statistic: str = "MEANCLIP",
    nsigma: float = 3.0,
    niter: int = 3,
    backend: Backend | str | None = None,
) -> dict:
    """Statistics of windows made of ``span`` × ``span`` blocks of cells of an image.

    Cell (i, j) covers rows ``row_starts[i] : row_starts[i] + heights[i]`` and columns
    ``col_starts[j] : col_starts[j] + widths[j]`` (array indices; cells may extend beyond
    the image, whose outside counts as masked).  Window (i, j) is the union of cells
    i … i+span−1 × j … j+span−1; with ``span`` 1 the windows are the cells.

    Parameters
    ----------
    image : 2-D float array on ``backend``
    good : 2-D bool array
        Usable pixels (non-finite image pixels are excluded regardless).
    row_starts, col_starts : 1-D int arrays
        Increasing, cells not overlapping.
    size : (int, int) or (array, array)
        Cell height and width: one for all, or per cell row / column (``heights``,
        ``widths``; e.g. afw's nearly equal bins).
    span : int
        Cells per window side (2 for LSST's tract windows of twice the bin size).
    statistic : {"MEANCLIP", "MEAN"}
    nsigma, niter : float, int
        afw ``numSigmaClip`` / ``numIter``.
    backend : Backend or str, optional

    Returns
    -------
    dict of host arrays (len(row_starts) − span + 1, len(col_starts) − span + 1)
        ``mean`` and ``variance`` (float64, NaN where empty), ``n_point`` (NPOINT),
        ``n_used`` (int64), and ``row_mean`` / ``col_mean``: the mean array row and column
        of the usable pixels (NaN where none), i.e. where a partly covered window's
        statistic actually samples the image.
    """
    be = resolve_backend(backend)
    xp = be.xp
    if statistic not in _STATISTICS:
        raise InvalidInputError(f"statistic must be one of {_STATISTICS}, got {statistic!r}")
    img = be.asarray(image)
    ok = be.asarray(good)
    if img.ndim != 2 or tuple(ok.shape) != tuple(img.shape):
        raise ShapeMismatchError(
            f"window_statistics: image {tuple(img.shape)} and good {tuple(ok.shape)} "
            "must be 2-D arrays of one shape"
        )
    # The cell geometry is host-side index arithmetic (device arrays are brought back).
    rs = np.asarray(be.asnumpy(row_starts), dtype=np.int64).ravel()
    cs = np.asarray(be.asnumpy(col_starts), dtype=np.int64).ravel()
    ny, nx = rs.size, cs.size
    hs = np.broadcast_to(np.asarray(be.asnumpy(size[0]), dtype=np.int64), (ny,))
    ws = np.broadcast_to(np.asarray(be.asnumpy(size[1]), dtype=np.int64), (nx,))
    if (hs < 1).any() or (ws < 1).any() or int(span) < 1:
        raise InvalidInputError(
            f"cell sizes and span must be positive, got {size!r}, span {span!r}"
        )
    if (np.diff(rs) < hs[:-1]).any() or (np.diff(cs) < ws[:-1]).any():
        raise InvalidInputError("window_statistics: cells must be increasing and must not overlap")
    wy, wx = ny - span + 1, nx - span + 1
    out = {
        k: np.full((max(wy, 0), max(wx, 0)), np.nan)
        for k in ("mean", "variance", "row_mean", "col_mean")
    }
    out.update(
        {k: np.zeros((max(wy, 0), max(wx, 0)), dtype=np.int64) for k in ("n_point", "n_used")}
    )
    if wy < 1 or wx < 1:
        return out
    H, W = img.shape
    ch, cw = int(hs.max()), int(ws.max())
    pt, pb = max(0, -int(rs.min())), max(0, int(rs.max()) + ch - H) + 1
    pl, pr = max(0, -int(cs.min())), max(0, int(cs.max()) + cw - W) + 1
    # Excluded pixels become +inf: they sort to the end of every cell.
    a = xp.where(ok & xp.isfinite(img), img.astype(xp.float32), xp.float32(np.inf))
    a = xp.pad(a, ((pt, pb), (pl, pr)), constant_values=np.inf)
    inf_r, inf_c = a.shape[0] - 1, a.shape[1] - 1  # padding samples of smaller cells read these
    ri = np.where(
        np.arange(ch)[None, :] < hs[:, None], (rs + pt)[:, None] + np.arange(ch)[None, :], inf_r
    )
    ci = np.where(
        np.arange(cw)[None, :] < ws[:, None], (cs + pl)[:, None] + np.arange(cw)[None, :], inf_c
    )
    blk = a[be.asarray(ri)[:, :, None, None], be.asarray(ci)[None, None, :, :]]  # (ny, ch, nx, cw)
    _centroids(be, blk, ri, ci, pt, pl, span, out)
    s = xp.ascontiguousarray(blk.transpose(0, 2, 1, 3)).reshape(ny * nx, ch * cw)
    del blk
    s.sort(axis=1)
    # window (i, j) = cells (i + di, j + dj), di, dj < span
    wi, wj = np.meshgrid(np.arange(wy), np.arange(wx), indexing="ij")
    groups = np.stack(
        [((wi + di) * nx + (wj + dj)).ravel() for di in range(span) for dj in range(span)], axis=1
    )
    cells = _Cells(xp, s, be.asarray(groups))
    mean, var, cnt = _statistics(xp, cells, statistic, float(nsigma), int(niter))
    out["mean"] = be.asnumpy(mean).reshape(wy, wx)
    out["variance"] = be.asnumpy(var).reshape(wy, wx)
    out["n_point"] = be.asnumpy(cells.n).reshape(wy, wx)
    out["n_used"] = be.asnumpy(cnt).reshape(wy, wx)
    return out


def _centroids(
    be: Backend, blk, ri: np.ndarray, ci: np.ndarray, pt: int, pl: int, span: int, out: dict
) -> None:
    """Mean row/column of the usable pixels of every window, from per-cell counts of the
    usable samples of the gathered (ny, ch, nx, cw) block and their row/column sums."""
    xp = be.xp
    valid = blk < xp.inf
    per_row = valid.sum(axis=3, dtype=xp.int64)  # (ny, ch, nx)
    per_col = valid.sum(axis=1, dtype=xp.int64)  # (ny, nx, cw)
    n_c = be.asnumpy(per_row.sum(axis=1)).astype(np.float64)
    rows = be.asnumpy(per_row).astype(np.float64)
    cols = be.asnumpy(per_col).astype(np.float64)
    # ri/ci: padded-array indices of every cell's rows/columns (padding samples point at
    # the all-excluded last row/column and count nothing)
    sr = np.einsum("ikj,ik->ij", rows, (ri - pt).astype(np.float64))
    sc = np.einsum("ijk,jk->ij", cols, (ci - pl).astype(np.float64))
    wy, wx = out["mean"].shape

    def block(x):
        return sum(x[di : di + wy, dj : dj + wx] for di in range(span) for dj in range(span))

    n = block(n_c)
    ok = n > 0
    nn = np.where(ok, n, 1.0)
    out["row_mean"] = np.where(ok, block(sr) / nn, np.nan)
    out["col_mean"] = np.where(ok, block(sc) / nn, np.nan)
