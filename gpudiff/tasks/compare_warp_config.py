"""CompareWarp's configuration: ``ArtifactDetectionConfig`` and
``CompareWarpAssembleCoaddConfig`` (docs/algorithms.md §10.4).

Kept apart from the task (:mod:`gpudiff.tasks.compare_warp`), which re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


from ..configfield import option, validate_config
from .assemble_coadd import (
    STATISTICS,
    AssembleCoaddConfig,
)


__all__ = ["ArtifactDetectionConfig", "CompareWarpAssembleCoaddConfig"]


@dataclass(frozen=True)
class ArtifactDetectionConfig:
    """The detection subtasks (LSST ``SourceDetectionConfig`` fields that CompareWarp sets).

    Attributes
    ----------
    threshold_value : float
        Per-pixel threshold in units of √variance (``thresholdType = pixel_stdev``).
    min_pixels : int
        Footprints with fewer pixels (before growing) are dropped.
    n_sigma_to_grow : float
        Footprints are grown isotropically by int(n_sigma_to_grow · σ_PSF + 0.5) pixels.
    polarity : {"both", "positive"}
    """

    threshold_value: float = option(
        7.5,
        doc="Detection threshold per pixel, in units of sqrt(variance) (pixel_stdev).",
        min=0,
        inclusive_min=False,
        finite=True,
    )
    min_pixels: int = option(
        4, doc="Footprints with fewer pixels (before growing) are dropped.", min=1
    )
    n_sigma_to_grow: float = option(
        0.4,
        doc="Footprints are grown by int(n_sigma_to_grow * PSF sigma + 0.5) pixels.",
        min=0,
    )
    polarity: str = option(
        "both",
        doc="Detect positive footprints only, or positive and negative ones.",
        choices=("both", "positive"),
        lsst="thresholdPolarity",
    )

    def __post_init__(self):
        validate_config(self)


def _static_sky_config() -> AssembleCoaddConfig:
    # docs/algorithms.md §10.4: MEANCLIP (not a median), 2.5 sigma, 3 passes, only NO_DATA bad
    return AssembleCoaddConfig(
        warp_type="psfMatched",
        statistic="MEANCLIP",
        sigma_clip=2.5,
        clip_iter=3,
        bad_mask_planes=("NO_DATA",),
        calc_error_from_input_variance=True,
    )


@dataclass(frozen=True)
class CompareWarpAssembleCoaddConfig(AssembleCoaddConfig):
    """Configuration of :class:`CompareWarpAssembleCoaddTask` (docs/algorithms.md §10.4).

    The inherited :class:`AssembleCoaddConfig` fields configure the **final** stack of the
    direct warps, with CompareWarp's defaults: MEAN, bad planes (NO_DATA, BAD, SAT), EDGE
    removed before stacking.

    Attributes
    ----------
    assemble_static_sky_model : AssembleCoaddConfig
        The static-sky model: MEANCLIP 2.5σ × 3 passes of the PSF-matched warps, bad
        plane NO_DATA.
    detect : ArtifactDetectionConfig
        7.5σ, both polarities, min 4 pixels, grown by 0.4σ_PSF.
    detect_template : ArtifactDetectionConfig
        300σ positive detection on the model for ``do_preserve_contained_by_source``,
        grown by 2.4σ_PSF (after a binned local background is subtracted).
    max_num_epochs, max_fraction_epochs_low, max_fraction_epochs_high : int, float, float
        effMax = int(min(max_fraction_epochs_low·N̄, max_num_epochs + max_fraction_epochs_high·N̄)).
    spatial_threshold : float
        A footprint is an artifact when more than this fraction of its pixels are outliers
        in 1..effMax epochs.
    do_scale_warp_variance : bool
        Rescale each PSF-matched warp's variance (:class:`ScaleVarianceTask`) before
        differencing; failures are logged and ignored (as LSST).
    do_preserve_contained_by_source : bool
        Keep footprints entirely inside a model detection.
    do_prefilter_artifacts, prefilter_artifacts_mask_planes, prefilter_artifacts_ratio
        Drop a footprint whose fraction of pixels free of these planes is ≤ the ratio.
    """

    statistic: str = option(
        "MEAN",
        doc="Per-pixel statistic of the final stack of the direct warps.",
        choices=STATISTICS,
        fold_case=True,
    )
    bad_mask_planes: tuple[str, ...] = option(
        ("NO_DATA", "BAD", "SAT"),
        doc="An input pixel with any of these planes is left out of the final stack.",
    )
    remove_mask_planes: tuple[str, ...] = option(
        ("NOT_DEBLENDED", "EDGE"),
        doc="Planes cleared from every direct warp before the final stack.",
    )
    assemble_static_sky_model: AssembleCoaddConfig = option(
        doc="The static-sky model stack of the PSF-matched warps (MEANCLIP 2.5 sigma x 3).",
        default_factory=_static_sky_config,
    )
    detect: ArtifactDetectionConfig = option(
        doc="Detection of artifact candidates on each PSF-matched warp minus the model.",
        default_factory=ArtifactDetectionConfig,
    )
    detect_template: ArtifactDetectionConfig = option(
        doc="300-sigma positive detection on the model: footprints inside one are kept "
        "(do_preserve_contained_by_source).",
        default_factory=lambda: ArtifactDetectionConfig(
            threshold_value=300.0, n_sigma_to_grow=2.4, polarity="positive"
        ),
    )
    max_num_epochs: int = option(
        2,
        doc="effMax = int(min(max_fraction_epochs_low*N, max_num_epochs + "
        "max_fraction_epochs_high*N)): the most epochs an artifact may appear in.",
    )
    max_fraction_epochs_low: float = option(
        0.4, doc="Fraction of the N inputs in the first term of effMax (see max_num_epochs)."
    )
    max_fraction_epochs_high: float = option(
        0.03, doc="Fraction of the N inputs added to max_num_epochs in effMax."
    )
    spatial_threshold: float = option(
        0.5,
        doc="A footprint is an artifact when more than this fraction of its pixels are "
        "outliers in 1..effMax epochs.",
        min=0,
        max=1,
    )
    do_scale_warp_variance: bool = option(
        True,
        doc="Rescale each PSF-matched warp's variance (ScaleVarianceTask) before "
        "differencing; failures are logged and ignored.",
    )
    do_preserve_contained_by_source: bool = option(
        True, doc="Keep footprints entirely inside a detection on the model (bright stars)."
    )
    do_prefilter_artifacts: bool = option(
        True,
        doc="Drop footprints mostly made of pixels with prefilter_artifacts_mask_planes.",
    )
    prefilter_artifacts_mask_planes: tuple[str, ...] = option(
        ("NO_DATA", "BAD", "SUSPECT"), doc="Planes of the pixels counted as bad by the prefilter."
    )
    prefilter_artifacts_ratio: float = option(
        0.05,
        doc="A footprint whose fraction of pixels free of the prefilter planes is at most "
        "this is dropped.",
    )

    # AssembleCoaddConfig.__post_init__ validates every field, these ones too.

    def final_config(self) -> AssembleCoaddConfig:
        """The :class:`AssembleCoaddConfig` of the final stack (the inherited fields)."""
        return AssembleCoaddConfig(
            **{f.name: getattr(self, f.name) for f in fields(AssembleCoaddConfig)}
        )
