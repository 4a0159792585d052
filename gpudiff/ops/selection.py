"""Exact order statistics without a sort, and clipped column statistics of stacks.

The sort-free statistics of :mod:`gpudiff.ops.stats` (medians, quartiles, clipped
samples) select ranks here: a few passes of histogramming the keys' bytes, the same on
NumPy and on a device, exact (tests compare them with sorting).  ``_clip_columns`` is
the binned background's MEANCLIP of many bin stacks at once (the ``clipped_columns``
kernel; its NumPy twin gives ``clipped_stack``'s bits).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import Backend
from ..backend.core import bincount as _bincount

# Through its module, so that a test's fake device (which swaps the registry's launchers
# for counted NumPy twins) reaches it.
from ..backend import kernels as _kernels
from ..backend.reference import QUANTILE_COLUMNS_MAX_FRACTIONS
from ..errors import InvalidInputError

__all__: list[str] = []

#: Fractions of the pass-0 quantiles (afw ``medianAndQuartiles``): q1, median, q3.
_QUARTILES = (0.25, 0.50, 0.75)


def _sortable_keys(xp, v):
    """float32 → uint32 keys in the order of the values (sign bit flipped for positives,
    all bits for negatives): the radix select's view of the sample."""
    # the arithmetic shift of the sign bit gives 0 or all ones: the flip mask in 3 launches
    flip = (v.view(xp.int32) >> 31) | xp.int32(-(1 << 31))
    return v.view(xp.uint32) ^ flip.view(xp.uint32)


def _keys_to_float(xp, k):
    """Inverse of :func:`_sortable_keys`."""
    flip = ~(k.view(xp.int32) >> 31) | xp.int32(-(1 << 31))
    return (k ^ flip.view(xp.uint32)).view(xp.float32)


def _radix_select(xp, v, valid, ranks):
    """Values of ``v[valid]`` at 0-based sorted positions ``ranks`` (device int64 array),
    without sorting: histogram the top 16 bits of the keys, locate each rank's bin by a
    prefix sum, then histogram the low 16 bits of every rank's bin members at once
    (rank-major bins).  About 25 device calls whatever the number of ranks, no host sync
    (the ranks may be device values)."""
    keys = xp.where(valid, _sortable_keys(xp, v), xp.uint32(0xFFFFFFFF))  # invalid: last
    hi = (keys >> 16).astype(xp.int64)
    # cumulative counts behind a leading 0: c0[b] is the count below high bin b
    c0 = xp.zeros((1 << 16) + 1, dtype=xp.int64)
    xp.cumsum(_bincount(xp, hi, 1 << 16), out=c0[1:])
    b = xp.searchsorted(c0[1:], ranks, side="right")  # first bin whose count > rank
    nr = int(ranks.shape[0])
    members = hi[None, :] == b[:, None]  # (ranks, N)
    slot = (keys & xp.uint32(0xFFFF))[None, :] + xp.arange(0, nr << 16, 1 << 16, dtype=xp.int64)[
        :, None
    ]
    h2 = _bincount(xp, slot.ravel(), nr << 16, members.ravel().astype(xp.float64))
    c2 = xp.cumsum(h2.reshape(nr, 1 << 16), axis=1)
    # first low bin whose cumulative count exceeds the rank within its high bin
    lo = (c2 <= (ranks - c0[b])[:, None]).sum(axis=1)
    return _keys_to_float(xp, ((b << 16) | lo).astype(xp.uint32)).astype(xp.float64)


def _order_statistics(be: Backend, v, valid, n, ranks):
    """float64 ``sorted(v[valid])[ranks]`` by selection (never a full sort)."""
    xp = be.xp
    if be.is_gpu:
        return _radix_select(xp, v, valid, ranks)
    r = be.asnumpy(ranks)
    kth = sorted(set(int(k) for k in r))
    if valid is None:  # a compacted host sample of _quantiles's own: selected in place
        if v.size == 0:
            return np.zeros(r.shape, dtype=np.float64)
        v.partition(kth)
        return v[r].astype(np.float64)
    good = v[valid]  # the CPU knows n: np.partition is a linear-time selection
    if good.size == 0:
        return xp.zeros(r.shape, dtype=xp.float64)
    return xp.partition(good, kth)[r].astype(xp.float64)


