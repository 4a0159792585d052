"""Realistic simulated exposures, with truth, for tests, benchmarks and the demo.

Everything here is deterministic: every function takes a ``seed`` (an int, or a tuple of
ints), and independent parts of a simulation draw from independent streams derived from
it (``numpy.random.default_rng([*seed, stream])``), so that, for example, switching cosmic
rays on does not change the noise realization.

Units
-----
All fluxes, sky levels, backgrounds and pixel values are in **ADU** (the image units).
A source's ``flux`` is the sum of its noiseless model over all pixels (its stamp is
normalized to exactly that).  The detector converts ADU to electrons with ``gain``
(e⁻/ADU); photon noise is Poisson in electrons, the read noise ``read_noise`` is given in
electrons, and the image is then converted back to ADU.

Coordinates
-----------
Positions are **parent** pixel coordinates (x = column, y = row; pixel ``[0, 0]`` of an
array is parent pixel ``xy0``) with the pixel-centre convention: integer values are pixel
centres, so an image of width W covers x ∈ [x0 − 0.5, x0 + W − 0.5).

Building blocks
---------------
- :class:`PsfSpec` — a Gaussian or Moffat PSF, constant or with a FWHM that varies over
  the field; stars are rendered from the analytic profile at their exact sub-pixel
  position, pixel-integrated by oversampling, and the exposure carries a PSF model that
  describes exactly what was rendered (:class:`~gpudiff.image.GaussianPsf` /
  :class:`~gpudiff.image.MoffatPsf` with the same size and oversampling, or a
  :class:`~gpudiff.image.GridPsf` realized on a grid for a varying PSF).  Any
  :class:`~gpudiff.image.Psf`, or a callable ``(x, y) -> Psf``, is accepted too.
- :class:`FieldConfig` and :func:`make_catalog` — a source population (stars with a
  power-law flux distribution, optional Sérsic galaxies, optional minimum separation).
- :class:`ObsConfig` — the observing conditions and detector: PSF, sky, background
  (:class:`PolynomialBackground`, :class:`ChebyshevBackground` or any callable), gain,
  read noise, saturation, bad columns, cosmic rays, NO_DATA regions, satellite
  :class:`Trail` s and :class:`Ghost` s, WCS and calibration.
- :func:`simulate_exposure` — one exposure of a catalog (possibly shifted and scaled),
  returning a :class:`SimResult` with the noiseless model, the background and truth.
- :func:`simulate_pair` — a science/template pair of the same field with different PSFs
  and noise, a sub-pixel misregistration, an optional photometric scaling, an optional
  template border and injected transients, returning a :class:`SimPair`.
- :func:`realistic_raw_pair` — a pair that carries what raw data carries: garbage-valued
  bad columns, saturated stars with Moffat wings beyond the matching kernel, a satellite
  trail, a residual sky plane of ~0.3σ, masked and unmasked cosmic rays, a NO_DATA strip,
  and optionally a field with fewer than 10 usable stars.
- :func:`make_test_image` — LSST's ``ip_diffim/tests/utils.makeTestImage``
  (docs/algorithms.md §11.1).

Several epochs of one field (visits, warps, patches) are made by drawing one catalog with
:func:`make_catalog` and calling :func:`simulate_exposure` once per epoch with its own
``obs`` (PSF, background, trails, ...), ``offset``, ``flux_scale`` and ``seed``; a variable
star is a catalog row whose ``flux`` the caller changes between calls.

Performance
-----------
Stars are rendered in batches: the oversampled profiles of a chunk of stars are evaluated
with NumPy broadcasting, reduced to pixels, normalized, and scattered into the image with
one ``np.bincount`` per few million pixels.  A 4096² exposure with 5000 stars takes a few
seconds on two CPU cores, most of it in the Poisson draw.  Only a generic
:class:`~gpudiff.image.Psf` without an analytic profile (``ImagePsf``, ``GridPsf``) or a
user callable falls back to a (cheap) Python loop over stars.
"""

from .artefacts import Ghost, Trail
from .background import ChebyshevBackground, PolynomialBackground
from .catalog import make_catalog
from .config import FieldConfig, ObsConfig
from .exposure import SimResult, simulate_exposure
from .lsst import make_test_image
from .pair import SimPair, simulate_pair
from .psfspec import PsfSpec
from .realistic import realistic_raw_pair
from .snr import flux_for_snr, psf_snr
from .wcs import make_wcs

__all__ = [
    "PsfSpec",
    "PolynomialBackground",
    "ChebyshevBackground",
    "Trail",
    "Ghost",
    "FieldConfig",
    "ObsConfig",
    "SimResult",
    "SimPair",
    "make_catalog",
    "make_wcs",
    "simulate_exposure",
    "simulate_pair",
    "realistic_raw_pair",
    "make_test_image",
    "flux_for_snr",
    "psf_snr",
]
