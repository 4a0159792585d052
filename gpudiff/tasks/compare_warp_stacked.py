"""CompareWarp's pass 1 for all PSF-matched warps at once, on a device (docs/algorithms.md
§10.5 steps 2–3).

The per-warp pass (:meth:`~gpudiff.tasks.compare_warp.CompareWarpAssembleCoaddTask._warp_artifacts`)
labels each warp − model difference twice (per polarity) and its grown union once, counts
the footprints and fetches its candidates: ~10 host syncs per warp, 200 of the 400 syncs of
a 20-warp CompareWarp coadd (``bench/bench_device_counts.py``).  Here the N warps' planes
are laid one under the other in one tall image, separated by empty rows at least as many
as the growing radius, so that one labelling, one size cut, one dilation and one
labelling serve every warp and polarity; a footprint cannot cross the empty rows (they
are background for the 8-connected labelling and wider than the disk).  The candidates of
all warps cross to the host in one transfer and are split there by warp.  The warps'
variance factors come from one batched ScaleVariance
(:func:`~gpudiff.tasks.scale_variance_many.run_many`: two host syncs per batch, not two
per warp), and both passes prepare a warp with the one :func:`warp_planes`.

The footprints are the per-warp pass's exactly (labelling, the ``min_pixels`` cut and the
disk dilation act on each plane alone); labels are numbered across the whole stack, which
:func:`~gpudiff.tasks.artifact_filter.filter_artifacts` does not mind (it groups a warp's
pixels by label).  ``tests/test_device_discipline.py`` compares the CompareWarp coadd on
the strict fake device with the NumPy one, and ``tests/test_coadd_fused.py`` the candidates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import GpudiffError
from ..ops.footprints import dilate_disk
from .artifact_filter import ArtifactCandidates
from .coadd_warps import read_padded
from .scale_variance_many import run_many

__all__ = [
    "StackedArtifacts",
    "WarpPlanes",
    "stacked_warp_artifacts",
    "variance_factor",
    "warp_planes",
]

log = logging.getLogger("gpudiff.tasks.compare_warp")


@dataclass(frozen=True)
class StackedArtifacts:
    """Pass 1 over all warps: per-warp candidate records (None for a missing warp) and the
    summed count images, as :meth:`find_artifacts`'s loop accumulates them."""

    records: list
    epoch: Any
    n_image: Any
    edge_any: Any
    n_candidates: int
    n_prefiltered: int


@dataclass(frozen=True)
class WarpPlanes:
    """One PSF-matched warp against the static-sky model (docs/algorithms.md §10.5 step 2):
    what both the per-warp and the stacked pass 1 detect and count from.

    Attributes
    ----------
    snr : float32 array (H, W)
        (warp − model) / √(rescaled warp variance + model variance); 0 where that is not
        finite or the variance is not positive.
    nodata : bool array (H, W)
        warp − model is not finite.
    counted : bool array (H, W)
        The warp has data there, without any of ``bad_mask_planes``.
    edge : bool array (H, W) or None
        The warp's ``EDGE`` plane (None: the warp has no such plane).
    prebad : bool array (H, W) or None
        Pixels with any of ``prefilter_artifacts_mask_planes`` (None: no prefilter).
    """

    snr: Any
    nodata: Any
    counted: Any
    edge: Any
    prebad: Any


def variance_factor(scaler, mi) -> float | GpudiffError | None:
    """``scaler.run(mi)``, its error if it fails, or None without a scaler (the per-warp
    counterpart of :func:`~gpudiff.tasks.scale_variance_many.run_many`).

    Parameters
    ----------
    scaler : ScaleVarianceTask or None
    mi : MaskedImage
        The warp.

    Returns
    -------
    float, GpudiffError or None
    """
    if scaler is None:
        return None
    try:
        return scaler.run(mi)
    except GpudiffError as exc:
        return exc


