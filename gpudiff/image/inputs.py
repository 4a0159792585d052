"""What users hand beside an image: PSF models, noise maps, masks and a FWHM.

Survey files often lack what differencing needs (a PSF, a variance plane, a mask with
named planes) while the user has it in a separate file: a WebbPSF model, a JWST ``ERR``
map, a weight map, a bad-pixel mask.  This module attaches them to
an :class:`~gpudiff.image.Exposure`, always returning a **new** exposure (the input is
never modified), and records where each ingredient came from so that the commands can
say it in their log and in the output header.

What each ingredient can be, and how it is recognised:

- a PSF (:mod:`gpudiff.image.input_psf`): a PSF file, an array or a Psf, else the file's
  PSF, else one estimated from the stars, else a Gaussian of a FWHM — the fallback order
  of :func:`resolve_psf`;
- a noise map (:mod:`gpudiff.image.input_maps`): σ, variance or inverse variance, the
  file's header correcting the caller's kind (:func:`read_noise_map`); it replaces the
  variance plane;
- a mask (:mod:`gpudiff.image.input_maps`): integer planes named by the caller, by the
  file's ``MP_*`` cards or nonzero → ``BAD`` (:func:`read_mask`); the planes are OR-ed
  into the exposure's own mask (its planes keep their bits).

After a noise map or a mask is attached, pixels without a finite value or a usable
variance (+inf) are ``NO_DATA``, as the FITS readers make them.  The readers' public names
are re-exported here.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidInputError, ShapeMismatchError
from .exposure import Exposure
from .input_maps import (
    NOISE_KINDS,
    mask_from_array,
    noise_to_variance,
    parse_mask_bits,
    read_mask,
    read_noise_map,
)
from .input_psf import PSF_SOURCES, as_psf, read_psf_file, resolve_psf

__all__ = [
    "NOISE_KINDS",
    "PSF_SOURCES",
    "InputSources",
    "as_psf",
    "attach_inputs",
    "input_cards",
    "noise_to_variance",
    "parse_mask_bits",
    "read_mask",
    "read_noise_map",
    "read_psf_file",
    "read_with_inputs",
    "resolve_psf",
]


@dataclass
class InputSources:
    """Where an exposure's PSF, variance and mask came from (see the module docstring).

    ``psf`` is one of :data:`PSF_SOURCES`; ``noise`` is ``file`` (the image file's own
    variance), ``estimated`` (gpudiff estimated it from the sky) or ``sigma`` /
    ``variance`` / ``ivar`` (a map given by the caller); ``mask`` is ``file`` or
    ``file+option``.  ``notes`` are the one-line explanations that were logged.
    """

    psf: str | None = None
    psf_detail: str = ""
    noise: str = "file"
    noise_detail: str = ""
    mask: str = "file"
    mask_detail: str = ""
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "psf": self.psf,
            "psf_detail": self.psf_detail,
            "noise": self.noise,
            "noise_detail": self.noise_detail,
            "mask": self.mask,
            "mask_detail": self.mask_detail,
        }


# --- attaching ---------------------------------------------------------------------------
def _check_shape(arr: np.ndarray, exposure: Exposure, what: str, name: str) -> None:
    if tuple(arr.shape) != tuple(exposure.shape):
        ny, nx = exposure.shape
        raise ShapeMismatchError(
            f"{what} is {arr.shape[1]}x{arr.shape[0]} pixels but the image {name} is "
            f"{nx}x{ny}; a {what.split(' ')[0]} must cover the image pixel for pixel"
        )


def attach_inputs(
    exposure: Exposure,
    name: str = "image",
    *,
    psf=None,
    noise=None,
    variance=None,
    ivar=None,
    mask=None,
    mask_bits=None,
    fwhm: float | None = None,
    need_psf: bool = True,
    estimate_psf: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[Exposure, InputSources]:
    """Attach what the caller handed beside an image; a new Exposure and where each came from.

    Parameters
    ----------
    exposure : Exposure
        The image as read; never modified.
    name : str
        Its name in messages and notes (the file).
    psf : Psf, 2-D array or path, optional
        Wins over the file's PSF.
    noise, variance, ivar : array or path, optional
        A σ, variance or inverse-variance map (at most one); replaces the variance plane.
        A file's header can correct the kind (:func:`read_noise_map`).
    mask : array or path, optional
        A mask OR-ed into the exposure's mask; ``mask_bits`` names its bits.
    mask_bits : str or mapping, optional
        ``"BAD=0,SAT=1"``; see :func:`read_mask`.
    fwhm : float, optional
        Last-resort PSF FWHM in pixels (:func:`resolve_psf`).
    need_psf : bool
        Resolve a PSF (False for tasks that use none, e.g. background matching).
    estimate_psf : bool
        Allow estimating the PSF from the stars.
    log : callable, optional
        Receives the one-line notes (which fallback, what the header said).

    Returns
    -------
    exposure : Exposure
    sources : InputSources

    Raises
    ------
    ShapeMismatchError
        A map or mask does not have the image's shape (the message names both).
    InvalidInputError, PsfError, FitsReadError
        Unusable inputs; messages name the file.
    """
    if not isinstance(exposure, Exposure):
        raise InvalidInputError(f"attach_inputs needs an Exposure, got {type(exposure).__name__}")
    src = InputSources(noise=_file_noise(exposure))
    notes: list[str] = []

    def say(msg: str) -> None:
        notes.append(msg)
        if log is not None:
            log(msg)

    given = [
        (k, v)
        for k, v in (("sigma", noise), ("variance", variance), ("ivar", ivar))
        if v is not None
    ]
    if len(given) > 1:
        raise InvalidInputError(
            f"{name}: give at most one of a noise (σ), variance and inverse-variance "
            f"map, got {', '.join(k for k, _ in given)}"
        )
    be = exposure.backend
    mi = exposure.masked_image
    image, var, msk, planes = mi.image, mi.variance, mi.mask, mi.mask_planes
    changed = False
    if given:
        kind, value = given[0]
        if isinstance(value, (str, os.PathLike)):
            v, used, why = read_noise_map(
                value, kind, image_bunit=exposure.metadata.get("BUNIT"), log=say
            )
            where = f"{kind} map {os.fspath(value)}"
            detail = os.path.basename(os.fspath(value))
        else:
            used, why, where, detail = kind, "option", f"{kind} map", "array"
            v = noise_to_variance(
                be.asnumpy(value) if hasattr(value, "__cuda_array_interface__") else value, kind
            )
        _check_shape(v, exposure, where, name)
        var = be.asarray(v, dtype=np.float32)
        src.noise, src.noise_detail = used, detail
        say(
            f"{name}: variance from the {used} map {detail}"
            + (f" (recognised by {why})" if why != "option" else "")
        )
        changed = True
    if mask is not None:
        if isinstance(mask, (str, os.PathLike)):
            m, mplanes, how = read_mask(mask, mask_bits)
            detail = os.path.basename(os.fspath(mask))
            where = f"mask {os.fspath(mask)}"
        else:
            names = parse_mask_bits(mask_bits) if mask_bits is not None else None
            m, mplanes, how = mask_from_array(mask, f"{name}: given mask", bits=names)
            detail, where = "array", "mask"
        _check_shape(m, exposure, where, name)
        planes_out = planes.merge(mplanes)
        xp = be.xp
        msk = planes_out.conform(msk, planes, xp) | planes_out.conform(be.asarray(m), mplanes, xp)
        planes = planes_out
        src.mask, src.mask_detail = "file+option", detail
        say(f"{name}: mask planes {sorted(mplanes)} from {detail} ({how})")
        changed = True
    if changed:
        xp = be.xp
        # A pixel without a finite value or usable variance carries nothing: NO_DATA, as the
        # FITS readers do, rather than an unmasked +inf variance that a task would refuse.
        nodata = ~xp.isfinite(image) | ~(xp.isfinite(var) & (var > 0))
        if bool(nodata.any()):
            planes = planes.copy() if planes is mi.mask_planes else planes
            planes.add("NO_DATA")
            msk = msk | (nodata.astype(xp.int32) * xp.int32(planes.bitmask("NO_DATA")))
            var = xp.where(nodata, xp.float32(np.inf), var).astype(xp.float32)
        from .masked_image import MaskedImage

        mi = MaskedImage(image, var, msk, xy0=mi.xy0, mask_planes=planes, backend=be)
    meta = exposure.metadata
    if given:
        # The reader's estimated-variance cards no longer describe this variance plane.
        meta = meta.copy()
        for key in ("GDVAREST", "GDSKYLEV", "GDSKYSIG", "GDGAIN"):
            meta.remove(key, ignore_missing=True, remove_all=True)
    out = (
        Exposure(mi, exposure.psf, exposure.wcs, exposure.photo_calib, meta)
        if changed
        else exposure
    )
    if need_psf:
        out, src.psf, src.psf_detail = resolve_psf(
            out, name, psf=psf, fwhm=fwhm, estimate=estimate_psf, log=say
        )
    elif psf is not None:
        out, src.psf, src.psf_detail = resolve_psf(out, name, psf=psf, log=say)
    src.notes = notes
    return out, src


def _file_noise(exposure: Exposure) -> str:
    return "estimated" if "GDVAREST" in exposure.metadata else "file"


#: Header cards of the sources, per role: (PSF card, noise card).
_ROLE_CARDS = {"science": ("GDPSFSRC", "GDNOISRC"), "template": ("GDTPSFSR", "GDTNOISR")}


def input_cards(sources: InputSources, role: str = "science") -> dict:
    """Header cards saying where the PSF and the variance came from (``GDPSFSRC`` /
    ``GDNOISRC`` for the science or single input, ``GDTPSFSR`` / ``GDTNOISR`` for the
    template), values as in :class:`InputSources`, the file in the comment."""
    psf_key, noise_key = _ROLE_CARDS[role]
    cards = {}
    if sources.psf is not None:
        cards[psf_key] = (sources.psf, f"{role} PSF: {sources.psf_detail}"[:46])
    cards[noise_key] = (sources.noise, f"{role} variance: {sources.noise_detail}"[:46])
    return cards


def read_with_inputs(path, *, backend=None, **inputs) -> tuple[Exposure, InputSources]:
    """Read an exposure and attach what was given beside it (:func:`attach_inputs`).

    When a noise, variance or inverse-variance map is given, the reader's
    :class:`~gpudiff.image.io.VarianceEstimatedWarning` is not raised: the estimate it
    announces is replaced by the map (the sources say where the variance came from).
    Every other reader warning passes.

    Parameters
    ----------
    path : str or path-like
    backend : Backend or str, optional
    **inputs
        :func:`attach_inputs`' keyword arguments (``psf``, ``noise``, ``variance``,
        ``ivar``, ``mask``, ``mask_bits``, ``fwhm``, ``need_psf``, ``log``, ...).
    """
    from .io import VarianceEstimatedWarning, read_exposure

    replaced = any(inputs.get(k) is not None for k in ("noise", "variance", "ivar"))
    with warnings.catch_warnings():
        if replaced:
            warnings.filterwarnings("ignore", category=VarianceEstimatedWarning)
        exposure = read_exposure(path, backend=backend)
    return attach_inputs(exposure, str(path), **inputs)
