"""Cache-blocked NumPy MEANCLIP of wide stacks: the binned background's bins on the CPU.

:func:`clip_columns_host` gives the bits of ``clipped_stack(data, ~good)`` (its NumPy
twin, :func:`gpudiff.backend.reference.clipped_stack`, docs/algorithms.md §0.5) for a
stack of many columns, about three times as fast on a host (0.31 -> 0.11 CPU-s on a
16384 × 256 stack); :func:`clip_tiled_bins_host` does so for the bins tiling an image.
The twin clips bands of a few columns each so that its temporaries stay in cache; with
deep columns (a 128² bin is a column of 16384 samples) its bands are 8 columns wide, and
every reduction along the samples then runs an 8-wide inner loop per sample row.  Here
the passes run over all columns at once, a block of sample rows at a time (cache-sized,
reused buffers), and the column sums are carried from block to block:
``acc + row₀ + row₁ + …`` in sample order, exactly the sequential sum along axis 0 that
NumPy (and the twin) compute.  The pass-0 quartiles come from a sort of each column laid
out as a contiguous row (NumPy's vectorised sort), the same order statistics as the
twin's sort along axis 0.
"""

from __future__ import annotations

import numpy as np

from ..backend.reference import IQ_TO_STDEV, weighted_mean_var

__all__ = ["clip_columns_host", "clip_tiled_bins_host"]

#: float64 values per block buffer (512 KiB; 2¹³–2¹⁷ measured within 20 % on a 16384 × 256
#: stack, 2¹⁶ the fastest).
_BLOCK_ELEMENTS = 1 << 16


def _column_sum(block: np.ndarray, r: int, acc: np.ndarray | None) -> np.ndarray:
    """Sequential sum along axis 0 of ``block[1 : r + 1]`` continued from ``acc`` (row 0
    of ``block`` is scratch for it): the bits of one sum over all the blocks in order."""
    if acc is None:
        return block[1 : r + 1].sum(axis=0)
    block[0] = acc
    return block[: r + 1].sum(axis=0)


def clip_columns_host(data: np.ndarray, good: np.ndarray, nsigma: float = 3.0, niter: int = 3):
    """afw MEANCLIP / VARIANCECLIP of every column of a host (N, B) stack, unit weights.

    The same numbers, bit for bit, as ``clipped_stack(data, ~good, None, nsigma, niter)``
    on NumPy (its ``_clip_band`` step for step: float64 passes, sums along the samples in
    their order, the same masks and divisions).

    Parameters
    ----------
    data : numpy.ndarray (N, B)
        Samples along axis 0, any layout; read as float32.  Non-finite samples are
        excluded.
    good : numpy.ndarray of bool (N, B)
        True = sample used.
    nsigma : float
        Clip half-width in sigma (> 0).
    niter : int
        Passes including the first median/IQR pass (>= 1).

    Returns
    -------
    mean, variance : float32 numpy.ndarray (B,)
        As ``clipped_stack``'s.
    n_used : int32 numpy.ndarray (B,)
        Survivors of the final pass.
    """
    data = np.asarray(data)
    # The sample rows as float32 with unusable samples zero (the twin's x before its cast
    # to float64), and each column as a contiguous row (+inf where unusable) to sort.
    d32 = data.astype(np.float32, copy=False)
    valid = np.asarray(good, dtype=bool) & np.isfinite(d32)
    x32 = np.where(valid, d32, np.float32(0))
    s = np.where(valid.T, d32.T, np.float32(np.inf))
    s = np.ascontiguousarray(s)  # (B, N) C-ordered (np.where keeps the inputs' F layout)
    return _clip(x32, valid, s, float(nsigma), int(niter))


