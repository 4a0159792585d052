"""CompareWarpAssembleCoaddTask: a coadd free of transient artifacts (drp_tasks, docs/algorithms.md
§10.4–§10.5).

Satellite trails, cosmic rays and ghosts appear in one or a few epochs; real sources in
all of them.  The task

1. builds a **static-sky model** from the PSF-matched warps: an :class:`AssembleCoaddTask`
   with docs/algorithms.md's MEANCLIP (2.5σ, 3 passes; not a median);
2. for every PSF-matched warp (variance rescaled by :class:`ScaleVarianceTask`), detects
   footprints on warp − model at 7.5σ per pixel, both polarities, at least 4 pixels,
   grown by 0.4 × the PSF's determinant radius; drops footprints that are mostly bad
   pixels (prefilter), and counts per pixel in how many epochs it lies in a footprint;
3. keeps, per warp, the footprints where most pixels (> ``spatial_threshold``) are outliers
   in at most ``effMax = int(min(0.4·N̄, 2 + 0.03·N̄))`` epochs (N̄ the footprint's mean
   number of inputs) — transients — except those entirely inside a 300σ detection on the
   model (bright stars whose cores differ between epochs);
4. stacks the **direct** warps with a weighted MEAN, those footprints masked CLIPPED (and
   the PSF-matched warps' no-data pixels NO_DATA) in each warp, CLIPPED being a bad plane;
   then sets ``SENSOR_EDGE | INEXACT_PSF`` wherever a PSF-matched warp had ``EDGE``.

Artifact footprints are kept as sorted flat pixel indices into the coadd box (sparse), so
only the model, two count images and one warp are ever held whole.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from ..backend import Backend
from ..backend.threads import cpu_workers
from ..errors import GpudiffError, InvalidInputError
from ..image import Box, Exposure, MaskedImage
from ..ops.detection import detect_sources
from ..ops.footprints import dilate_disk as _dilate_disk
from ..ops.footprints import drop_small as _drop_small
from .compare_warp_stacked import stacked_warp_artifacts, variance_factor, warp_planes
from .artifact_filter import (
    ArtifactCandidates,
    FilteredArtifacts,
    effective_max_num_epochs,
    filter_artifacts,
)
from .assemble_coadd import (
    AssembleCoaddResult,
    AssembleCoaddTask,
    _union,
)
from .coadd_warps import as_warp, read_padded, stream_map
from .compare_warp_config import ArtifactDetectionConfig, CompareWarpAssembleCoaddConfig
from .scale_variance import ScaleVarianceConfig, ScaleVarianceTask

__all__ = [
    "ArtifactDetectionConfig",
    "ArtifactSearch",
    "CompareWarpAssembleCoaddConfig",
    "CompareWarpAssembleCoaddResult",
    "CompareWarpAssembleCoaddTask",
    "effective_max_num_epochs",
]

log = logging.getLogger("gpudiff.tasks.compare_warp")


@dataclass
class CompareWarpAssembleCoaddResult(AssembleCoaddResult):
    """:class:`AssembleCoaddResult` plus what the artifact search found.

    Attributes
    ----------
    static_sky_model : Exposure
        The MEANCLIP coadd of the PSF-matched warps (its mask planes as stacked).
    alt_mask_list : list of dict
        Per input: ``{"CLIPPED": idx, "NO_DATA": idx}``, sorted flat indices into the coadd
        box (None for a missing PSF-matched warp).
    epoch_count_image : int32 array (H, W)
        Epochs in which each pixel lay in a (prefiltered) artifact candidate.
    template_footprints : bool array (H, W) or None
        The 300σ detections on the model: candidates entirely inside one are kept (bright
        sources whose cores differ between epochs), so an artifact there is not clipped.
    """

    static_sky_model: Exposure | None = None
    alt_mask_list: list = field(default_factory=list)
    epoch_count_image: Any = None
    template_footprints: Any = None


@dataclass(frozen=True)
class ArtifactSearch:
    """What :meth:`CompareWarpAssembleCoaddTask.find_artifacts` returns.

    Attributes
    ----------
    alt_masks : list of dict or None
        Per input: ``{"CLIPPED": idx, "NO_DATA": idx}``, sorted flat indices into the coadd
        box (None for a missing PSF-matched warp).
    epoch_count_image : int32 array (H, W)
        Epochs in which each pixel lay in a (prefiltered) artifact candidate.
    edge_image : bool array (H, W)
        True where any PSF-matched warp had ``EDGE``.
    template_footprints : bool array (H, W) or None
        The 300σ detections on the model (``do_preserve_contained_by_source``).
    stats : dict
        ``n_artifact_candidates``, ``n_prefiltered``, ``n_clipped_footprints``,
        ``n_protected_footprints``.
    """

    alt_masks: list
    epoch_count_image: Any
    edge_image: Any
    template_footprints: Any
    stats: dict


@dataclass(frozen=True)
class _Footprints:
    """Labelled footprints of one warp − model difference (``labels`` 0 is background)."""

    labels: Any
    count: int


@dataclass(frozen=True)
class _WarpArtifacts:
    """What the per-warp worker of :meth:`CompareWarpAssembleCoaddTask.find_artifacts`
    returns: its candidates and its share of the shared count images."""

    candidates: ArtifactCandidates
    counted: Any  # int32 (H, W): 1 where the warp has data that is not bad
    edge: Any  # bool (H, W) of its EDGE plane, or None without one
    footprints: Any  # bool (H, W) of its kept candidates, or None without any
    n_candidates: int
    n_prefiltered: int


def _drop_small_sparse(lab: np.ndarray, n: int, min_pixels: int, into: np.ndarray | None):
    """:func:`~gpudiff.ops.footprints.drop_small` on the CPU, from the labelled pixels only.

    A warp − model difference has footprints on a small part of the warp: the pixel count
    per label and the kept pixels come from the flat indices of the labelled pixels, not
    from a bincount and a gather over the whole image.  The kept pixels are set in
    ``into`` (a bool (H, W) mask, modified) or in a new mask; returns (mask, kept count),
    the same pixels as ``drop_small``.
    """
    flat = lab.ravel()
    on = np.flatnonzero(flat)
    labels = flat[on]
    keep = np.bincount(labels, minlength=n + 1) >= min_pixels
    keep[0] = False
    n_kept = int(keep.sum())
    out = np.zeros(lab.shape, dtype=bool) if into is None else into
    if n_kept:
        out.ravel()[on[keep[labels]]] = True
    return out, n_kept


class CompareWarpAssembleCoaddTask:
    """Coadd direct warps, masking what appears in only a few PSF-matched epochs (docs/algorithms.md
    §10.5).

    Parameters
    ----------
    config : CompareWarpAssembleCoaddConfig, optional
    backend : Backend or str, optional

    Examples
    --------
    >>> task = CompareWarpAssembleCoaddTask()                                  # doctest: +SKIP
    >>> res = task.run(direct_warps, psf_matched_warps)                        # doctest: +SKIP
    >>> res.coadd_exposure, res.metadata["n_clipped_footprints"]               # doctest: +SKIP
    """

    def __init__(
        self,
        config: CompareWarpAssembleCoaddConfig | None = None,
        backend: Backend | str | None = None,
    ):
        self.config = CompareWarpAssembleCoaddConfig() if config is None else config
        if not isinstance(self.config, CompareWarpAssembleCoaddConfig):
            raise InvalidInputError(
                f"config must be a CompareWarpAssembleCoaddConfig, got {type(self.config).__name__}"
            )
        self.assemble = AssembleCoaddTask(self.config.final_config(), backend=backend)
        self.backend = self.assemble.backend

    def run(
        self,
        direct_warps: Sequence[Any],
        psf_matched_warps: Sequence[Any],
        *,
        bbox: Box | None = None,
    ) -> CompareWarpAssembleCoaddResult:
        """Coadd ``direct_warps`` with artifacts found by comparing ``psf_matched_warps``.

        Parameters
        ----------
        direct_warps, psf_matched_warps : sequence
            Warp sources (paths, Exposures, MaskedImages, loaders), in the same order; a
            None PSF-matched entry is a missing warp (no artifacts, all NO_DATA).
        bbox : Box, optional
            The coadd box; default the union of the direct warps' boxes.

        Raises
        ------
        InvalidInputError
            The lists differ in length or hold malformed inputs.
        NoWorkFound
            No usable direct or PSF-matched warp.
        """
        t0 = time.perf_counter()
        if len(direct_warps) != len(psf_matched_warps):
            raise InvalidInputError(
                f"{len(direct_warps)} direct warps but {len(psf_matched_warps)} "
                "PSF-matched warps; give one PSF-matched warp per direct warp (None if missing)"
            )
        direct = [
            None if w is None else as_warp(w, name=f"direct warp {i}")
            for i, w in enumerate(direct_warps)
        ]
        matched = [
            None if w is None else as_warp(w, name=f"PSF-matched warp {i}")
            for i, w in enumerate(psf_matched_warps)
        ]
        if bbox is None:
            boxes = [s.bbox for s in direct if s is not None]
            if not boxes:
                raise InvalidInputError("CompareWarpAssembleCoaddTask: every direct warp is None")
            bbox = _union(boxes)
        static_cfg = replace(
            self.config.assemble_static_sky_model, do_n_image=False, do_input_map=False
        )
        static = AssembleCoaddTask(static_cfg, backend=self.backend).run(matched, bbox=bbox)
        t1 = time.perf_counter()
        found = self.find_artifacts(static.coadd_exposure, matched)
        t2 = time.perf_counter()
        res = self.assemble.run(
            direct, bbox=bbox, alt_masks=found.alt_masks, extra_bad_planes=("CLIPPED",)
        )
        exp = res.coadd_exposure
        planes = exp.mask_planes
        # applyAltEdgeMask: a PSF-matched warp's chip edge makes the coadd PSF inexact there
        flag = np.int32(planes.bitmask(["SENSOR_EDGE", "INEXACT_PSF"]))
        exp.masked_image.mask = exp.mask | self.backend.xp.where(
            found.edge_image, flag, np.int32(0)
        )
        meta = dict(
            res.metadata,
            **found.stats,
            time_static_sky_model=t1 - t0,
            time_find_artifacts=t2 - t1,
            time_final_stack=time.perf_counter() - t2,
            time_total=time.perf_counter() - t0,
        )
        return CompareWarpAssembleCoaddResult(
            coadd_exposure=exp,
            n_image=res.n_image,
            input_map=res.input_map,
            weights=res.weights,
            input_names=res.input_names,
            skipped={**res.skipped, **{f"psf-matched {k}": v for k, v in static.skipped.items()}},
            metadata=meta,
            static_sky_model=static.coadd_exposure,
            alt_mask_list=found.alt_masks,
            epoch_count_image=found.epoch_count_image,
            template_footprints=found.template_footprints,
        )

    # --- findArtifacts ---------------------------------------------------------------------
    def _template_footprints(self, model: Exposure) -> Any:
        """Bool (H, W): pixels of 300σ detections on the model (bright-source protection)."""
        xp, cfg = self.backend.xp, self.config.detect_template
        mi = model.masked_image
        clean = MaskedImage(
            mi.image, mi.variance, None, xy0=mi.xy0, backend=self.backend
        )  # planes cleared
        psf = model.psf
        grow = int(cfg.n_sigma_to_grow * psf.determinant_radius() + 0.5) if psf is not None else 0
        try:
            det = detect_sources(
                clean,
                psf,
                threshold=cfg.threshold_value,
                polarity="positive",
                smooth=psf is not None,
                background="estimate",
                footprint_grow=grow,
                min_pixels=cfg.min_pixels,
                backend=self.backend,
            )
        except GpudiffError as exc:  # e.g. a model without enough sky for a background
            log.warning(
                "CompareWarp: template detection failed (%s); no bright-source protection", exc
            )
            return xp.zeros(mi.shape, dtype=bool)
        return (det.mask & np.int32(det.mask_planes.bitmask("DETECTED"))) != 0

    def _detect(self, snr, psf) -> _Footprints:
        """Labels (H, W) of the merged ±threshold footprints of a warp − model difference
        (``snr``: :attr:`~gpudiff.tasks.compare_warp_stacked.WarpPlanes.snr`)."""
        be, cfg = self.backend, self.config.detect
        grow = int(cfg.n_sigma_to_grow * psf.determinant_radius() + 0.5) if psf is not None else 0
        eight = be.asarray(np.ones((3, 3), dtype=bool))
        on = None
        for sign in (1, -1) if cfg.polarity == "both" else (1,):
            # footprints of each polarity, those with fewer than min_pixels dropped (before
            # growing, per polarity, as SourceDetectionTask does)
            lab, n = be.ndimage.label(
                snr >= cfg.threshold_value if sign > 0 else snr <= -cfg.threshold_value,
                structure=eight,
            )
            if not int(n):
                continue
            if be.is_gpu:
                kept, n_kept = _drop_small(be, lab, int(n), int(cfg.min_pixels))
                if n_kept:
                    on = kept if on is None else on | kept
            else:  # the kept pixels are set in ``on`` when there is one
                kept, n_kept = _drop_small_sparse(lab, int(n), int(cfg.min_pixels), on)
                if n_kept:
                    on = kept
        if on is None:
            return _Footprints(None, 0)
        # Growing distributes over the union, so one dilation and one labelling serve both
        # polarities; positive and negative footprints that overlap or touch merge into one.
        if grow > 0:
            on = _dilate_disk(be, on, grow)
        labels, n = be.ndimage.label(on, structure=eight)
        return _Footprints(labels, int(n))

    def find_artifacts(self, model: Exposure, matched: Sequence[Any]) -> ArtifactSearch:
        """Find the transient artifacts of the PSF-matched warps (docs/algorithms.md §10.5).

        Parameters
        ----------
        model : Exposure
            The static-sky model on the coadd box.
        matched : sequence
            PSF-matched warp sources (None for a missing warp).

        Returns
        -------
        ArtifactSearch
        """
        be, cfg = self.backend, self.config
        xp = be.xp
        H, W = model.bbox.shape
        template_fp = (
            self._template_footprints(model) if cfg.do_preserve_contained_by_source else None
        )
        epoch = xp.zeros((H, W), dtype=xp.int32)
        n_image = xp.zeros((H, W), dtype=xp.int32)
        edge_any = xp.zeros((H, W), dtype=bool)
        # 2^20 regularly spaced samples per warp: the factor to ~0.1 % (it only sets the
        # 7.5σ threshold) at a fraction of the cost of every pixel of a 4096² warp
        scaler = (
            ScaleVarianceTask(ScaleVarianceConfig(max_samples=1 << 20), backend=be)
            if cfg.do_scale_warp_variance
            else None
        )
        records: list = []
        n_cand = n_prefiltered = 0
        stacked = stacked_warp_artifacts(self, model, scaler, matched) if be.is_gpu else None
        if stacked is not None:  # a device: all warps in one pass, a few syncs in all
            records, n_cand, n_prefiltered = (
                stacked.records,
                stacked.n_candidates,
                stacked.n_prefiltered,
            )
            epoch, n_image, edge_any = stacked.epoch, stacked.n_image, stacked.edge_any
        else:
            # On the CPU one thread per core works on its own warp (NumPy releases the GIL in
            # its loops) and returns its counts; only this loop adds them up, and the integer
            # accumulators make the result independent of the order.
            worker = functools.partial(self._warp_artifacts, model, scaler)
            workers = cpu_workers(len(matched), 4, parallel=not be.is_gpu)
            for found in stream_map(worker, matched, workers):
                if found is None:  # a missing warp, or one that does not reach the coadd box
                    records.append(None)
                    continue
                n_image += found.counted
                if found.edge is not None:
                    edge_any |= found.edge
                if found.footprints is not None:
                    epoch += found.footprints.astype(xp.int32)
                n_cand += found.n_candidates
                n_prefiltered += found.n_prefiltered
                records.append(found.candidates)
        filtered = self._filter(records, epoch, n_image, template_fp)
        stats = dict(
            n_artifact_candidates=n_cand,
            n_prefiltered=n_prefiltered,
            n_clipped_footprints=filtered.n_clipped,
            n_protected_footprints=filtered.n_protected,
        )
        log.info(
            "CompareWarp: %d candidate footprints, %d prefiltered, %d clipped, %d kept as bright "
            "sources",
            n_cand,
            n_prefiltered,
            filtered.n_clipped,
            filtered.n_protected,
        )
        return ArtifactSearch(filtered.alt_masks, epoch, edge_any, template_fp, stats)

    def _warp_artifacts(
        self, model: Exposure, scaler: ScaleVarianceTask | None, src: Any
    ) -> _WarpArtifacts | None:
        """Pass 1 for one PSF-matched warp: footprints of warp − model, prefiltered (one
        worker of :meth:`find_artifacts`); None for a warp without pixels in the box."""
        be, cfg = self.backend, self.config
        xp = be.xp
        mi = read_padded(src, model.bbox, be) if src is not None else None
        if mi is None:
            return None
        wp = warp_planes(self, model, mi, variance_factor(scaler, mi), src.name)
        counted = wp.counted.astype(xp.int32)
        nodata_idx = be.asnumpy(xp.flatnonzero(wp.nodata))
        det = self._detect(wp.snr, src.psf if src.psf is not None else model.psf)
        n = det.count
        if not n:
            empty = np.zeros(0, np.int64)
            return _WarpArtifacts(
                ArtifactCandidates(empty, empty, nodata_idx), counted, wp.edge, None, 0, 0
            )
        # Footprints cover a small part of the warp: the prefilter and the kept pixels are
        # found among the labelled pixels only (their flat indices, in order), not by
        # passes over the whole image.
        flat = det.labels.ravel()
        on = xp.flatnonzero(flat)
        lab = flat[on]
        n_pre = 0
        keep = xp.ones(n + 1, dtype=bool)
        keep[0] = False
        if wp.prebad is not None:
            area = be.bincount(lab, n + 1)
            good = be.bincount(lab[~wp.prebad.ravel()[on]], n + 1)
            keep &= good > cfg.prefilter_artifacts_ratio * xp.maximum(area, 1)
            n_pre = int(n - int(keep.sum()))
        kept = keep[lab]
        idx, lab = on[kept], lab[kept]
        fp = xp.zeros(det.labels.shape, dtype=bool)
        fp.ravel()[idx] = True
        cands = ArtifactCandidates(be.asnumpy(idx), be.asnumpy(lab).astype(np.int64), nodata_idx)
        return _WarpArtifacts(cands, counted, wp.edge, fp, n, n_pre)

    def _filter(self, records: list, epoch, n_image, template_fp) -> FilteredArtifacts:
        """Pass 2 (``filterArtifacts``, :func:`~gpudiff.tasks.artifact_filter.filter_artifacts`)
        on the host copies of the count images."""
        be = self.backend
        return filter_artifacts(
            records,
            be.asnumpy(epoch).ravel(),
            be.asnumpy(n_image).ravel(),
            None if template_fp is None else be.asnumpy(template_fp).ravel(),
            self.config,
        )
