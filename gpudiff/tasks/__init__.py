"""The LSST-named tasks: dataclass configs in, dataclass results out; no file I/O."""

import importlib as _importlib
from importlib.util import find_spec as _find_spec

# A function named as its module: imported now, so that the name is the function even
# after something imports the submodule (the import system then binds the package
# attribute to the module, and __getattr__ is not asked).
from .match_background_pair import match_background_pair

#: Public names imported on first use (PEP 562): name → submodule holding it.  A command
#: imports only the tasks it runs (``gpudiff subtract`` no longer pays for the coadd and
#: background-matching modules at start-up).
_LAZY = {
    "MatchBackgroundsConfig": "match_backgrounds",
    "MatchBackgroundsResult": "match_backgrounds",
    "MatchBackgroundsTask": "match_backgrounds",
    "WarpBackground": "match_backgrounds",
    "TractBackgroundConfig": "tract_background",
    "TractBackground": "tract_background",
    "ChooseReferenceVisitConfig": "tract_background",
    "ChooseReferenceVisitTask": "tract_background",
    "ReferenceChoice": "tract_background",
    "BackgroundMatchPairConfig": "match_background_pair",
    "BackgroundMatchPairResult": "match_background_pair",
    "AssembleCoaddConfig": "assemble_coadd",
    "AssembleCoaddResult": "assemble_coadd",
    "AssembleCoaddTask": "assemble_coadd",
    "unpack_input_map": "assemble_coadd",
    "ExposureWarp": "coadd_warps",
    "FitsWarp": "coadd_warps",
    "as_warp": "coadd_warps",
    "ArtifactDetectionConfig": "compare_warp",
    "CompareWarpAssembleCoaddConfig": "compare_warp",
    "CompareWarpAssembleCoaddResult": "compare_warp",
    "CompareWarpAssembleCoaddTask": "compare_warp",
    "AlardLuptonPreconvolveSubtractConfig": "preconvolve",
    "AlardLuptonPreconvolveSubtractTask": "preconvolve",
    "AlardLuptonSubtractConfig": "subtract",
    "AlardLuptonSubtractTask": "subtract",
    "DecorrelateALKernelConfig": "decorrelate",
    "DecorrelateALKernelTask": "decorrelate",
    "DecorrelationResult": "decorrelate",
    "DetectAndMeasureConfig": "detect_and_measure",
    "DetectAndMeasureResult": "detect_and_measure",
    "DetectAndMeasureScoreTask": "detect_and_measure",
    "DetectAndMeasureTask": "detect_and_measure",
    "ImagePsfMatchConfig": "image_psf_match",
    "ImagePsfMatchResult": "image_psf_match",
    "ImagePsfMatchTask": "image_psf_match",
    "ModelPsfMatchConfig": "model_psf_match",
    "ModelPsfMatchResult": "model_psf_match",
    "ModelPsfMatchTask": "model_psf_match",
    "PreconvolveResult": "preconvolve",
    "ScaleVarianceConfig": "scale_variance",
    "ScaleVarianceFactors": "scale_variance",
    "ScaleVarianceTask": "scale_variance",
    "SubtractionResult": "subtract",
}


def __getattr__(name: str):
    """The public names of :data:`_LAZY` (and the submodules, as attributes), imported once
    and then cached in the namespace."""
    if name in _LAZY:
        value = getattr(_importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    elif not name.startswith("_") and _find_spec(f"{__name__}.{name}"):
        value = _importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "MatchBackgroundsConfig",
    "MatchBackgroundsResult",
    "MatchBackgroundsTask",
    "WarpBackground",
    "TractBackgroundConfig",
    "TractBackground",
    "ChooseReferenceVisitConfig",
    "ChooseReferenceVisitTask",
    "ReferenceChoice",
    "BackgroundMatchPairConfig",
    "BackgroundMatchPairResult",
    "match_background_pair",
    "AssembleCoaddConfig",
    "AssembleCoaddResult",
    "AssembleCoaddTask",
    "unpack_input_map",
    "ExposureWarp",
    "FitsWarp",
    "as_warp",
    "ArtifactDetectionConfig",
    "CompareWarpAssembleCoaddConfig",
    "CompareWarpAssembleCoaddResult",
    "CompareWarpAssembleCoaddTask",
    "AlardLuptonPreconvolveSubtractConfig",
    "AlardLuptonPreconvolveSubtractTask",
    "AlardLuptonSubtractConfig",
    "AlardLuptonSubtractTask",
    "DecorrelateALKernelConfig",
    "DecorrelateALKernelTask",
    "DecorrelationResult",
    "DetectAndMeasureConfig",
    "DetectAndMeasureResult",
    "DetectAndMeasureScoreTask",
    "DetectAndMeasureTask",
    "ImagePsfMatchConfig",
    "ImagePsfMatchResult",
    "ImagePsfMatchTask",
    "ModelPsfMatchConfig",
    "ModelPsfMatchResult",
    "ModelPsfMatchTask",
    "PreconvolveResult",
    "ScaleVarianceConfig",
    "ScaleVarianceFactors",
    "ScaleVarianceTask",
    "SubtractionResult",
]
