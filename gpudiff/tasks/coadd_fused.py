"""Whole-stack forms of the per-band coadd reductions, for a device (docs/algorithms.md §10.3).

:func:`~gpudiff.tasks.coadd_stack.stack_band` reduces the N warps of a row band.  On the
CPU it walks the warps one at a time (each step touches one warp's band and a few
accumulators, which stays in cache and never holds an (N, h, W) float64 temporary).  On a
device that walk costs N × (10–20) kernel launches per band for the mask, the validity
and the variance alone (2,400 of the 13,500 device calls of a 20 × 2048² CompareWarp
coadd, ``bench/bench_device_counts.py``).  Here the same reductions run on the stacked
(N, h, W) arrays: a handful of launches per band whatever N, memory being plentiful there.

The numbers are the per-warp loop's: every sum along the epoch axis adds the warps in
order (NumPy and CuPy reduce a non-contiguous axis sequentially from warp 0), products
keep their association, and a bitwise OR is order-free.  ``tests/test_device_discipline.py``
runs these forms on the strict fake device and compares them with the NumPy loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..backend import Backend

if TYPE_CHECKING:  # annotations only: coadd_stack imports this module
    from .assemble_coadd import AssembleCoaddConfig
    from .coadd_stack import CoaddBits

__all__ = [
    "or_reduce",
    "packed_input_map",
    "stacked_band_mask",
    "stacked_online_mean",
    "stacked_valid",
    "stacked_variance",
]


def or_reduce(xp: Any, a: Any) -> Any:
    """Bitwise OR of ``a`` (N, ...) along axis 0 in ⌈log2 N⌉ launches (pairwise halving).

    CuPy has no ``bitwise_or.reduce``; folding the upper half onto the lower half is exact
    (OR is associative and commutative) and touches each element once per level.  ``a`` is
    a temporary of the caller and is overwritten.
    """
    n = a.shape[0]
    while n > 1:
        half = n // 2
        a[:half] |= a[n - half : n]  # the middle element of an odd n stays for the next level
        n -= half
    return a[0]


def stacked_valid(xp: Any, images: Any, variances: Any, masks: Any, and_mask: int) -> Any:
    """Bool (N, h, W): not excluded by ``and_mask`` and finite image and variance."""
    return ((masks & np.int32(and_mask)) == 0) & xp.isfinite(images) & xp.isfinite(variances)


def _weights(be: Backend, w64: np.ndarray) -> Any:
    return be.asarray(np.ascontiguousarray(w64, dtype=np.float64))[:, None, None]


def stacked_band_mask(
    be: Backend,
    cfg: AssembleCoaddConfig,
    bits: CoaddBits,
    images: Any,
    masks: Any,
    valid: Any,
    used: Any,
    w64: np.ndarray,
) -> Any:
    """:func:`~gpudiff.tasks.coadd_stack._band_mask` on the stacked band.

    The per-warp tests "excluded and carrying bit b" become one OR of the excluded warps'
    masks, tested once per bit: any_k(excl_k ∧ m_k & b) = (OR_k excl_k ? m_k : 0) & b.
    """
    xp = be.xp
    zero = np.int32(0)
    out = or_reduce(xp, xp.where(used, masks, zero))
    excl = (masks & np.int32(bits.and_mask)) != 0
    ex = or_reduce(xp, xp.where(excl, masks, zero))
    out |= xp.where((ex & np.int32(bits.reject_src)) != 0, np.int32(bits.rejected), zero)
    if bits.edge:
        out |= xp.where((ex & np.int32(bits.edge)) != 0, np.int32(bits.sensor_edge), zero)
    out |= xp.where((ex & np.int32(bits.clipped)) != 0, np.int32(bits.clipped), zero)
    if cfg.statistic == "MEANCLIP":  # an input dropped by the sigma clipping
        out |= xp.where((valid & ~used).any(axis=0), np.int32(bits.clipped), zero)
    if bits.thresholds:
        w = _weights(be, w64)
        covered = xp.isfinite(images) & ((masks & np.int32(bits.no_data)) == 0)
        tot_w = xp.where(covered, w, 0.0).sum(axis=0)
        for bit, t in bits.thresholds:
            acc = xp.where(excl & ((masks & np.int32(bit)) != 0), w, 0.0).sum(axis=0)
            out |= xp.where(acc > t * tot_w, np.int32(bit), zero)
    return out


def stacked_variance(
    be: Backend,
    cfg: AssembleCoaddConfig,
    variances: Any,
    used: Any,
    w64: np.ndarray,
    data: Any,
    mean: Any,
) -> Any:
    """:func:`~gpudiff.tasks.coadd_stack._propagated_variance` on the stacked band."""
    xp = be.xp
    wk = xp.where(used, _weights(be, w64), 0.0)
    sw = wk.sum(axis=0)
    if cfg.calc_error_from_input_variance:
        acc = (wk * wk * xp.where(used, variances, 0)).sum(axis=0)
        return acc / (sw * sw)
    sw2 = (wk * wk).sum(axis=0)
    d = xp.where(used, data - mean.astype(xp.float64), 0.0)
    acc = (wk * d * d).sum(axis=0)
    var = acc / sw * (sw * sw) / (sw * sw - sw2)
    return var / used.sum(axis=0)


def stacked_online_mean(be: Backend, images: Any, variances: Any, valid: Any, w64: np.ndarray):
    """LSST ``AccumulatorMeanStack`` sums on the stacked band: (mean, variance)."""
    xp = be.xp
    wk = xp.where(valid, _weights(be, w64), 0.0)
    sx = (wk * xp.where(valid, images, 0)).sum(axis=0)
    sv = (wk * wk * xp.where(valid, variances, 0)).sum(axis=0)
    sw = wk.sum(axis=0)
    return sx / sw, sv / (sw * sw)


def packed_input_map(be: Backend, valid: Any, active: Any, n_inputs: int) -> Any:
    """uint8 (⌈n_inputs/8⌉, h, W): bit i % 8 of byte plane i // 8 set where input i
    (``active[j]`` for row j of ``valid``) contributes; one launch per byte plane."""
    xp = be.xp
    active = np.asarray(active, dtype=np.int64)
    shifted = valid.astype(xp.uint8) << be.asarray((active % 8).astype(np.uint8))[:, None, None]
    packed = xp.zeros(((n_inputs + 7) // 8,) + valid.shape[1:], dtype=xp.uint8)
    for g in np.unique(active // 8):
        rows = np.flatnonzero(active // 8 == g)
        contiguous = rows[-1] - rows[0] + 1 == rows.size
        part = shifted[rows[0] : rows[-1] + 1] if contiguous else shifted[be.asarray(rows)]
        packed[int(g)] = part.sum(axis=0, dtype=xp.uint8)  # distinct bits: the sum is the OR
    return packed
