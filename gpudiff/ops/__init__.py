"""Backend-agnostic array algorithms: FFT correlation, masked convolution, statistics,
backgrounds, detection and measurement, warping."""

from .interpolate import interpolate_over_defects
from .photometry import forced_psf_flux
from .stats import (
    MAD_TO_SIGMA,
    STATS_BAD_PLANES,
    adaptive_moments_batch,
    clipped_mean_std,
    gather_stamps,
    image_statistics,
    robust_sigma,
    weighted_centroid,
)

from .background import (
    BACKGROUND_BAD_PLANES,
    BackgroundBins,
    bin_background,
    estimate_background,
    evaluate_bin_grid,
    fill_bad_bins,
    interpolate_background,
)

from .window_stats import window_statistics

from .detection import (
    DetectionResult,
    FLAG_PLANES,
    KERNEL_EXCLUDE_FLAGS,
    detect_sources,
    select_kernel_sources,
)

from .warp import (
    check_overlap,
    pixel_mapping,
    warp_exposure,
    wcs_equal,
    wcs_overlap,
)

from .convolution import (
    convolve_masked_image,
    correlate,
    correlate_many,
    dilate_mask,
    finish_masked_output,
    iter_correlations,
    kernel_centre,
    prepare_masked_input,
    varying_correlate,
)


__all__ = [
    "evaluate_bin_grid",
    "fill_bad_bins",
    "window_statistics",
    "BACKGROUND_BAD_PLANES",
    "BackgroundBins",
    "DetectionResult",
    "FLAG_PLANES",
    "KERNEL_EXCLUDE_FLAGS",
    "MAD_TO_SIGMA",
    "STATS_BAD_PLANES",
    "adaptive_moments_batch",
    "bin_background",
    "check_overlap",
    "clipped_mean_std",
    "convolve_masked_image",
    "correlate",
    "correlate_many",
    "detect_sources",
    "dilate_mask",
    "estimate_background",
    "finish_masked_output",
    "forced_psf_flux",
    "gather_stamps",
    "image_statistics",
    "interpolate_over_defects",
    "interpolate_background",
    "iter_correlations",
    "kernel_centre",
    "pixel_mapping",
    "prepare_masked_input",
    "robust_sigma",
    "select_kernel_sources",
    "varying_correlate",
    "warp_exposure",
    "wcs_equal",
    "wcs_overlap",
    "weighted_centroid",
]
