"""The LSST-named tasks: dataclass configs in, dataclass results out; no file I/O."""

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
