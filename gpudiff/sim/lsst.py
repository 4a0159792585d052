"""LSST's ``ip_diffim`` test-image generator ``makeTestImage`` (docs/algorithms.md §11.1)."""

from __future__ import annotations

from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from ..errors import InvalidInputError
from ..image.exposure import Exposure, PhotoCalib
from ..image.masked_image import Box
from ..image.maskplanes import MaskPlanes
from ..image.psf import GaussianPsf
from ._util import _as_box, _box_centre, _count, _finite_number, _grow, _is_int
from .background import _eval_background
from .psfspec import _renderer_from_psf
from .render import _Canvas, _render_points
from .wcs import _tan_wcs


def _lsst_fake_wcs(box: Box) -> WCS:
    """LSST's ``makeFakeWcs``: an affine TAN WCS (CRPIX in parent pixels 123.45, 678.9)."""
    return _tan_wcs(
        box,
        (0.1, 0.1),
        (123.45, 678.9),
        [[5.19513851e-05, -2.81124812e-07], [-3.25186974e-07, -5.19112119e-05]],
    )


def _detect_positive(
    image: np.ndarray,
    variance: np.ndarray,
    sigma: float,
    threshold: float = 5.0,
    n_sigma_to_grow: float = 2.4,
    n_sigma_for_kernel: float = 7.0,
) -> np.ndarray:
    """An approximation of LSST's default SourceDetectionTask (positive polarity).

    Smooth with a unit-sum Gaussian of the PSF σ (width 2·int(7σ + 0.5) + 1), smooth the
    variance with its square, threshold at ``threshold``·√(smoothed variance) per pixel
    ("pixel_stdev"), ignore the border where the kernel does not fit, and grow the
    detections isotropically by int(2.4σ + 0.5) pixels.
    """
    from scipy import ndimage, signal

    half = int(n_sigma_for_kernel * sigma + 0.5)
    g = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    k = np.outer(g, g)
    k /= k.sum()
    sm = signal.fftconvolve(image, k, mode="same")
    vs = signal.fftconvolve(variance, k * k, mode="same")
    det = np.zeros(image.shape, dtype=bool)
    inner = (slice(half, image.shape[0] - half), slice(half, image.shape[1] - half))
    vi = vs[inner]
    ok = vi > 0
    det_inner = np.zeros(vi.shape, dtype=bool)
    det_inner[ok] = sm[inner][ok] > threshold * np.sqrt(vi[ok])
    det[inner] = det_inner
    grow = int(n_sigma_to_grow * sigma + 0.5)
    if grow > 0 and det.any():
        yy, xx = np.mgrid[-grow : grow + 1, -grow : grow + 1]
        det = ndimage.binary_dilation(det, structure=(xx * xx + yy * yy) <= grow * grow)
    return det


