"""Array backends (NumPy/SciPy on the CPU, CuPy on CUDA GPUs) and the CUDA kernel registry.

This is the only package of gpudiff that imports CuPy, and it does so lazily.
"""

from .core import (
    BACKEND_NAMES,
    ENV_VAR,
    Backend,
    available_backends,
    cuda_device_count,
    cupy_status,
    get_backend,
    resolve_backend,
    use_backend,
)
from .kernels import (
    KernelSpec,
    clipped_stack,
    cuda_source_dir,
    get_kernel,
    list_kernels,
    mask_dilate_or,
    register_kernel,
)

# Registers the CUDA launchers with their NumPy twins: importing any module of this package
# runs this file first, so ``kernels.get_kernel`` always sees every kernel.
from . import launchers as _launchers  # noqa: F401

__all__ = [
    "KernelSpec",
    "clipped_stack",
    "cuda_source_dir",
    "get_kernel",
    "list_kernels",
    "mask_dilate_or",
    "register_kernel",
    "BACKEND_NAMES",
    "ENV_VAR",
    "Backend",
    "available_backends",
    "cuda_device_count",
    "cupy_status",
    "get_backend",
    "resolve_backend",
    "use_backend",
]