def _radix_select_rows(xp, V, valid, rows, ranks):
    """:func:`_radix_select` of several samples at once: ``V`` (k, N) float32 with one
    ``valid`` mask (N,) for all rows; returns ``sorted(V[rows[j]][valid])[ranks[j]]`` for
    every j, float64.  The high-16-bit histogram of all rows is one bincount over k·2¹⁶
    bins (row-major, so one cumulative sum locates every rank: each row holds exactly N
    keys, the invalid ones last); the low-16-bit pass histograms each rank's row."""
    k, N = int(V.shape[0]), int(V.shape[1])
    keys = xp.where(valid[None, :], _sortable_keys(xp, V), xp.uint32(0xFFFFFFFF))
    hi = (keys >> 16) + xp.arange(0, k << 16, 1 << 16, dtype=xp.int64)[
        :, None
    ]  # uint32 + int64: int64
    c0 = xp.zeros((k << 16) + 1, dtype=xp.int64)  # a leading 0, as in _radix_select
    xp.cumsum(_bincount(xp, hi.ravel(), k << 16), out=c0[1:])
    g = ranks + rows * N  # ranks in the row-major concatenation
    b = xp.searchsorted(c0[1:], g, side="right")
    r_in = g - c0[b]  # rank inside its high bin
    b = b - (rows << 16)  # the high bin within its row
    nr = int(ranks.shape[0])
    ks = keys[rows]  # (nr, N): each rank's own row
    members = ((ks >> 16) == b[:, None]).ravel().astype(xp.float64)
    slot = (ks & xp.uint32(0xFFFF)) + xp.arange(0, nr << 16, 1 << 16, dtype=xp.int64)[:, None]
    h2 = _bincount(xp, slot.ravel(), nr << 16, members)
    c2 = xp.cumsum(h2.reshape(nr, 1 << 16), axis=1)
    lo = (c2 <= r_in[:, None]).sum(axis=1)
    return _keys_to_float(xp, ((b << 16) | lo).astype(xp.uint32)).astype(xp.float64)