def warp_planes(task, model, mi, factor: float | GpudiffError | None, name: str) -> WarpPlanes:
    """The :class:`WarpPlanes` of warp ``mi`` (on the model's box) with its variance
    multiplied by ``factor`` (:func:`variance_factor`; an error is logged and the variance
    kept, as LSST's CompareWarp does when ScaleVariance fails).

    Parameters
    ----------
    task : CompareWarpAssembleCoaddTask
        Its config (bad, prefilter planes) and backend.
    model : MaskedImage
        The static model, on the warp's box.
    mi : MaskedImage
        The warp.
    factor : float, GpudiffError or None
        From :func:`variance_factor` or :func:`~gpudiff.tasks.scale_variance_many.run_many`.
    name : str
        The warp's name in log messages.

    Returns
    -------
    WarpPlanes
    """
    cfg = task.config
    xp = task.backend.xp
    # In-place steps on the few whole-warp temporaries (a 4096² warp is 64 MB a plane):
    # the same float32 operations, in the same order, as the expressions in the comments.
    if isinstance(factor, GpudiffError):
        log.warning("CompareWarp: ScaleVariance of %s failed (%s); variance kept", name, factor)
    var = mi.variance
    if factor is not None and not isinstance(factor, GpudiffError):
        var = var * np.float32(factor)
    diff_var = var + model.variance
    del var
    planes = mi.mask_planes
    mask = mi.mask
    diff_img = mi.image - model.image
    finite = xp.isfinite(diff_img)
    bad = np.int32(planes.bitmask_if_present(list(cfg.bad_mask_planes)))
    counted = (mask & bad) == 0
    counted &= finite
    edge_bit = planes.bitmask_if_present("EDGE")
    edge = (mask & np.int32(edge_bit)) != 0 if edge_bit else None
    prebad = None
    if cfg.do_prefilter_artifacts:
        pre = np.int32(planes.bitmask_if_present(list(cfg.prefilter_artifacts_mask_planes)))
        prebad = (mask & pre) != 0
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = xp.isfinite(diff_var)  # finite(diff_img) & finite(diff_var) & (diff_var > 0)
        ok &= finite
        ok &= diff_var > 0
        # snr = where(ok, diff_img / sqrt(where(ok, diff_var, 1)), 0)
        sigma = xp.where(ok, diff_var, np.float32(1.0))
        del diff_var
        xp.sqrt(sigma, out=sigma)
        xp.divide(diff_img, sigma, out=sigma)
        snr = xp.where(ok, sigma, np.float32(0.0))
    return WarpPlanes(snr, ~finite, counted, edge, prebad)


def _grow_of(cfg, psf) -> int:
    return int(cfg.n_sigma_to_grow * psf.determinant_radius() + 0.5) if psf is not None else 0


#: Pixels of warp planes stacked at once (2²⁸: 16 warps of 4096², ~6 GB of temporaries in
#: the labelling); more warps are taken in several such batches.
MAX_STACK_PIXELS = 1 << 28