def clip_tiled_bins_host(
    image: np.ndarray, good: np.ndarray, ny: int, nx: int, nsigma: float = 3.0, niter: int = 3
):
    """:func:`clip_columns_host` of the bins of an image tiled by ``ny`` × ``nx`` equal bins.

    Bin (i, j) is column ``i·nx + j`` of the stack whose samples are its pixels in
    row-major order (``bin_background``'s stack); the same bits as
    :func:`clip_columns_host` on that stack.  The stack layouts are made from the image's
    own masked copies, whose bin rows are contiguous runs: no transposition sample by
    sample.

    Parameters
    ----------
    image : numpy.ndarray (H, W)
        Read as float32; H and W multiples of ``ny`` and ``nx``.
    good : numpy.ndarray of bool (H, W)
        True = pixel used (non-finite pixels are dropped as well).
    ny, nx : int
        Bins along rows and columns.
    nsigma, niter
        As :func:`clip_columns_host`.

    Returns
    -------
    mean, variance, n_used
        As :func:`clip_columns_host`, bins in row-major order.
    """
    im = np.asarray(image).astype(np.float32, copy=False)
    H, W = (int(v) for v in im.shape)
    h, w = H // ny, W // nx
    valid = np.asarray(good, dtype=bool) & np.isfinite(im)

    def samples_last(a):  # (B, N): bin (i, j)'s pixels, row-major, as row i·nx + j
        return a.reshape(ny, h, nx, w).transpose(0, 2, 1, 3).reshape(ny * nx, h * w)

    def samples_first(a):  # (N, B): the same stack with the samples along axis 0
        return np.ascontiguousarray(a.reshape(ny, h, nx, w).transpose(1, 3, 0, 2)).reshape(
            h * w, ny * nx
        )

    s = samples_last(np.where(valid, im, np.float32(np.inf)))
    x32 = samples_first(np.where(valid, im, np.float32(0)))
    return _clip(x32, samples_first(valid), s, float(nsigma), int(niter))


def _clip(x32: np.ndarray, valid: np.ndarray, s: np.ndarray, nsigma: float, niter: int):
    """The clip of :func:`clip_columns_host`: ``x32`` (N, B) float32 samples zero where
    not ``valid`` (N, B), ``s`` (B, N) a C-ordered copy of each column, +inf where not
    valid (sorted here, in place)."""
    N, B = (int(v) for v in x32.shape)
    s.sort(axis=1)
    n = valid.sum(axis=0).astype(np.int64)

    # afw medianAndQuartiles: the twin's _quartiles_sorted arithmetic, element for element
    nm1 = np.maximum(n - 1, 0)
    nm1_f = nm1.astype(np.float64)
    idx = np.stack([0.50 * nm1_f, 0.25 * nm1_f, 0.75 * nm1_f])
    q1 = idx.astype(np.int64)
    q2 = np.minimum(q1 + 1, nm1[None, :])
    w1 = (q1 + 1).astype(np.float64) - idx
    w2 = idx - q1.astype(np.float64)
    rows = np.arange(B, dtype=np.int64)[None, :] * N
    flat = s.reshape(-1)
    v1 = flat.take(rows + q1).astype(np.float64)
    v2 = flat.take(rows + q2).astype(np.float64)
    del s, flat
    with np.errstate(all="ignore"):
        val = np.where((n > 0)[None, :], w1 * v1 + w2 * v2, np.nan)
    median, iqr = val[0], val[2] - val[1]
    iqr_width = (nsigma * IQ_TO_STDEV) * iqr

    rb = max(1, min(N, _BLOCK_ELEMENTS // max(B, 1)))
    d = np.empty((rb, B))
    a = np.empty((rb, B))
    t = np.empty((rb + 1, B))  # row 0: the running sums (see _column_sum)
    t2 = np.empty((rb + 1, B))
    sel = np.empty((rb, B), dtype=bool)
    center, hwidth = median, iqr_width
    mean = var = used = None
    with np.errstate(all="ignore"):
        for it in range(niter):
            if it > 0:
                center = mean
                hwidth = np.where(n > 1, nsigma * np.sqrt(var), iqr_width)
            sumx = sumx2 = None
            used = np.zeros(B, dtype=np.int64)
            for k0 in range(0, N, rb):
                r = min(rb, N - k0)
                dk, ak, sk = d[:r], a[:r], sel[:r]
                np.subtract(x32[k0 : k0 + r], center[None, :], out=dk, dtype=np.float64)
                np.abs(dk, out=ak)
                np.less_equal(ak, hwidth[None, :], out=sk)
                sk &= valid[k0 : k0 + r]
                used += sk.sum(axis=0)
                np.multiply(sk, dk, out=t[1 : r + 1])  # w·d, w = 1
                sumx = _column_sum(t, r, sumx)
                np.multiply(t[1 : r + 1], dk, out=t2[1 : r + 1])  # (w·d)·d
                sumx2 = _column_sum(t2, r, sumx2)
            sumw = used.astype(np.float64)  # unit weights: Σw² = Σw
            mean, var = weighted_mean_var(np, sumw, sumw, sumx, sumx2, center)
    return mean.astype(np.float32), var.astype(np.float32), used.astype(np.int32)
