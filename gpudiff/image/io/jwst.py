"""JWST calibrated images: ``cal`` (``SCI``, ``ERR``, ``DQ``, ``VAR_*``, ``AREA``) and ``i2d``
(``SCI``, ``ERR``, ``WHT``, ``CON``, ``VAR_*``) files, and ``SCI``-only stamps cut from them.

The noise is ``ERR`` (σ, so variance = ERR²), else the sum of ``VAR_POISSON``,
``VAR_RNOISE`` and ``VAR_FLAT``, else it is estimated from the sky as for a plain image, with
a warning.  ``DQ`` bits become mask planes by the JWST data-quality definitions
(:data:`DQ_FLAGS`, :data:`DQ_TO_PLANES`): ``DO_NOT_USE`` → ``BAD`` and ``NO_DATA``,
``SATURATED`` → ``SAT`` (≡ ``SATURATED``), ``JUMP_DET`` → ``CR``, ``NONLINEAR`` → ``SUSPECT``,
detector defects (``DEAD``, ``HOT``, ``LOW_QE``, ``RC``, ``TELEGRAPH``, ``OPEN``, ``ADJ_OPEN``,
``OTHER_BAD_PIXEL``) → ``BAD``, ``NON_SCIENCE``, ``REFERENCE_PIXEL``, ``DROPOUT`` → ``NO_DATA``;
a flag with no LSST plane that is set on some pixel is kept as a plane of its own JWST name
(``PERSISTENCE``, ``OUTLIER``, ...), with a warning.  ``WHT`` = 0 (no input) → ``NO_DATA``;
non-finite ``SCI`` or ``ERR`` ≤ 0 → ``NO_DATA`` (image NaN, variance +inf).  Units stay the
file's (``BUNIT``, e.g. MJy/sr); the photometric calibration is left at 1.
"""

from __future__ import annotations

import numpy as np

from ...errors import FitsReadError
from ..exposure import Exposure
from ..maskplanes import MaskPlanes
from ._common import (
    VarianceEstimatedWarning,
    MP_KEYS,
    WCS_KEYS,
    XY0_KEYS,
    Hdus,
    load,
    plane,
    read_photocalib,
    read_wcs,
    read_xy0,
    strip,
    warn,
)
from .plain import assemble
from .psf_io import gpudiff_psf

__all__ = ["detect", "read", "DQ_FLAGS", "DQ_TO_PLANES", "dq_to_mask"]

NAME = "jwst"
JWST_INSTRUMENTS = ("NIRCAM", "NIRISS", "MIRI", "NIRSPEC", "FGS")
_JWST_EXTS = ("ERR", "DQ", "WHT", "CON", "VAR_POISSON", "VAR_RNOISE", "VAR_FLAT", "AREA")

#: JWST data-quality flags by bit (jwst/stcal ``dqflags``).
DQ_FLAGS: tuple[str, ...] = (
    "DO_NOT_USE",
    "SATURATED",
    "JUMP_DET",
    "DROPOUT",
    "OUTLIER",
    "PERSISTENCE",
    "AD_FLOOR",
    "CHARGELOSS",
    "UNRELIABLE_ERROR",
    "NON_SCIENCE",
    "DEAD",
    "HOT",
    "WARM",
    "LOW_QE",
    "RC",
    "TELEGRAPH",
    "NONLINEAR",
    "BAD_REF_PIXEL",
    "NO_FLAT_FIELD",
    "NO_GAIN_VALUE",
    "NO_LIN_CORR",
    "NO_SAT_CHECK",
    "UNRELIABLE_BIAS",
    "UNRELIABLE_DARK",
    "UNRELIABLE_SLOPE",
    "UNRELIABLE_FLAT",
    "OPEN",
    "ADJ_OPEN",
    "FLUX_ESTIMATED",
    "MSA_FAILED_OPEN",
    "OTHER_BAD_PIXEL",
    "REFERENCE_PIXEL",
)

#: The gpudiff (LSST) planes a JWST flag sets; flags not listed keep their own name.
DQ_TO_PLANES: dict[str, tuple[str, ...]] = {
    "DO_NOT_USE": ("BAD", "NO_DATA"),
    "SATURATED": ("SAT",),
    "JUMP_DET": ("CR",),
    "DROPOUT": ("NO_DATA",),
    "NON_SCIENCE": ("NO_DATA",),
    "REFERENCE_PIXEL": ("NO_DATA",),
    "NONLINEAR": ("SUSPECT",),
    **{
        f: ("BAD",)
        for f in ("DEAD", "HOT", "LOW_QE", "RC", "TELEGRAPH", "OPEN", "ADJ_OPEN", "OTHER_BAD_PIXEL")
    },
}


