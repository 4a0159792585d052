"""Pass 2 of CompareWarp's artifact search, ``filterArtifacts`` (docs/algorithms.md §10.5
step 4).

Pass 1 (:meth:`~gpudiff.tasks.compare_warp.CompareWarpAssembleCoaddTask.find_artifacts`)
leaves, per PSF-matched warp, its candidate footprints as sorted flat pixel indices into the
coadd box (:class:`ArtifactCandidates`) and, over all warps, two count images: in how many
epochs each pixel lay in a candidate, and how many epochs had data there.  This pass keeps
the candidates that are transient (outliers in few of the epochs covering them) and not
inside a bright source of the model.  It works on the host, footprint by footprint through
``bincount`` over the candidates' pixels, never on whole images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # only for annotations: compare_warp imports this module
    from .compare_warp import CompareWarpAssembleCoaddConfig

__all__ = [
    "ArtifactCandidates",
    "FilteredArtifacts",
    "effective_max_num_epochs",
    "filter_artifacts",
]


@dataclass(frozen=True)
class ArtifactCandidates:
    """One warp's artifact candidates, sparse.

    Attributes
    ----------
    indices : int64 array
        Sorted flat indices into the coadd box of the pixels in a candidate footprint.
    labels : int64 array
        The footprint label of each of those pixels.
    no_data : int64 array
        Flat indices of the pixels where the warp − model difference is not finite.
    """

    indices: np.ndarray
    labels: np.ndarray
    no_data: np.ndarray


@dataclass(frozen=True)
class FilteredArtifacts:
    """What :func:`filter_artifacts` returns.

    Attributes
    ----------
    alt_masks : list of dict or None
        Per warp: ``{"CLIPPED": idx, "NO_DATA": idx}`` (sorted flat indices), None for a
        warp without candidates record.
    n_clipped : int
        Footprints found to be artifacts.
    n_protected : int
        Artifact footprints kept because they lie entirely inside a template footprint.
    """

    alt_masks: list
    n_clipped: int
    n_protected: int


def effective_max_num_epochs(mean_n: Any, cfg: CompareWarpAssembleCoaddConfig) -> Any:
    """``int(min(low·N̄, maxNumEpochs + high·N̄))`` (docs/algorithms.md §10.5 step 4.3),
    elementwise."""
    a = np.minimum(
        cfg.max_fraction_epochs_low * np.asarray(mean_n, dtype=np.float64),
        cfg.max_num_epochs + cfg.max_fraction_epochs_high * np.asarray(mean_n, dtype=np.float64),
    )
    return np.floor(a).astype(np.int64)  # int() truncation; a >= 0


def filter_artifacts(
    records: Sequence[ArtifactCandidates | None],
    epoch_count: np.ndarray,
    n_image: np.ndarray,
    template_footprints: np.ndarray | None,
    cfg: CompareWarpAssembleCoaddConfig,
) -> FilteredArtifacts:
    """The temporal/spatial test and the bright-source protection (``filterArtifacts``).

    Parameters
    ----------
    records : sequence of ArtifactCandidates or None
        Per warp (None: a missing warp).
    epoch_count, n_image : int arrays, flattened (H·W,), on the host
        Epochs in which each pixel lay in a candidate; epochs with usable data there.
    template_footprints : bool array (H·W,) or None
        Pixels of the model's bright-source detections.
    cfg : CompareWarpAssembleCoaddConfig
        ``max_num_epochs``, ``max_fraction_epochs_low/high``, ``spatial_threshold``.

    Returns
    -------
    FilteredArtifacts
    """
    alt_masks: list = []
    n_clipped = n_protected = 0
    for rec in records:
        if rec is None:
            alt_masks.append(None)
            continue
        idx, lab = rec.indices, rec.labels
        clipped = np.zeros(0, np.int64)
        if idx.size:
            _, inv = np.unique(lab, return_inverse=True)
            npix = np.bincount(inv).astype(np.float64)
            outlier_n, total_n = epoch_count[idx], n_image[idx]
            eff_max = effective_max_num_epochs(np.bincount(inv, weights=total_n) / npix, cfg)
            below = (outlier_n > 0) & (outlier_n <= eff_max[inv])
            frac = np.bincount(inv, weights=below.astype(np.float64)) / npix
            is_artifact = frac > cfg.spatial_threshold
            if template_footprints is not None:
                outside = np.bincount(inv, weights=(~template_footprints[idx]).astype(np.float64))
                contained = is_artifact & (outside == 0)
                n_protected += int(contained.sum())
                is_artifact &= ~contained
            n_clipped += int(is_artifact.sum())
            clipped = np.sort(idx[is_artifact[inv]])
        alt_masks.append({"CLIPPED": clipped, "NO_DATA": rec.no_data})
    return FilteredArtifacts(alt_masks, n_clipped, n_protected)
