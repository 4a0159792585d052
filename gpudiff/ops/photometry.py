"""Forced PSF photometry at given positions (batched over sources)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import Backend, resolve_backend
from ..errors import InvalidInputError
from ..image import MaskedImage, Psf
from .stats import gather_stamps

__all__ = ["forced_psf_flux"]


def forced_psf_flux(
    mi: MaskedImage,
    psf: Psf,
    x: Any,
    y: Any,
    *,
    bad_planes=("NO_DATA", "EDGE", "BAD", "SAT"),
    backend: Backend | str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PSF fluxes at fixed parent positions: F = ΣP·I/ΣP², σ_F = sqrt(ΣP²·V)/ΣP².

    LSST's unweighted PSF-flux estimator (unbiased when the variance comes from the data).
    The PSF model is realized at each source's sub-pixel position; stamp pixels off the
    image, non-finite, or with a ``bad_planes`` bit are left out of the sums.

    Returns
    -------
    flux, flux_err : ndarray (n,)
    flag : bool ndarray (n,)
        True where a pixel inside the PSF core (3×3) was left out, or nothing was usable.
    """
    be = resolve_backend(backend) if backend is not None else mi.backend
    xp = be.xp
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    if x.shape != y.shape:
        raise InvalidInputError("forced photometry needs x and y of equal length")
    n = x.size
    if n == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool)
    size = psf.size
    half = size // 2
    xi, yi = np.floor(x + 0.5).astype(np.int64), np.floor(y + 0.5).astype(np.int64)
    models = np.stack([psf.compute_image(float(a), float(b), size=size) for a, b in zip(x, y)])
    img = mi.image if mi.backend.name == be.name else be.asarray(mi.backend.asnumpy(mi.image))
    var = mi.variance if mi.backend.name == be.name else be.asarray(mi.backend.asnumpy(mi.variance))
    msk = mi.mask if mi.backend.name == be.name else be.asarray(mi.backend.asnumpy(mi.mask))
    rows, cols = yi - mi.xy0[1], xi - mi.xy0[0]
    si, inside = gather_stamps(be, img, rows, cols, half)
    sv, _ = gather_stamps(be, var, rows, cols, half)
    sm, _ = gather_stamps(be, msk, rows, cols, half)
    bm = mi.mask_planes.bitmask_if_present(list(bad_planes))
    good = inside & ((sm & bm) == 0) & xp.isfinite(si) & xp.isfinite(sv)
    P = be.asarray(models) * good
    si = xp.where(good, si, 0).astype(np.float64)
    sv = xp.where(good, sv, 0).astype(np.float64)
    spp = (P * P).sum(axis=(1, 2))
    ok = spp > 0
    denom = xp.where(ok, spp, 1.0)
    flux = xp.where(ok, (P * si).sum(axis=(1, 2)) / denom, xp.nan)
    err = xp.where(ok, xp.sqrt((P * P * sv).sum(axis=(1, 2))) / denom, xp.nan)
    c = half
    core_bad = ~good[:, c - 1 : c + 2, c - 1 : c + 2].all(axis=(1, 2))
    return be.asnumpy(flux), be.asnumpy(err), be.asnumpy(core_bad | ~ok)
