"""gpudiff: astronomical image differencing on GPUs, with a NumPy/SciPy fallback.

``import gpudiff`` never imports CuPy; the backend is chosen lazily by
:func:`gpudiff.get_backend` (``"auto"``, ``"numpy"`` or ``"cupy"``, or the environment
variable ``GPUDIFF_BACKEND``).
"""

from importlib.metadata import PackageNotFoundError, version as _version

from .backend import Backend, get_backend, use_backend
from .errors import *  # noqa: F401,F403  (the exception hierarchy is public API)
from .errors import __all__ as _errors_all
from .image import (
    Box,
    DoubleGaussianPsf,
    Exposure,
    GaussianPsf,
    GridPsf,
    ImagePsf,
    MaskedImage,
    MaskPlanes,
    MoffatPsf,
    PhotoCalib,
    Psf,
    estimate_psf,
)

try:
    __version__ = _version("gpudiff")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0.dev0"

__all__ = [
    "__version__",
    "Backend",
    "Box",
    "DoubleGaussianPsf",
    "Exposure",
    "GaussianPsf",
    "GridPsf",
    "ImagePsf",
    "MaskPlanes",
    "MaskedImage",
    "MoffatPsf",
    "PhotoCalib",
    "Psf",
    "estimate_psf",
    "get_backend",
    "use_backend",
    *_errors_all,
]
