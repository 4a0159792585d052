"""The LSST-named tasks: dataclass configs in, dataclass results out; no file I/O."""

from .assemble_coadd import (
    AssembleCoaddConfig,
    AssembleCoaddResult,
    AssembleCoaddTask,
    unpack_input_map,
)
from .coadd_warps import ExposureWarp, FitsWarp, as_warp
from .compare_warp import (
    ArtifactDetectionConfig,
    CompareWarpAssembleCoaddConfig,
    CompareWarpAssembleCoaddResult,
    CompareWarpAssembleCoaddTask,
)
from .match_background_pair import (
    BackgroundMatchPairConfig,
    BackgroundMatchPairResult,
    match_background_pair,
)
from .match_backgrounds import (
    MatchBackgroundsConfig,
    MatchBackgroundsResult,
    MatchBackgroundsTask,
    WarpBackground,
)
from .tract_background import (
    ChooseReferenceVisitConfig,
    ChooseReferenceVisitTask,
    ReferenceChoice,
    TractBackground,
    TractBackgroundConfig,
)
from .decorrelate import DecorrelateALKernelConfig, DecorrelateALKernelTask, DecorrelationResult
from .detect_and_measure import (
    DetectAndMeasureConfig,
    DetectAndMeasureResult,
    DetectAndMeasureScoreTask,
    DetectAndMeasureTask,
)
from .image_psf_match import ImagePsfMatchConfig, ImagePsfMatchResult, ImagePsfMatchTask
from .model_psf_match import ModelPsfMatchConfig, ModelPsfMatchResult, ModelPsfMatchTask
from .preconvolve import (
    AlardLuptonPreconvolveSubtractConfig,
    AlardLuptonPreconvolveSubtractTask,
    PreconvolveResult,
)
from .scale_variance import ScaleVarianceConfig, ScaleVarianceFactors, ScaleVarianceTask
from .subtract import AlardLuptonSubtractConfig, AlardLuptonSubtractTask, SubtractionResult

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
