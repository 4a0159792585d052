"""Plain FITS images (a DECam cutout, an HST or foreign image): the first HDU with 2-D data.

The variance, which such a file lacks, is :func:`estimate_variance`'s (robust sky noise)²
+ max(image − sky, 0)/gain, the latter with ``gain`` or a ``GAIN`` card (else mean
``GAINA``/``GAINB``); cards ``GDVAREST``, ``GDSKYLEV``, ``GDSKYSIG``, ``GDGAIN`` record it.
Non-finite pixels get ``NO_DATA``, a NaN image and +inf variance (LSST's no-data
convention); the metadata lose the WCS, xy0 and mask-plane cards.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from ..exposure import Exposure
from ..maskplanes import MaskPlanes
from ._common import VarianceEstimatedWarning, gain_from, log, plane, warn

__all__ = ["estimate_variance", "variance_plane", "assemble"]

NAME = "plain"


def estimate_variance(image, gain: float | None = None) -> tuple[np.ndarray, float, float]:
    """Estimate the variance of an image: σ_sky² + max(image − sky, 0)/gain, +inf where non-finite.

    The Poisson term needs ``gain`` (e⁻/ADU).  ``sky`` and ``σ_sky`` are the median and the
    ``mad_std`` of the finite pixels iteratively clipped at 3.5σ: ≈0.6 % low in σ² for pure
    noise (3σ is ≈2.6 % low), while clipping most source wings (4σ is ≈2 % high on a field).

    Returns
    -------
    variance : float32 array
    sky, sigma : float (NaN when no pixel is finite)
    """
    from astropy.stats import sigma_clipped_stats

    img = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(img)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # no finite pixel: NaN statistics, and all variance +inf below
        _, sky, sigma = sigma_clipped_stats(
            img[finite], sigma=3.5, maxiters=10, cenfunc="median", stdfunc="mad_std"
        )
    var = np.full(img.shape, float(sigma) ** 2)
    if gain is not None:
        var[finite] += np.clip(img[finite] - sky, 0.0, None) / float(gain)
    var[~finite] = np.inf
    return var.astype(np.float32), float(sky), float(sigma)


def variance_plane(path: str, var_hdu, image, metadata, layout: str) -> np.ndarray:
    """The file's VARIANCE plane, or (none in the file) :func:`estimate_variance`'s.

    A file that has a VARIANCE HDU is never re-estimated.  An estimate is recorded in
    ``metadata`` (``GDVAREST``) and announced with a warning naming ``layout``, so a
    variance the file did not carry is never taken silently.
    """
    if var_hdu is not None:
        return plane(path, var_hdu, "VARIANCE", np.float32, shape=image.shape)
    variance, _, sigma = estimate_variance(image)
    metadata["GDVAREST"] = ("sky", "variance estimated by gpudiff")
    warn(
        path,
        f"{layout} file without a VARIANCE HDU: variance estimated from the sky noise "
        f"(sigma {sigma:.4g})",
        VarianceEstimatedWarning,
    )
    return variance


def assemble(
    image,
    unc,
    kind,
    flags,
    bad,
    header,
    meta,
    gain,
    backend,
    *,
    xy0,
    planes: MaskPlanes | None = None,
    path: str = "",
    **kwargs,
) -> Exposure:
    """Exposure from one image and what came with it: σ/σ²/1/σ² ``unc`` (``kind`` std/var/ivar;
    None: estimated, and said so), bit ``flags`` named by ``planes`` (default: the header's),
    ``bad`` → BAD; pixels without a finite value or a usable variance → NO_DATA."""
    planes = MaskPlanes.from_header(header) if planes is None else planes
    mask = np.zeros(image.shape, planes.dtype) if flags is None else flags
    if bad is not None:
        planes.add("BAD")
        mask[bad & (mask == 0)] |= mask.dtype.type(planes.bitmask("BAD"))
    if unc is not None:
        with np.errstate(divide="ignore", invalid="ignore"):  # ivar <= 0 means no data: +inf
            variance = (
                unc * unc
                if kind == "std"
                else unc
                if kind == "var"
                else np.where(unc > 0, 1.0 / unc, np.inf)
            ).astype(np.float32)
    else:
        g = gain if gain is not None else gain_from(header)
        variance, sky, sigma = estimate_variance(image, g)
        meta["GDVAREST"] = ("sky+poisson" if g else "sky", "variance estimated by gpudiff")
        for key, v, what in (
            ("GDSKYLEV", sky, "sky level"),
            ("GDSKYSIG", sigma, "sky noise"),
            ("GDGAIN", g, "gain"),
        ):
            if v is not None and math.isfinite(v):  # FITS cards cannot hold NaN
                meta[key] = (v, f"{what} of the estimated variance")
        log.info(
            "%s: no noise in the file; variance estimated (%s, sky sigma %.4g%s)",
            path or "image",
            meta["GDVAREST"],
            sigma,
            f", gain {g:g}" if g else "",
        )
    # A pixel without a finite value or without a usable (> 0, finite) uncertainty carries no
    # information: flag it NO_DATA rather than hand a task an unmasked zero/inf variance.
    with np.errstate(invalid="ignore"):
        nodata = ~np.isfinite(image) | ~(np.isfinite(variance) & (variance > 0))
    if nodata.any():
        planes.add("NO_DATA")
        mask = mask.astype(planes.dtype)
        mask[nodata] |= mask.dtype.type(planes.bitmask("NO_DATA"))
        image[nodata], variance[nodata] = np.nan, np.inf
    return Exposure.from_arrays(
        image, variance, mask, xy0=xy0, mask_planes=planes, metadata=meta, backend=backend, **kwargs
    )