def _is_jwst(header) -> bool:
    return (
        str(header.get("TELESCOP", "")).strip().upper() == "JWST"
        or str(header.get("INSTRUME", "")).strip().upper() in JWST_INSTRUMENTS
    )


def detect(hdus: Hdus) -> bool:
    """A ``SCI`` HDU in a JWST file (``TELESCOP = 'JWST'`` or a JWST ``INSTRUME``)."""
    sci = hdus.get("SCI")
    return sci is not None and (_is_jwst(hdus.primary) or _is_jwst(sci.header))


def dq_to_mask(dq: np.ndarray, planes: MaskPlanes, path: str = "") -> np.ndarray:
    """The int64 mask of a JWST ``DQ`` array on ``planes`` (planes are added as needed)."""
    dq = np.asarray(dq)
    if dq.dtype.kind == "i" and dq.dtype.itemsize < 8:
        dq = dq.view(dq.dtype.str.replace("i", "u"))
    dq = dq.astype(np.int64)
    for p in ("BAD", "NO_DATA", "SAT", "CR", "SUSPECT"):
        planes.add(p)
    mask = np.zeros(dq.shape, np.int64)
    present = int(np.bitwise_or.reduce(dq, axis=None)) if dq.size else 0
    own = []
    for bit, flag in enumerate(DQ_FLAGS):
        if not present & (1 << bit):
            continue
        hit = (dq & (1 << bit)) != 0
        targets = DQ_TO_PLANES.get(flag)
        if targets is None:
            targets = (flag,)
            own.append(f"{flag} ({int(hit.sum())} px)")
        for name in targets:
            mask[hit] |= np.int64(1) << np.int64(planes.add(name))
    if present >> len(DQ_FLAGS):
        raise FitsReadError(
            f"{path}[DQ]: bits above {len(DQ_FLAGS) - 1} are set; JWST defines none"
        )
    if own:
        warn(
            path,
            "JWST DQ flags without an LSST mask plane are kept as planes of their own name: "
            + ", ".join(own),
        )
    return mask


def read(hdus: Hdus, idx, gain, backend) -> Exposure:
    path, hdul = hdus.path, hdus.hdul
    sci = hdul[idx] if idx is not None else hdus.get("SCI")
    header = sci.header.copy()
    if sci is not hdul[0]:
        header.extend(hdul[0].header.copy(strip=True), unique=True)
    image = plane(path, sci, "SCI", np.float32)
    unc = kind = None
    if hdus.get("ERR") is not None:
        unc, kind = plane(path, hdus.get("ERR"), "ERR", np.float64, shape=image.shape), "std"
    elif any(hdus.get(v) is not None for v in ("VAR_POISSON", "VAR_RNOISE", "VAR_FLAT")):
        unc, kind = (
            sum(
                plane(path, hdus.get(v), v, np.float64, shape=image.shape)
                for v in ("VAR_POISSON", "VAR_RNOISE", "VAR_FLAT")
                if hdus.get(v) is not None
            ),
            "var",
        )
    else:
        warn(
            path,
            "JWST image without ERR or VAR_* extensions: variance estimated from the sky noise "
            "(give the noise map separately, e.g. the ERR extension of the full product)",
            VarianceEstimatedWarning,
        )
    planes = MaskPlanes()  # afw's defaults, as for any image: DQ flags land on them
    flags = None
    if hdus.get("DQ") is not None:
        dq_hdu = hdus.get("DQ")
        dq = load(path, dq_hdu)
        if dq is None or dq.shape != image.shape:
            raise FitsReadError(
                f"{path}[DQ]: shape {None if dq is None else dq.shape} differs from the SCI "
                f"shape {image.shape}"
            )
        flags = dq_to_mask(dq, planes, path)
    wht = hdus.get("WHT")
    if wht is not None:
        w = plane(path, wht, "WHT", np.float64, shape=image.shape)
        nodata = ~(np.isfinite(w) & (w > 0))
        if nodata.any():
            flags = np.zeros(image.shape, np.int64) if flags is None else flags
            flags[nodata] |= np.int64(1) << np.int64(planes["NO_DATA"])
    # DO_NOT_USE & co. (NO_DATA) pixels keep their values; the mask says not to use them.
    wcs = read_wcs(path, sci.header, hdul)
    meta = strip(header, XY0_KEYS, MP_KEYS, *([WCS_KEYS] if wcs is not None else []))
    return assemble(
        image,
        unc,
        kind,
        flags,
        None,
        header,
        meta,
        gain,
        backend,
        xy0=read_xy0(sci.header),
        planes=planes,
        path=path,
        wcs=wcs,
        psf=gpudiff_psf(hdul),
        photo_calib=read_photocalib(hdul[0].header),
    )