def make_test_image(
    seed: int = 5,
    n_src: int = 20,
    psf_size: float = 2.0,
    noise_level: float = 5.0,
    noise_seed: int = 6,
    flux_level: float = 500.0,
    flux_range: float = 2.0,
    kernel_size: int = 31,
    template_border_size: int = 0,
    background: Any = None,
    x_size: int = 256,
    y_size: int = 256,
    x0: int = 12345,
    y0: int = 67890,
    calibration: float = 1.0,
    apply_calibration: bool = False,
    detect: bool = True,
) -> tuple[Exposure, Table]:
    """LSST's ``ip_diffim`` test-image generator ``makeTestImage`` (docs/algorithms.md §11.1).

    Steps, as in LSST:

    1. The box (x0, y0, x_size, y_size) is grown by ``template_border_size``;
       buffer = kernel_size//2 + template_border_size + 1; with
       ``rng = numpy.random.RandomState(seed)``: x = rng.rand(n)·(W − 2·buffer) + buffer
       + X0, then y likewise, then flux = (rng.rand(n)·(flux_range − 1) + 1)·flux_level.
    2. Each source is a point-sampled round Gaussian of σ = ``psf_size`` on a
       ``kernel_size``² stamp at its sub-pixel position, unit sum × flux
       (``GaussianPsf(sigma, size=kernel_size).compute_image(x, y)``); sky 0, no Poisson
       noise.
    3. noise = RandomState(noise_seed).randn(H, W)·noise_level, minus its mean, is added.
    4. variance = √|model| + noise_level² (LSST's quirk, kept).
    5. DETECTED is set by an approximation of the default SourceDetectionTask (5σ
       ``pixel_stdev`` on the PSF-smoothed image, grown by 2.4σ) when ``detect``.
    6. The PSF is GaussianPsf(σ = psf_size, size = kernel_size) (point-sampled); the WCS
       is LSST's fake affine TAN WCS (CD ≈ 5.195e−5 deg/px).
    7. ``background`` (a callable b(x, y) of parent coordinates, e.g. a
       :class:`ChebyshevBackground`, or anything :class:`ObsConfig` accepts) is added to
       the image only.
    8. The masked image is divided by ``calibration`` (variance by its square) and the
       PhotoCalib is ``calibration``; with ``apply_calibration`` it is multiplied back
       (image in nJy) and the PhotoCalib becomes 1.

    Differences from LSST: afw's random streams and its Lanczos-shifted
    ``SingleGaussianPsf.computeImage`` cannot be reproduced bit for bit; positions and
    fluxes do follow the same RandomState calls, and stamps are the analytic Gaussian
    sampled at the shifted pixel centres.  The detection is approximate.

    Returns
    -------
    exposure : Exposure
    catalog : astropy.table.Table
        The truth catalog: ``id``, ``x``, ``y`` (parent), ``flux`` (LSST instFlux),
        ``flux_err`` (= 20, instFluxErr), ``footprint_radius`` (= 5σ) and the flags
        ``is_isolated``, ``is_primary``, ``is_unresolved`` (all True).
    """
    n_src = _count("n_src", n_src)
    psf_size = _finite_number("psf_size", psf_size, positive=True)
    noise_level = _finite_number("noise_level", noise_level, nonneg=True)
    flux_level = _finite_number("flux_level", flux_level)
    flux_range = _finite_number("flux_range", flux_range)
    calibration = _finite_number("calibration", calibration, positive=True)
    if not _is_int(kernel_size) or kernel_size < 3 or kernel_size % 2 == 0:
        raise InvalidInputError(f"kernel_size must be an odd integer >= 3, got {kernel_size!r}")
    border = _count("template_border_size", template_border_size)
    box = _grow(_as_box((y_size, x_size), (x0, y0)), border)
    buffer = kernel_size // 2 + border + 1
    W, H = box.width, box.height
    if W - 2 * buffer <= 0 or H - 2 * buffer <= 0:
        raise InvalidInputError(
            f"image {x_size}x{y_size} is too small for kernel_size {kernel_size}"
        )
    for name, s in (("seed", seed), ("noise_seed", noise_seed)):
        if not _is_int(s) or s < 0:
            raise InvalidInputError(f"{name} must be a non-negative integer, got {s!r}")
    rng = np.random.RandomState(seed)
    rng_noise = np.random.RandomState(noise_seed)
    x_loc = rng.rand(n_src) * (W - 2 * buffer) + buffer + box.x0
    y_loc = rng.rand(n_src) * (H - 2 * buffer) + buffer + box.y0
    flux = (rng.rand(n_src) * (flux_range - 1.0) + 1.0) * flux_level

    psf = GaussianPsf(sigma=psf_size, size=kernel_size, average_position=_box_centre(box))
    canvas = _Canvas(box)
    _render_points(canvas, _renderer_from_psf(psf), x_loc, y_loc, flux)
    model = canvas.image()
    noise = rng_noise.randn(H, W) * noise_level
    noise -= np.mean(noise)
    variance = np.sqrt(np.abs(model)) + noise_level**2
    image = model + noise

    mp = MaskPlanes()
    mask = np.zeros((H, W), dtype=np.int32)
    if detect:
        mask[_detect_positive(image, variance, psf_size)] |= mp.bitmask("DETECTED")
    if background is not None:
        image += _eval_background(background, box)
    image /= calibration
    variance /= calibration**2
    photo = PhotoCalib(calibration)
    if apply_calibration:
        image *= calibration
        variance *= calibration**2
        photo = PhotoCalib(1.0)

    hdr = fits.Header()
    hdr["SIMSEED"] = (int(seed), "makeTestImage source seed")
    hdr["NOISESD"] = (int(noise_seed), "makeTestImage noise seed")
    hdr["BAND"] = "g"
    hdr["FILTER"] = "g"
    exposure = Exposure.from_arrays(
        image,
        variance,
        mask,
        xy0=(box.x0, box.y0),
        mask_planes=mp,
        psf=psf,
        wcs=_lsst_fake_wcs(box),
        photo_calib=photo,
        metadata=hdr,
        backend="numpy",
    )
    cat = Table()
    cat["id"] = np.arange(1, n_src + 1, dtype=np.int64)
    cat["x"] = x_loc
    cat["y"] = y_loc
    cat["flux"] = flux
    cat["flux_err"] = np.full(n_src, 20.0)
    cat["footprint_radius"] = np.full(n_src, 5.0 * psf_size)
    cat["is_isolated"] = np.ones(n_src, dtype=bool)
    cat["is_primary"] = np.ones(n_src, dtype=bool)
    cat["is_unresolved"] = np.ones(n_src, dtype=bool)
    cat.meta.update(
        {
            "seed": int(seed),
            "noise_seed": int(noise_seed),
            "lsst_names": "flux=truth_instFlux, flux_err=truth_instFluxErr",
        }
    )
    return exposure, cat
