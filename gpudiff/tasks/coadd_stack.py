"""The per-band stacking of :class:`~gpudiff.tasks.assemble_coadd.AssembleCoaddTask`
(docs/algorithms.md §10.3).

:func:`stack_bands` cuts the coadd box into row bands (:class:`BandPlan`).  Per band, the
N warps' pixels are read onto the coadd's mask planes (:func:`read_warp_band`) and reduced
per pixel by :func:`stack_band` into the coadd's image, variance, mask and ``n_image`` for
those rows.  The reduction is the hot loop of a coadd: whole-band array operations along
the epoch axis, never a loop over pixels; only the N warps of one band are ever held.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..backend import Backend
from ..backend.kernels import clipped_stack
from ..image import Box, MaskedImage, MaskPlanes
from . import coadd_fused as fused
from .coadd_warps import read_padded, stream_map

if TYPE_CHECKING:  # only for annotations: assemble_coadd imports this module
    from .assemble_coadd import AssembleCoaddConfig

__all__ = [
    "COADD_PLANES",
    "BandPlan",
    "BandStack",
    "CoaddBits",
    "StackedCoadd",
    "WarpBand",
    "read_warp_band",
    "stack_band",
    "stack_bands",
]

#: Planes the coadd always defines (docs/algorithms.md §10.3 step 1, §12).
COADD_PLANES = ("NO_DATA", "REJECTED", "CLIPPED", "SENSOR_EDGE", "INEXACT_PSF")


class CoaddBits:
    """The coadd's mask bits used by the stacking (ints, for the coadd's plane definition).

    Parameters
    ----------
    planes : MaskPlanes
        The merged plane definition of the inputs; the coadd's own planes, the bad planes
        and the propagated planes are added to it.
    cfg : AssembleCoaddConfig
    extra_bad : sequence of str
        Planes excluded per pixel on top of ``cfg.bad_mask_planes`` (CompareWarp: CLIPPED).

    Attributes
    ----------
    planes : MaskPlanes
    and_mask : int
        An input is excluded at a pixel where its mask has any of these bits.
    no_data, edge, clipped, rejected, sensor_edge, inexact, no_good, remove : int
    reject_src : int
        Bad bits that map to ``REJECTED`` (all but NO_DATA, EDGE and CLIPPED).
    thresholds : list of (int, float)
        ``mask_propagation_thresholds`` as (bit, fraction of the weight).
    """

    def __init__(self, planes: MaskPlanes, cfg: AssembleCoaddConfig, extra_bad: Sequence[str] = ()):
        for name in (
            *COADD_PLANES,
            *cfg.bad_mask_planes,
            *extra_bad,
            cfg.no_good_pixels_mask,
            *cfg.mask_propagation_thresholds,
        ):
            planes.add(name)
        self.planes = planes
        self.and_mask = planes.bitmask([*cfg.bad_mask_planes, *extra_bad])
        b = planes.bitmask
        self.no_data, self.edge = b("NO_DATA"), planes.bitmask_if_present("EDGE")
        self.clipped, self.rejected, self.sensor_edge = (
            b("CLIPPED"),
            b("REJECTED"),
            b("SENSOR_EDGE"),
        )
        self.inexact = b("INEXACT_PSF")
        self.no_good = b(cfg.no_good_pixels_mask)
        self.reject_src = self.and_mask & ~(self.no_data | self.edge | self.clipped)
        self.remove = planes.bitmask_if_present(list(cfg.remove_mask_planes))
        self.thresholds = [(b(p), float(t)) for p, t in cfg.mask_propagation_thresholds.items()]


@dataclass(frozen=True)
class WarpBand:
    """One warp's pixels of one row band, on the coadd's mask planes.

    Attributes
    ----------
    image, variance : float32 array (h, W)
    mask : int32 array (h, W)
    """

    image: Any
    variance: Any
    mask: Any


@dataclass(frozen=True)
class BandStack:
    """What :func:`stack_band` returns for one row band.

    Attributes
    ----------
    image, variance : float32 array (h, W)
        The stacked image and its propagated variance (NaN / +inf where nothing
        contributes).
    mask : int32 array (h, W)
    n_image : int32 array (h, W)
        Inputs contributing per pixel (before sigma clipping, as LSST's nImage).
    contributing : bool array (N, h, W)
        Per input of the band, where it contributes.
    """

    image: Any
    variance: Any
    mask: Any
    n_image: Any
    contributing: Any


@dataclass(frozen=True)
class _Reduction:
    """The statistic of one band before masking: value, variance and the inputs it used."""

    mean: Any
    variance: Any
    used: Any


@dataclass(frozen=True)
class BandPlan:
    """What the stacking of one coadd works with, fixed before the first band is read.

    Attributes
    ----------
    bbox : Box
        The coadd box.
    active : tuple of int
        Indices of the inputs that are stacked.
    weights : numpy.ndarray
        Their weights.
    bits : CoaddBits
    rows : int
        Band height.
    n_threads : int
        Bands reduced at once (1 on a GPU: the device is the parallelism).
    n_inputs : int
        All inputs, skipped ones included (the input map has a bit for each).
    """

    bbox: Box
    active: tuple
    weights: np.ndarray
    bits: CoaddBits
    rows: int
    n_threads: int
    n_inputs: int


@dataclass(frozen=True)
class StackedCoadd:
    """The coadd's pixel planes, assembled from all bands by :func:`stack_bands`.

    Attributes
    ----------
    image, variance : float32 array (H, W)
    mask : int32 array (H, W)
    n_image : int32 array (H, W)
    input_map : uint8 array (ceil(N/8), H, W) or None
        Bit ``k % 8`` of plane ``k // 8`` set where input ``k`` contributes.
    time_read : float
        Seconds spent reading the warps, summed over the bands.
    """

    image: Any
    variance: Any
    mask: Any
    n_image: Any
    input_map: Any
    time_read: float


@dataclass(frozen=True)
class _CoaddBand:
    """One row band of the coadd, as a band worker returns it."""

    rows: slice  # rows of the coadd box
    stack: BandStack
    input_map: Any  # packed (ceil(N/8), h, W), or None
    time_read: float


def stack_bands(
    backend: Backend,
    cfg: AssembleCoaddConfig,
    sources: Sequence[Any],
    plan: BandPlan,
    alt_masks: Sequence[Mapping[str, Any] | None] | None = None,
) -> StackedCoadd:
    """Stack every row band of ``plan.bbox`` and assemble the coadd's pixel planes.

    Parameters
    ----------
    backend : Backend
    cfg : AssembleCoaddConfig
    sources : sequence
        All inputs' warp sources (``plan.active`` indexes them).
    plan : BandPlan
    alt_masks : sequence of mapping, optional
        Per input, plane → sorted flat indices into the coadd box (see
        :func:`read_warp_band`).

    Returns
    -------
    StackedCoadd
    """
    xp = backend.xp
    H, W = plan.bbox.shape
    n_planes = (plan.n_inputs + 7) // 8
    image = xp.empty((H, W), dtype=xp.float32)
    variance = xp.empty((H, W), dtype=xp.float32)
    mask = xp.empty((H, W), dtype=xp.int32)
    n_image = xp.zeros((H, W), dtype=xp.int32)
    imap = xp.zeros((n_planes, H, W), dtype=xp.uint8) if cfg.do_input_map else None
    t_read = 0.0
    # The band workers return their bands and only this loop writes the outputs, so the
    # workers share nothing but read-only inputs.
    worker = functools.partial(_stack_one_band, backend, cfg, sources, plan, alt_masks)
    for band in stream_map(worker, range(plan.bbox.y0, plan.bbox.y1, plan.rows), plan.n_threads):
        rows, st = band.rows, band.stack
        image[rows], variance[rows], mask[rows] = st.image, st.variance, st.mask
        n_image[rows] = st.n_image
        if imap is not None:
            imap[:, rows] = band.input_map
        t_read += band.time_read
    return StackedCoadd(image, variance, mask, n_image, imap, t_read)


def _stack_one_band(
    be: Backend,
    cfg: AssembleCoaddConfig,
    sources: Sequence[Any],
    plan: BandPlan,
    alt_masks: Sequence[Mapping[str, Any] | None] | None,
    y: int,
) -> _CoaddBand:
    """Read the active warps' rows [y, y + plan.rows) and reduce them (one band worker)."""
    bbox = plan.bbox
    box = Box(bbox.x0, y, bbox.x1, min(y + plan.rows, bbox.y1))
    ta = time.perf_counter()
    bands = [
        read_warp_band(
            be, sources[i], box, bbox, plan.bits, alt_masks[i] if alt_masks is not None else None
        )
        for i in plan.active
    ]
    t = time.perf_counter() - ta
    stack = stack_band(be, cfg, plan.bits, bands, plan.weights)
    packed = None
    if cfg.do_input_map and be.is_gpu:
        packed = fused.packed_input_map(be, stack.contributing, plan.active, plan.n_inputs)
    elif cfg.do_input_map:  # packed here, in the worker: the bands' bits are independent
        packed = be.xp.zeros(((plan.n_inputs + 7) // 8,) + box.shape, dtype=be.xp.uint8)
        for j, i in enumerate(plan.active):
            packed[i // 8] |= stack.contributing[j].astype(be.xp.uint8) << np.uint8(i % 8)
    return _CoaddBand(slice(y - bbox.y0, box.y1 - bbox.y0), stack, packed, t)


def _alt_indices(be: Backend, alt: Mapping[str, Any] | None, lo: int, hi: int) -> dict:
    """The flat indices (within [lo, hi), shifted by lo) of each plane of one warp's alt
    mask, on the host (the caller's index arrays may be on the device)."""
    out = {}
    for plane, idx in (alt or {}).items():
        idx = np.asarray(be.asnumpy(idx))
        a, b = np.searchsorted(idx, [lo, hi])
        if b > a:
            out[plane] = idx[a:b] - lo
    return out


def read_warp_band(
    backend: Backend,
    source: Any,
    box: Box,
    bbox: Box,
    bits: CoaddBits,
    alt_mask: Mapping[str, Any] | None = None,
) -> WarpBand:
    """Read one warp's part of the row band ``box`` onto the coadd's mask planes.

    Parameters
    ----------
    backend : Backend
        Where the band goes.
    source : warp source
        See :mod:`gpudiff.tasks.coadd_warps`.
    box : Box
        The band: full coadd width, some rows of ``bbox``.
    bbox : Box
        The coadd box (``alt_mask`` indices are flat indices into it).
    bits : CoaddBits
    alt_mask : mapping of str to index array, optional
        Plane → sorted flat indices into ``bbox`` of pixels where that plane is set
        (LSST ``applyAltMaskPlanes``).

    Returns
    -------
    WarpBand
        NaN image, +inf variance and NO_DATA where the warp does not reach; alt masks
        applied and ``remove_mask_planes`` cleared.
    """
    xp = backend.xp
    mi = read_padded(source, box, backend)
    if mi is None:  # the warp does not reach this band
        return WarpBand(
            xp.full(box.shape, xp.nan, xp.float32),
            xp.full(box.shape, xp.inf, xp.float32),
            xp.full(box.shape, np.int32(bits.no_data), xp.int32),
        )
    lo = (box.y0 - bbox.y0) * bbox.width
    alt = _alt_indices(backend, alt_mask, lo, lo + box.height * bbox.width)
    return _conform(backend, mi, bits, alt)


def _conform(be: Backend, mi: MaskedImage, bits: CoaddBits, alt: dict) -> WarpBand:
    """``mi`` on the coadd's planes, alt masks applied and ``remove_mask_planes`` cleared."""
    m = bits.planes.conform(mi.mask, mi.mask_planes, be.xp)
    if alt:
        flat = m.reshape(-1)
        for plane, idx in alt.items():
            flat[be.asarray(idx)] |= np.int32(1 << bits.planes.add(plane))
    if bits.remove:
        m &= np.int32(~bits.remove)
    return WarpBand(mi.image, mi.variance, m)


def stack_band(
    backend: Backend,
    cfg: AssembleCoaddConfig,
    bits: CoaddBits,
    bands: Sequence[WarpBand],
    w: np.ndarray,
) -> BandStack:
    """Reduce one row band of N warps with ``cfg.statistic`` (docs/algorithms.md §10.3).

    Parameters
    ----------
    backend : Backend
    cfg : AssembleCoaddConfig
    bits : CoaddBits
    bands : sequence of WarpBand
        The N warps' pixels of the band, all of one shape.
    w : numpy.ndarray (N,)
        The inputs' weights.

    Returns
    -------
    BandStack
    """
    xp = backend.xp
    n = len(bands)
    shape = bands[0].image.shape
    and_mask = np.int32(bits.and_mask)
    w64 = w.astype(np.float64)
    online = cfg.statistic == "MEAN" and cfg.do_online_for_mean
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if backend.is_gpu:
            # the same reductions on the stacked band: launches per band independent of N
            valid, red, mask = _stack_band_fused(backend, cfg, bits, bands, w, w64, online)
        else:
            valid = xp.empty((n,) + shape, dtype=bool)
            for k, b in enumerate(bands):
                valid[k] = (
                    ((b.mask & and_mask) == 0) & xp.isfinite(b.image) & xp.isfinite(b.variance)
                )
            if online:
                red = _online_mean(backend, bands, valid, w64)
            else:
                red = _stacked_statistic(backend, cfg, bands, valid, w, w64)
            mask = _band_mask(backend, cfg, bits, bands, valid, red.used, w64)
        mean, var_out, used = red.mean, red.variance, red.used
        n_used = used.sum(axis=0)
        none = n_used == 0
        var_out = xp.where(none, xp.inf, var_out)
        mean = xp.where(none, xp.nan, mean)
        # setCoaddEdgeBits: no usable variance is no data
        mask = xp.where(none | ~(var_out > 0), mask | np.int32(bits.no_good), mask)
    return BandStack(
        image=mean.astype(xp.float32),
        variance=var_out.astype(xp.float32),
        mask=mask.astype(xp.int32),
        n_image=valid.sum(axis=0).astype(xp.int32),
        contributing=valid,
    )


def _stack_band_fused(
    be: Backend,
    cfg: AssembleCoaddConfig,
    bits: CoaddBits,
    bands: Sequence[WarpBand],
    w: np.ndarray,
    w64: np.ndarray,
    online: bool,
):
    """(valid, reduction, mask) of one band from its stacked (N, h, W) planes (a device)."""
    xp = be.xp
    images = xp.stack([b.image for b in bands])
    variances = xp.stack([b.variance for b in bands])
    masks = xp.stack([b.mask for b in bands])
    valid = fused.stacked_valid(xp, images, variances, masks, bits.and_mask)
    if online:
        mean, var = fused.stacked_online_mean(be, images, variances, valid, w64)
        red = _Reduction(mean, var, valid)
    else:
        red = _stacked_statistic(be, cfg, bands, valid, w, w64, stacked=(images, variances))
    mask = fused.stacked_band_mask(be, cfg, bits, images, masks, valid, red.used, w64)
    return valid, red, mask


def _stacked_statistic(
    be: Backend,
    cfg: AssembleCoaddConfig,
    bands: Sequence[WarpBand],
    valid,
    w: np.ndarray,
    w64: np.ndarray,
    stacked: tuple | None = None,
) -> _Reduction:
    """MEANCLIP, MEAN or MEDIAN of the N-deep stack of the band, and its variance
    (``stacked``: the band's (images, variances) already stacked, on a device)."""
    xp = be.xp
    data = xp.stack([b.image for b in bands]) if stacked is None else stacked[0]
    if cfg.statistic == "MEANCLIP":
        mean, _, _, used = clipped_stack(
            data,
            ~valid,
            w.astype(np.float32),
            cfg.sigma_clip,
            cfg.clip_iter,
            return_used=True,
            backend=be,
        )
    else:
        used = valid
        if cfg.statistic == "MEDIAN":
            mean = xp.nanmedian(xp.where(valid, data, xp.nan), axis=0).astype(xp.float32)
        else:
            wu = xp.where(used, be.asarray(w64)[:, None, None], 0.0)
            mean = ((wu * data).sum(axis=0) / wu.sum(axis=0)).astype(xp.float32)
            del wu
    if stacked is None:
        var_out = _propagated_variance(be, cfg, bands, used, w64, data, mean)
    else:
        var_out = fused.stacked_variance(be, cfg, stacked[1], used, w64, data, mean)
    return _Reduction(mean, var_out, used)


def _online_mean(be: Backend, bands: Sequence[WarpBand], valid, w64: np.ndarray) -> _Reduction:
    """LSST ``AccumulatorMeanStack``: running Σw·x, Σw²·σ², Σw, one warp at a time."""
    xp = be.xp
    shape = bands[0].image.shape
    sx, sv, sw = (xp.zeros(shape, dtype=xp.float64) for _ in range(3))
    for k, b in enumerate(bands):
        wk = xp.where(valid[k], w64[k], 0.0)
        sx += wk * xp.where(valid[k], b.image, 0)
        sv += wk * wk * xp.where(valid[k], b.variance, 0)
        sw += wk
    return _Reduction(sx / sw, sv / (sw * sw), valid)


def _propagated_variance(
    be: Backend,
    cfg: AssembleCoaddConfig,
    bands: Sequence[WarpBand],
    used,
    w64: np.ndarray,
    data,
    mean,
):
    """Σw²σ²/(Σw)² over the used inputs, or their scatter / n_used
    (calc_error_from_input_variance)."""
    xp = be.xp
    shape = bands[0].image.shape
    sw = xp.zeros(shape, dtype=xp.float64)
    acc = xp.zeros(shape, dtype=xp.float64)
    # The CPU loop (a device reduces the stacked band, coadd_fused.stacked_variance): each
    # input's terms are added only where it is used, by masked in-place ufuncs, instead of
    # adding zeros elsewhere.  The same float64 values in the same order, bit for bit: the
    # sums start at +0.0, so they are never -0.0, and adding +0.0 leaves any other value.
    tmp = xp.empty(shape, dtype=xp.float64)
    if cfg.calc_error_from_input_variance:
        for k, b in enumerate(bands):
            wk = w64[k]
            xp.add(sw, wk, out=sw, where=used[k])
            xp.multiply(b.variance, wk * wk, out=tmp, dtype=xp.float64)  # (w·w)·σ²
            xp.add(acc, tmp, out=acc, where=used[k])
        return acc / (sw * sw)
    sw2 = xp.zeros(shape, dtype=xp.float64)
    m64 = mean.astype(xp.float64)
    d = xp.empty(shape, dtype=xp.float64)
    for k in range(len(bands)):
        wk = w64[k]
        xp.add(sw, wk, out=sw, where=used[k])
        xp.add(sw2, wk * wk, out=sw2, where=used[k])
        xp.subtract(data[k], m64, out=d, dtype=xp.float64)
        xp.multiply(d, wk, out=tmp)
        tmp *= d  # (w·d)·d, as wk * d * d
        xp.add(acc, tmp, out=acc, where=used[k])
    # reliability-weighted sample variance (afw VARIANCE), divided by the number used
    var = acc / sw * (sw * sw) / (sw * sw - sw2)
    return var / used.sum(axis=0)


def _band_mask(
    be: Backend,
    cfg: AssembleCoaddConfig,
    bits: CoaddBits,
    bands: Sequence[WarpBand],
    valid,
    used,
    w64: np.ndarray,
):
    """OR of the used inputs' masks, the LSST mask map, the propagation thresholds, CLIPPED."""
    xp = be.xp
    shape = bands[0].image.shape
    out = xp.zeros(shape, dtype=xp.int32)
    # OR of the excluded inputs' masks: "excluded and carrying bit b" for any input is then
    # one test per bit after the loop (as coadd_fused.stacked_band_mask does on a device)
    ex = xp.zeros(shape, dtype=xp.int32)
    excl = xp.empty(shape, dtype=bool)
    and_mask, nd = np.int32(bits.and_mask), np.int32(bits.no_data)
    rej_w = [xp.zeros(shape, dtype=xp.float64) for _ in bits.thresholds]
    tot_w = xp.zeros(shape, dtype=xp.float64) if bits.thresholds else None
    zero = np.int32(0)
    for k, b in enumerate(bands):
        m = b.mask
        xp.bitwise_or(out, m, out=out, where=used[k])
        xp.not_equal(m & and_mask, zero, out=excl)
        xp.bitwise_or(ex, m, out=ex, where=excl)
        if bits.thresholds:
            # weights added where they count (adding 0.0 elsewhere changes no sum)
            covered = xp.isfinite(b.image) & ((m & nd) == 0)
            xp.add(tot_w, w64[k], out=tot_w, where=covered)
            for acc, (bit, _) in zip(rej_w, bits.thresholds):
                hit = excl & ((m & np.int32(bit)) != 0)
                xp.add(acc, w64[k], out=acc, where=hit)
    out |= xp.where((ex & np.int32(bits.reject_src)) != 0, np.int32(bits.rejected), zero)
    if bits.edge:
        out |= xp.where((ex & np.int32(bits.edge)) != 0, np.int32(bits.sensor_edge), zero)
    out |= xp.where((ex & np.int32(bits.clipped)) != 0, np.int32(bits.clipped), zero)
    if cfg.statistic == "MEANCLIP":  # an input dropped by the sigma clipping
        out |= xp.where((valid & ~used).any(axis=0), np.int32(bits.clipped), zero)
    for acc, (bit, t) in zip(rej_w, bits.thresholds):
        out |= xp.where(acc > t * tot_w, np.int32(bit), zero)
    return out
