"""Exposure: a MaskedImage with a PSF, a WCS, a photometric calibration and metadata."""

from __future__ import annotations

import copy as _copy
from dataclasses import dataclass
from typing import Any

from astropy.io import fits

from ..backend import Backend
from ..errors import InvalidInputError
from .masked_image import Box, MaskedImage
from .psf import Psf

__all__ = ["Exposure", "PhotoCalib"]

#: The FITS functions behind Exposure.read/write/from_ccddata/to_ccddata, registered by
#: gpudiff.image.io (which imports this module; this module never imports it).
_IO: dict[str, Any] = {}


def _io(name: str):
    try:
        return _IO[name]
    except KeyError:
        raise RuntimeError(
            f"gpudiff.image.io is not loaded, so Exposure has no {name}; import gpudiff.image"
        ) from None


@dataclass(frozen=True)
class PhotoCalib:
    """A spatially constant photometric calibration (LSST ``PhotoCalib`` mean).

    ``calibration_mean`` converts image units (instFlux) to nJy:
    flux_nJy = instFlux · calibration_mean.  ``1.0`` means "already calibrated" or unknown.
    """

    calibration_mean: float = 1.0
    calibration_err: float = 0.0

    def __post_init__(self):
        if not (self.calibration_mean > 0):
            raise InvalidInputError(
                f"PhotoCalib calibration_mean must be > 0, got {self.calibration_mean}"
            )

    def inst_flux_to_nanojansky(self, inst_flux):
        """Convert image-unit fluxes to nJy."""
        return inst_flux * self.calibration_mean


class Exposure:
    """An image with everything needed to difference it.

    Parameters
    ----------
    masked_image : MaskedImage
        Pixels, variance and mask (not copied: the Exposure takes it over).
    psf : Psf, optional
        The PSF model; ``None`` if unknown (see :func:`gpudiff.image.estimate_psf`).
    wcs : astropy.wcs.WCS, optional
        Pixel → sky mapping in **parent** coordinates shifted by xy0 as FITS requires
        (pixel [0, 0] of the arrays is FITS pixel (1, 1)).
    photo_calib : PhotoCalib, optional
    metadata : astropy.io.fits.Header, optional
        Free-form header cards carried through processing (copied).
    """

    def __init__(
        self,
        masked_image: MaskedImage,
        psf: Psf | None = None,
        wcs: Any = None,
        photo_calib: PhotoCalib | None = None,
        metadata: fits.Header | None = None,
    ):
        if not isinstance(masked_image, MaskedImage):
            raise InvalidInputError(
                f"Exposure needs a MaskedImage, got {type(masked_image).__name__}"
            )
        if psf is not None and not isinstance(psf, Psf):
            raise InvalidInputError(f"Exposure psf must be a gpudiff Psf, got {type(psf).__name__}")
        self.masked_image = masked_image
        self.psf = psf
        self.wcs = wcs
        self.photo_calib = PhotoCalib() if photo_calib is None else photo_calib
        self.metadata = fits.Header() if metadata is None else metadata.copy()

    @classmethod
    def from_arrays(
        cls,
        image,
        variance=None,
        mask=None,
        *,
        xy0=(0, 0),
        mask_planes=None,
        psf=None,
        wcs=None,
        photo_calib=None,
        metadata=None,
        backend: Backend | str | None = None,
    ) -> "Exposure":
        """Build an Exposure from plain arrays (copied, converted to float32/int32)."""
        mi = MaskedImage(image, variance, mask, xy0=xy0, mask_planes=mask_planes, backend=backend)
        return cls(mi, psf=psf, wcs=wcs, photo_calib=photo_calib, metadata=metadata)

    # --- shortcuts --------------------------------------------------------------------
    @property
    def image(self):
        return self.masked_image.image

    @property
    def variance(self):
        return self.masked_image.variance

    @property
    def mask(self):
        return self.masked_image.mask

    @property
    def mask_planes(self):
        return self.masked_image.mask_planes

    @property
    def backend(self) -> Backend:
        return self.masked_image.backend

    @property
    def shape(self) -> tuple[int, int]:
        return self.masked_image.shape

    @property
    def xy0(self) -> tuple[int, int]:
        return self.masked_image.xy0

    @property
    def bbox(self) -> Box:
        return self.masked_image.bbox

    # --- copies -----------------------------------------------------------------------
    def _with(self, masked_image: MaskedImage) -> "Exposure":
        return Exposure(
            masked_image,
            psf=self.psf,
            wcs=_copy.deepcopy(self.wcs),
            photo_calib=self.photo_calib,
            metadata=self.metadata,
        )

    def copy(self) -> "Exposure":
        """A deep copy of the pixels and metadata (PSF models are immutable and shared)."""
        return self._with(self.masked_image.copy())

    def to_backend(self, backend: Backend | str | None) -> "Exposure":
        """A copy with the pixel arrays on ``backend``."""
        return self._with(self.masked_image.to_backend(backend))

    def subimage(self, box: Box) -> "Exposure":
        """A copy of the part of this exposure inside ``box`` (parent coordinates)."""
        return self._with(self.masked_image.subimage(box))

    def on_box(self, box: Box) -> "Exposure":
        """This exposure on ``box``: its pixels where the boxes overlap, NO_DATA elsewhere
        (see :meth:`MaskedImage.on_box`)."""
        return self._with(self.masked_image.on_box(box))

    # --- I/O ---------------------------------------------------------------------------
    # The FITS layer (gpudiff.image.io) builds on this module, never the reverse: it
    # registers its functions in _IO when imported, and gpudiff.image imports it.
    @classmethod
    def read(cls, path, **kwargs) -> "Exposure":
        """Read an exposure from FITS; see :func:`gpudiff.image.io.read_exposure`."""
        return _io("read_exposure")(path, **kwargs)

    def write(self, path, overwrite: bool = False) -> None:
        """Write in gpudiff's LSST-style layout; see :func:`gpudiff.image.io.write_exposure`."""
        _io("write_exposure")(path, self, overwrite=overwrite)

    @classmethod
    def from_ccddata(cls, ccd, **kwargs) -> "Exposure":
        """Build from an ``astropy.nddata.CCDData``; see
        :func:`gpudiff.image.io.exposure_from_ccddata`."""
        return _io("exposure_from_ccddata")(ccd, **kwargs)

    def to_ccddata(self):
        """Convert to ``astropy.nddata.CCDData``; see
        :func:`gpudiff.image.io.exposure_to_ccddata`."""
        return _io("exposure_to_ccddata")(self)

    def __repr__(self) -> str:
        return (
            f"Exposure(shape={self.shape}, xy0={self.xy0}, psf={self.psf!r}, "
            f"wcs={'yes' if self.wcs is not None else 'no'}, backend={self.backend.name!r})"
        )
