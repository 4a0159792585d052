"""The gpudiff exception hierarchy.

Every error that gpudiff raises on purpose derives from :class:`GpudiffError`, so a
pipeline can catch one type.  Each subclass also derives from the closest built-in
exception (``ValueError``, ``OSError``, ``RuntimeError``) so that generic handlers keep
working.  Messages name the input and the problem.  :class:`GpudiffFallbackWarning` is
the one warning gpudiff defines: a stage finished, but on a fallback path.

``python -m gpudiff.errors --markdown`` prints the table of the README section "Errors
and what they mean" (``tests/test_errors_doc.py`` checks that the two agree).
"""

from __future__ import annotations

__all__ = [
    "GpudiffError",
    "BackendUnavailableError",
    "KernelRegistryError",
    "InvalidInputError",
    "ShapeMismatchError",
    "NonFiniteDataError",
    "InvalidVarianceError",
    "AllMaskedError",
    "MaskPlaneError",
    "PsfError",
    "FitsReadError",
    "FitsWriteError",
    "NoOverlapError",
    "PsfMatchingError",
    "InsufficientKernelSourcesError",
    "KernelTooLargeError",
    "NoWorkFound",
    "ExceedsMaxVarianceScaleError",
    "ManifestError",
    "DeviceMemoryError",
    "GpudiffFallbackWarning",
]


class GpudiffError(Exception):
    """Base class of every error raised by gpudiff."""


class BackendUnavailableError(GpudiffError, RuntimeError):
    """The requested array backend cannot run here (e.g. CuPy without a CUDA device)."""


class KernelRegistryError(GpudiffError, RuntimeError):
    """A registered kernel is unknown, or its CUDA source cannot be found or compiled."""


class InvalidInputError(GpudiffError, ValueError):
    """An argument is malformed (wrong type, dimension, dtype or value)."""


class ShapeMismatchError(InvalidInputError):
    """Arrays that must share a shape (image, variance, mask; science, template) do not."""


class NonFiniteDataError(InvalidInputError):
    """NaN or infinite values where the algorithm cannot mask them."""


class InvalidVarianceError(InvalidInputError):
    """Zero, negative or non-finite variance on pixels that are not masked NO_DATA."""


class AllMaskedError(InvalidInputError):
    """Every pixel is excluded by the mask, so no statistic can be computed."""


class MaskPlaneError(InvalidInputError):
    """An unknown mask plane name, a bit collision or an inconsistent plane definition."""


class PsfError(GpudiffError, ValueError):
    """A PSF is missing, malformed or cannot be estimated."""


class FitsReadError(GpudiffError, OSError):
    """A FITS file is unreadable, truncated, or its layout is inconsistent."""


class FitsWriteError(GpudiffError, OSError):
    """A FITS file could not be written."""


class NoOverlapError(InvalidInputError):
    """Two images (by WCS or bounding box) do not overlap at all."""


class PsfMatchingError(GpudiffError, RuntimeError):
    """The PSF-matching kernel could not be solved (ill-conditioned, no valid solution)."""


class InsufficientKernelSourcesError(PsfMatchingError):
    """Too few usable kernel candidates (sources) to constrain the matching kernel."""


class KernelTooLargeError(InvalidInputError):
    """A convolution or matching kernel does not fit inside the image or PSF stamp."""


class NoWorkFound(GpudiffError, RuntimeError):
    """Nothing useful can be done with these inputs (e.g. too little template coverage);
    LSST's ``NoWorkFound``: a pipeline should skip this data, not fail."""


class ExceedsMaxVarianceScaleError(GpudiffError, RuntimeError):
    """ScaleVarianceTask: both the pixel-based and the image-based variance factors exceed
    the configured limit (the variance plane is badly wrong)."""


class ManifestError(InvalidInputError):
    """A batch manifest is unreadable, empty, lacks a required column, or has a bad row."""


class DeviceMemoryError(GpudiffError, MemoryError):
    """The accelerator ran out of memory and no fallback (banded or CPU) could finish the
    stage."""


class GpudiffFallbackWarning(UserWarning):
    """A stage ran out of accelerator memory and was finished on a fallback path (row bands
    or the NumPy CPU backend); the result is valid, only slower to get."""


def _first_line(cls: type) -> str:
    """The first sentence-paragraph of a class docstring, joined onto one line."""
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in doc.splitlines())


def markdown_table() -> str:
    """The README table of every public class here: name, built-in bases, meaning."""
    rows = ["| Class | Derives from | Meaning |", "|---|---|---|"]
    for name in __all__:
        cls = globals()[name]
        bases = ", ".join(f"`{b.__name__}`" for b in cls.__bases__)
        rows.append(f"| `{name}` | {bases} | {_first_line(cls)} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m gpudiff.errors --markdown
    import sys

    if sys.argv[1:] != ["--markdown"]:
        print("usage: python -m gpudiff.errors --markdown", file=sys.stderr)
        raise SystemExit(2)
    sys.stdout.write(markdown_table())