def stacked_warp_artifacts(task, model, scaler, matched: Sequence[Any]) -> StackedArtifacts | None:
    """Pass 1 of :meth:`CompareWarpAssembleCoaddTask.find_artifacts` on the stacked warps.

    Returns None (the caller then walks the warps one by one) when the warps would be
    grown by different radii (PSF-matched warps share one PSF, so they normally agree).
    """
    xp = task.backend.xp
    H, W = model.bbox.shape
    given = [(j, src) for j, src in enumerate(matched) if src is not None]
    grows = {
        _grow_of(task.config.detect, src.psf if src.psf is not None else model.psf)
        for _, src in given
    }
    if len(grows) > 1:
        return None
    grow = next(iter(grows), 0)
    out = StackedArtifacts(
        [None] * len(matched),
        xp.zeros((H, W), dtype=xp.int32),
        xp.zeros((H, W), dtype=xp.int32),
        xp.zeros((H, W), dtype=bool),
        0,
        0,
    )
    per_batch = max(1, MAX_STACK_PIXELS // (H * W))
    n_cand = n_pre = 0
    for b0 in range(0, len(given), per_batch):
        present = []
        for j, src in given[b0 : b0 + per_batch]:
            mi = read_padded(src, model.bbox, task.backend)
            if mi is not None:  # None: the warp does not reach the coadd box
                present.append((j, src, mi))
        if present:
            c, p = _batch(task, model, scaler, present, grow, out)
            n_cand, n_pre = n_cand + c, n_pre + p
    return StackedArtifacts(out.records, out.epoch, out.n_image, out.edge_any, n_cand, n_pre)


def _batch(task, model, scaler, present: list, grow: int, out: StackedArtifacts):
    """One batch of warps through the tall layout; records and count images go into
    ``out``.  Returns (candidate footprints, prefiltered footprints)."""
    be, cfg = task.backend, task.config
    xp = be.xp
    det_cfg = cfg.detect
    H, W = model.bbox.shape
    epoch, n_image, edge_any = out.epoch, out.n_image, out.edge_any  # added to in place
    gap = max(grow, 1)
    n = len(present)
    snr = xp.zeros((n, H + gap, W), dtype=xp.float32)  # the tall layout, empty rows below
    prebad = xp.zeros((n, H + gap, W), dtype=bool)
    nodata = xp.empty((n, H, W), dtype=bool)
    # every warp's variance factor at once: two host syncs per batch, not two per warp
    factors = run_many(scaler, [mi for _, _, mi in present]) if scaler is not None else None
    for k, (_, src, mi) in enumerate(present):
        wp = warp_planes(task, model, mi, None if factors is None else factors[k], src.name)
        snr[k, :H] = wp.snr
        nodata[k] = wp.nodata
        n_image += wp.counted.astype(xp.int32)
        if wp.edge is not None:
            edge_any |= wp.edge
        if wp.prebad is not None:
            prebad[k, :H] = wp.prebad
    eight = be.asarray(np.ones((3, 3), dtype=bool))
    tall = (n * (H + gap), W)
    t = float(det_cfg.threshold_value)
    both = det_cfg.polarity == "both"
    # per polarity, footprints with fewer than min_pixels dropped before growing
    above = xp.concatenate([snr >= t, snr <= -t]) if both else snr >= t
    lab, nlab = be.ndimage.label(above.reshape(-1, W), structure=eight)
    keep = be.bincount(lab.ravel(), int(nlab) + 1) >= int(det_cfg.min_pixels)
    keep[0] = False
    on = keep[lab].reshape(above.shape)
    on = on[:n] | on[n:] if both else on
    if grow > 0:
        on = dilate_disk(be, on.reshape(tall), grow).reshape(on.shape)
        # what grew into the empty rows is outside the warp (the per-warp dilation drops
        # it at the image edge); cleared, it cannot join footprints along the edge
        on[:, H:] = False
    labels, nfp = be.ndimage.label(on.reshape(tall), structure=eight)
    nfp = int(nfp)
    labels = labels.reshape(n, H + gap, W)
    keep = xp.ones(nfp + 1, dtype=bool)
    keep[0] = False
    if cfg.do_prefilter_artifacts:
        flat = labels.ravel()
        area = be.bincount(flat, nfp + 1)
        good = be.bincount(flat, nfp + 1, weights=(~prebad).ravel())
        keep &= good > cfg.prefilter_artifacts_ratio * xp.maximum(area, 1)
    fp = keep[labels[:, :H]]
    epoch += fp.sum(axis=0, dtype=xp.int32)
    idx = xp.flatnonzero(fp)
    nd = xp.flatnonzero(nodata)
    host = be.asnumpy(xp.concatenate([idx, labels[:, :H].ravel()[idx], nd, keep.sum()[None]]))
    m = idx.size
    idx_h, lab_h, nd_h, n_kept = host[:m], host[m : 2 * m], host[2 * m : -1], int(host[-1])
    npix = H * W
    cut = np.searchsorted(idx_h, np.arange(n + 1) * npix)
    cut_nd = np.searchsorted(nd_h, np.arange(n + 1) * npix)
    for k, (j, _, _) in enumerate(present):
        a, b = cut[k], cut[k + 1]
        out.records[j] = ArtifactCandidates(
            idx_h[a:b] - k * npix,
            lab_h[a:b].astype(np.int64),
            nd_h[cut_nd[k] : cut_nd[k + 1]] - k * npix,
        )
    return nfp, nfp - n_kept
