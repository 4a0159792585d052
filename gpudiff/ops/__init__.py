"""Backend-agnostic array algorithms: FFT correlation, masked convolution, statistics."""

from .convolution import (
    convolve_masked_image,
    correlate,
    correlate_many,
    dilate_mask,
    kernel_centre,
    varying_correlate,
)

__all__ = [
    "convolve_masked_image",
    "correlate",
    "correlate_many",
    "dilate_mask",
    "kernel_centre",
    "varying_correlate",
]
