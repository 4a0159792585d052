"""PSF-matching core: kernel bases, candidates, batched per-stamp solves, clipping, spatial
model."""

from .basis import (
    KernelBasis,
    alard_lupton_parameters,
    make_alard_lupton_basis,
    make_delta_function_basis,
    make_kernel_basis,
    make_regularization_matrix,
    pca_basis,
    renormalize_kernel_list,
)
from .candidates import KernelCandidates, make_candidates
from .config import PsfMatchConfig
from .fit import KernelFit, fit_spatial_kernel
from .spatial import SpatialFunctions, SpatialKernel

__all__ = [
    "KernelBasis",
    "KernelCandidates",
    "KernelFit",
    "PsfMatchConfig",
    "SpatialFunctions",
    "SpatialKernel",
    "alard_lupton_parameters",
    "fit_spatial_kernel",
    "make_alard_lupton_basis",
    "make_candidates",
    "make_delta_function_basis",
    "make_kernel_basis",
    "make_regularization_matrix",
    "pca_basis",
    "renormalize_kernel_list",
]
