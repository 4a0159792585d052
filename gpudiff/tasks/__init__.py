"""The LSST-named tasks: dataclass configs in, dataclass results out; no file I/O."""

from .image_psf_match import ImagePsfMatchConfig, ImagePsfMatchResult, ImagePsfMatchTask

__all__ = ["ImagePsfMatchConfig", "ImagePsfMatchResult", "ImagePsfMatchTask"]
