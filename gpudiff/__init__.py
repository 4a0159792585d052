"""gpudiff: astronomical image differencing on GPUs, with a NumPy/SciPy fallback.

``import gpudiff`` never imports CuPy; the backend is chosen lazily by
:func:`gpudiff.get_backend` (``"auto"``, ``"numpy"`` or ``"cupy"``, or the environment
variable ``GPUDIFF_BACKEND``).
"""

import importlib as _importlib

from .backend import Backend, get_backend, use_backend
from .backend.threads import get_num_threads, num_threads, set_num_threads
from .errors import *  # noqa: F401,F403  (the exception hierarchy is public API)
from .errors import __all__ as _errors_all

#: Public names imported on first use, so that ``import gpudiff`` (and the command line's
#: start) does not pay for astropy.io.fits, scipy.spatial & co.: name → module holding it.
_LAZY = {
    name: "gpudiff.image"
    for name in (
        "Box",
        "DoubleGaussianPsf",
        "Exposure",
        "GaussianPsf",
        "GridPsf",
        "ImagePsf",
        "MaskedImage",
        "MaskPlanes",
        "MoffatPsf",
        "PhotoCalib",
        "Psf",
        "estimate_psf",
    )
}


def _package_version() -> str:
    # importlib.metadata costs ~50 ms to import and scan: only when the version is asked.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gpudiff")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0.1.0.dev0"


def __getattr__(name: str):
    """Module-level lazy attributes (PEP 562): the public names of :data:`_LAZY` and
    ``__version__``, resolved once and then cached in the module namespace."""
    if name == "__version__":
        value = _package_version()
    elif name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


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
    "get_num_threads",
    "num_threads",
    "set_num_threads",
    "use_backend",
    *_errors_all,
]
