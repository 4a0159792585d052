"""PSF-optimal signal-to-noise of point sources, and its inverse."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInputError


def _psf_sums(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Σ P² and Σ P³ of a PSF image P (or of each image of a stack)."""
    P = np.asarray(kernel, dtype=np.float64)
    return (P * P).sum(axis=(-2, -1)), (P**3).sum(axis=(-2, -1))


def psf_snr(flux, kernel: np.ndarray, background_variance, gain: float = 1.0):
    """PSF-optimal S/N of point sources of ``flux`` (ADU).

    With P the unit-sum PSF image (``kernel``: (S, S), or a stack (n, S, S) for n
    sources) and the per-pixel variance ``background_variance + |flux|·P/gain`` (ADU²),
    the error of the optimally weighted flux is σ_F² = Σ P² V / (Σ P²)².
    """
    s2, s3 = _psf_sums(kernel)
    f = np.abs(np.asarray(flux, dtype=np.float64))
    var = (np.asarray(background_variance, float) * s2 + f * s3 / gain) / (s2 * s2)
    return f / np.sqrt(var)


def flux_for_snr(snr, kernel: np.ndarray, background_variance, gain: float = 1.0):
    """The point-source flux (ADU) whose PSF-optimal S/N is ``snr`` (inverse of :func:`psf_snr`)."""
    s2, s3 = _psf_sums(kernel)
    snr = np.asarray(snr, dtype=np.float64)
    if (snr <= 0).any():
        raise InvalidInputError("snr must be > 0")
    # F²/snr² = (B·s2 + F·s3/g)/s2²  ⇔  a·F² − c·F − b = 0
    a = 1.0 / (snr * snr)
    b = np.asarray(background_variance, float) / s2
    c = s3 / (gain * s2 * s2)
    return (c + np.sqrt(c * c + 4 * a * b)) / (2 * a)
