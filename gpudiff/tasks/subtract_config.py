"""``AlardLuptonSubtractConfig``: the subtraction's configuration (docs/algorithms.md §4.1).

Kept apart from the task (:mod:`gpudiff.tasks.subtract`) so that each module stays small;
importable from there too.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..configfield import option, validate_config
from ..ops.interpolate import DEFAULT_INTERPOLATE_PLANES
from ..psfmatch import PsfMatchConfig

__all__ = ["AlardLuptonSubtractConfig"]

_MODES = ("convolveTemplate", "convolveScience", "auto")


def _default_make_kernel() -> PsfMatchConfig:
    # AlardLuptonSubtractTask.setDefaults (docs/algorithms.md §1.1 "Important").
    # Plus the cross-validated spatial order (a departure: docs/algorithms.md §14).
    return PsfMatchConfig(
        fit_for_background=True,
        spatial_kernel_order=1,
        spatial_bg_order=2,
        spatial_order_by_cross_validation=True,
    )


@dataclass(frozen=True)
class AlardLuptonSubtractConfig:
    """``AlardLuptonSubtractConfig`` (docs/algorithms.md §4.1), snake_case, LSST defaults.

    The kernel-source selector is LSST's ``ScienceSourceSelector``: unresolved, isolated,
    S/N in [``source_snr_min``, ``source_snr_max``] from PSF flux.

    Two departures from LSST's defaults, both for inputs that are not LSST calexps:

    - ``do_subtract_background`` is **True**: the differential background fitted with the
      kernel is subtracted from the difference (in every mode, and from the score image
      of the preconvolution task).  LSST's default is False because its calexps are
      sky-subtracted by the calibration pipeline; a plain FITS image rarely is perfectly,
      and a residual sky plane of 0.3σ then stays in the difference (measured: PSF fluxes
      of transients 23 % high).  A low-order residual background measured on the
      difference itself is subtracted too (:func:`residual_background`).  Set it False to
      mirror LSST exactly.
    - ``interpolate_mask_planes`` (NO_DATA, BAD, SAT, CR, EDGE) and every non-finite pixel
      of **both** inputs are interpolated (:func:`gpudiff.ops.interpolate_over_defects`)
      before detection, kernel fitting, convolution and decorrelation, and flagged INTRP
      (LSST's calexps arrive interpolated; raw data's garbage would otherwise be spread by
      the kernel into ±stripes).  An empty tuple switches it off (non-finite pixels are
      then zero-filled by the convolution, as before).
    """

    mode: str = option(
        "convolveTemplate",
        doc="Which image is convolved with the matching kernel (auto: the one with the "
        "narrower PSF).",
        choices=_MODES,
    )
    make_kernel: PsfMatchConfig = option(
        doc="The PSF-matching kernel fit (LSST's setDefaults: spatial kernel order 1, "
        "background order 2, fitted).",
        default_factory=_default_make_kernel,
    )
    do_decorrelation: bool = option(
        True, doc="Whiten the difference's noise (DecorrelateALKernelTask)."
    )
    required_template_fraction: float = option(
        0.1,
        doc="Smallest fraction of the science image the template must cover (else NoWorkFound).",
        min=0,
        max=1,
    )
    min_template_fraction_for_expected_success: float = option(
        0.2,
        doc="When the kernel fit fails on a template covering less than this fraction, "
        "NoWorkFound is raised instead of the fit's error.",
    )
    do_scale_variance: bool = option(
        True, doc="Rescale both variance planes to the pixel noise (ScaleVarianceTask)."
    )
    # LSST: False (its calexps are sky-subtracted); see the class docstring.
    do_subtract_background: bool = option(
        True,
        doc="Subtract the fitted differential background (and a residual one) from the "
        "difference; LSST's default is False.",
    )
    interpolate_mask_planes: tuple[str, ...] = option(
        DEFAULT_INTERPOLATE_PLANES,
        doc="Planes of both inputs interpolated over (with non-finite pixels) before "
        "detection, fitting and convolution; empty: off.",
        gpudiff_only=True,
    )
    restrict_kernel_edge_sources: bool = option(
        True,
        doc="Keep kernel sources a kernel stamp away from the science image's edges.",
    )
    max_kernel_sources: int = option(
        1000,
        doc="Keep at most this many kernel sources, the highest S/N (<= 0: no limit).",
    )
    min_kernel_sources: int = option(3, doc="Fewer kernel sources than this is an error.", min=1)
    exclude_mask_planes: tuple[str, ...] = option(
        ("NO_DATA", "BAD", "SAT", "EDGE", "FAKE", "HIGH_VARIANCE"),
        doc="Kernel candidates whose stamp has any of these planes are excluded.",
    )
    bad_mask_planes: tuple[str, ...] = option(
        ("NO_DATA", "BAD", "SAT", "EDGE"),
        doc="Pixels with these planes count as unusable when the inputs are validated "
        "(their variance is not checked).",
    )
    preserve_template_mask: tuple[str, ...] = option(
        ("NO_DATA", "BAD", "HIGH_VARIANCE"),
        doc="Template mask planes kept; the others are cleared (the renamed *_TEMPLATE "
        "planes stay too).",
    )
    rename_template_mask: tuple[str, ...] = option(
        ("SAT", "INJECTED", "INJECTED_CORE"),
        doc="Template mask planes copied to NAME_TEMPLATE (so they reach the difference).",
    )
    preserve_mask_planes: tuple[str, ...] = option(
        ("INJECTED", "INJECTED_CORE", "INJECTED_TEMPLATE", "INJECTED_CORE_TEMPLATE"),
        doc="Planes restored unspread after the convolution (injection markers).",
    )
    allow_kernel_source_detection: bool = option(
        False,
        doc="LSST: re-detect kernel sources when the kernel fit fails; accepted for "
        "compatibility, no effect in gpudiff (sources are detected when none are given).",
    )
    find_science_cosmic_rays: bool = option(
        True,
        doc="Find cosmic rays on the science image not flagged yet (CR), then interpolate "
        "them when CR is in interpolate_mask_planes.",
        gpudiff_only=True,
    )
    #: LSST's templates are coadds, where cosmic rays were rejected; a single-exposure
    #: template is not, and each of its rays becomes a clean negative DIA source
    #: (measured: 12 of the 23 clean false sources of the 20 same-epoch DECam cutout pairs).
    find_template_cosmic_rays: bool = option(
        True,
        doc="Find cosmic rays on the template too (flagged CR, then interpolated before the "
        "kernel fit and the convolution).",
        gpudiff_only=True,
    )
    #: A source new in the science (transient, moving object) has nothing to match, and
    #: where such sources are common among the candidates LSST's clipping lets them pull
    #: the kernel sum down (see :func:`gpudiff.psfmatch.candidates.template_presence_snr`).
    template_source_snr_min: float | None = option(
        3.0,
        doc="A kernel source must also be a source in the template at this S/N (PSF-weighted, "
        "above the local background; None: no test, as LSST).",
        gpudiff_only=True,
    )
    source_snr_min: float = option(
        10.0,
        doc="Smallest PSF-flux S/N of a kernel source.",
        lsst="sourceSelector.signalToNoise.minimum",
    )
    source_snr_max: float = option(
        500.0,
        doc="Largest PSF-flux S/N of a kernel source.",
        lsst="sourceSelector.signalToNoise.maximum",
    )
    detection_threshold: float = option(
        5.0,
        doc="Threshold (sigma) of the detection of kernel sources on the science image "
        "when no catalog is given.",
        gpudiff_only=True,
    )
    #: ScaleVarianceTask on at most this many regularly spaced pixels (None: every pixel,
    #: as LSST).  The factor's quartile scatter at 2²² samples is ~0.1 %, while every pixel
    #: of a 4096² pair costs ~4 s of the 2-core budget; images up to 2048² are unaffected.
    scale_variance_max_samples: int | None = option(
        1 << 22,
        doc="Variance rescaling on at most this many regularly spaced pixels (None: all, as LSST).",
        gpudiff_only=True,
    )

    def __post_init__(self):
        # Every rule is a single-field one (the field options).
        validate_config(self)