def _quantiles(be: Backend, samples, valid, fractions):
    """NumPy's default (linear) percentiles of ``v[valid]`` for every array ``v`` of
    ``samples`` (same shape, one ``valid`` mask), at ``fractions[i]`` (a tuple of values in
    0–1) for sample i: a float64 backend vector of all of them in order, by selection and
    without a host sync.

    On the CPU the selection (``numpy.partition``) runs on each sample as given (float64
    stays exact); on a device all samples are the columns of one ``quantile_columns``
    kernel launch (at most three fractions each; else one batched radix select of about
    25 launches), exact order statistics of the float32 values, so the result is within
    float32 rounding of the float64 percentile.  An empty sample gives NaN.

    ``valid`` None (host only): every ``samples[i]`` is a 1-d NumPy array of the usable
    values alone (``v[valid]``, all of one length), which the selection reorders in place:
    a caller that compacts its planes once saves the whole-image temporaries and copies.
    """
    xp = be.xp
    if valid is None:
        if be.is_gpu:
            raise InvalidInputError("_quantiles: compacted samples (valid None) are host-only")
        sizes = {int(v.size) for v in samples}
        if len(sizes) > 1:
            raise InvalidInputError("_quantiles: compacted samples must have one length")
        n_host = sizes.pop() if sizes else 0
    else:
        valid = valid.reshape(-1)
    samples = [v.reshape(-1) for v in samples]
    if len(fractions) != len(samples):
        raise InvalidInputError("_quantiles: one tuple of fractions per sample")
    fr_list = [np.asarray(f, dtype=np.float64).reshape(-1) for f in fractions]
    mmax = max((f.size for f in fr_list), default=0)
    if be.is_gpu and 0 < mmax <= QUANTILE_COLUMNS_MAX_FRACTIONS:
        # The registered quantile_columns kernel: every sample a column of one launch (the
        # selection phases of the clipped_columns kernel), the same exact float32 order
        # statistics and float64 interpolation as the radix select below.
        table = np.full((len(fr_list), mmax), np.nan)
        for i, f in enumerate(fr_list):
            table[i, : f.size] = f
        V = xp.stack(samples, dtype=xp.float32)  # the cast and the copy in one launch
        q = _kernels.get_kernel("quantile_columns", be)(V.T, valid, table)
        # every sample's own fractions, in order, by one gather
        ri = np.concatenate([np.full(f.size, i, dtype=np.int64) for i, f in enumerate(fr_list)])
        ci = np.concatenate([np.arange(f.size, dtype=np.int64) for f in fr_list])
        return q[be.asarray(ri), be.asarray(ci)]
    n = np.int64(n_host) if valid is None else valid.sum().astype(xp.int64)
    fr_h = np.concatenate([np.asarray(f, dtype=np.float64).reshape(-1) for f in fractions])
    rows_h = np.concatenate([np.full(len(f), i, dtype=np.int64) for i, f in enumerate(fractions)])
    fr = be.asarray(fr_h)
    nm1 = xp.maximum(n - 1, 0)
    idx = fr * nm1.astype(xp.float64)
    lo = idx.astype(xp.int64)
    hi = xp.minimum(lo + 1, nm1)
    m = int(fr_h.size)
    if be.is_gpu:
        V = xp.stack([v.astype(xp.float32, copy=False) for v in samples])
        rows = be.asarray(np.concatenate([rows_h, rows_h]))
        vals = _radix_select_rows(xp, V, valid, rows, xp.concatenate([lo, hi]))
        vlo, vhi = vals[:m], vals[m:]
    else:
        # each sample selects only its own ranks (every extra kth is another partition pass)
        vlo, vhi = xp.empty(m), xp.empty(m)
        for i, v in enumerate(samples):
            at = np.flatnonzero(rows_h == i)
            got = _order_statistics(be, v, valid, n, xp.concatenate([lo[at], hi[at]]))
            vlo[at], vhi[at] = got[: at.size], got[at.size :]
    lo_f = lo.astype(xp.float64)
    out = (lo_f + 1.0 - idx) * vlo + (idx - lo_f) * vhi
    return xp.where(n > 0, out, xp.nan)


def _clip_columns(
    be: Backend,
    data: Any,
    good: Any,
    nsigma: float = 3.0,
    niter: int = 3,
    *,
    want_var: bool = True,
    good_is_finite: bool = False,
):
    """afw MEANCLIP / VARIANCECLIP of every column of a deep (N, B) stack, unit weights.

    The registered kernel ``clipped_columns`` (docs/algorithms.md §0.5): on the CPU its
    NumPy twin, :func:`gpudiff.backend.reference_columns.clipped_columns`, the same numbers as the
    registered ``clipped_stack`` on ``(data, ~good)`` bit for bit; on a device one CUDA
    launch for every column (one block per column; a sort-free radix select of the
    quartiles, then the clipping passes with block reductions in float64), equal to the
    twin to float32 rounding.  Meant for stacks deeper than ``clipped_stack``'s register
    budget (a 128² background bin is a column of 16384; the whole-image clip one column of
    H·W), where that kernel runs its sort-based vectorized twin on the device instead.

    Parameters
    ----------
    be : Backend
    data : array (N, B)
        Samples along axis 0 (converted to float32, as the kernel reads them); any
        strides (a transposed view of a (B, N) stack reads each column contiguously on a
        device).
    good : bool array (N, B)
        True = sample used (non-finite samples are dropped as well).
    nsigma, niter : float, int
        As ``clipped_stack``.
    want_var : bool
        Return the final pass's variance (else None).
    good_is_finite : bool
        The caller guarantees ``data`` (as float32) is finite wherever ``good`` is True
        (e.g. ``MaskedImage.good_pixels`` of a float32 image): no finiteness pass.

    Returns
    -------
    mean, var : float32 arrays (B,)
    n_used : int32 array (B,)
        Survivors of the final pass.
    n_good : int64 array (B,)
        True entries of ``good`` per column (afw NPOINT when ``good`` implies finite).
    """
    f = _kernels.get_kernel("clipped_columns", be)
    return f(data, good, nsigma, niter, want_var=want_var, good_is_finite=good_is_finite)
