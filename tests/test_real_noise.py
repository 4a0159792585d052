"""What real single exposures carry that LSST's calexp/coadd pairs do not (issue 14).

- Noise correlated between neighbouring pixels (resampled or drizzled inputs: the shared
  DECam cutouts, JWST i2d mosaics).  The variance plane holds the per-pixel variance, but
  the PSF-smoothed detection image is noisier than it predicts, and a 5σ threshold on the
  variance plane alone (LSST's ``pixel_stdev``) passes noise peaks.
- Cosmic rays in a single-exposure template (LSST's templates are coadds).

Each test also runs the LSST behaviour (the gpudiff option off) and asserts that it shows
the problem, so the test fails if the fix stops doing anything.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from gpudiff.image import Exposure, GaussianPsf
from gpudiff.sim import PsfSpec, simulate_pair
from gpudiff.tasks import AlardLuptonSubtractConfig, AlardLuptonSubtractTask
from gpudiff.tasks.detect_and_measure import DetectAndMeasureConfig, DetectAndMeasureTask

PSF_SIGMA = 1.8
CORR_SIGMA = 0.8  # Gaussian smoothing of white noise: a resampling-like correlation


def _correlated_noise(n: int, seed: int) -> np.ndarray:
    """Unit per-pixel variance noise whose neighbours are correlated."""
    w = np.random.default_rng(seed).standard_normal((n, n))
    g = ndimage.gaussian_filter(w, CORR_SIGMA, mode="wrap")
    # Per-pixel variance of a Gaussian-smoothed unit white field is Σg²; rescale to 1.
    k = np.zeros((15, 15))
    k[7, 7] = 1
    k = ndimage.gaussian_filter(k, CORR_SIGMA)
    return (g / np.sqrt((k**2).sum())).astype(np.float32)


def _expected_excess() -> float:
    """√(Σ(P⊗g)² / (Σg² ΣP²)): smoothed-noise std over its variance-plane prediction."""
    n = 41
    d = np.zeros((n, n))
    d[n // 2, n // 2] = 1
    g = ndimage.gaussian_filter(d, CORR_SIGMA)
    p = ndimage.gaussian_filter(d, PSF_SIGMA)
    pg = ndimage.convolve(p, g, mode="constant")
    return float(np.sqrt((pg**2).sum() / ((g**2).sum() * (p**2).sum())))


def _difference(noise: np.ndarray, xs, ys, flux) -> Exposure:
    n = noise.shape[0]
    yy, xx = np.mgrid[:n, :n]
    img = noise.copy()
    for x, y in zip(xs, ys):
        img += (
            flux
            * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * PSF_SIGMA**2))
            / (2 * np.pi * PSF_SIGMA**2)
        ).astype(np.float32)
    return Exposure.from_arrays(
        img, np.ones_like(img), psf=GaussianPsf(sigma=PSF_SIGMA), metadata={}
    )


def _truth_match(cat, xs, ys, r=2.0):
    d = np.hypot(np.asarray(cat["x"])[:, None] - xs[None], np.asarray(cat["y"])[:, None] - ys[None])
    return d.min(axis=1) < r if len(cat) else np.zeros(0, bool)


def test_correlated_noise_threshold_in_measured_noise_units():
    """1 Mpix of correlated noise with 12 point sources of S/N ≈ 25 (in correlated-noise
    units).  Measured: excess 2.57 (theory 2.58, about JWST i2d's); 1 false clean source
    with the measured-noise threshold, 2,049 with the variance-plane threshold alone (LSST);
    median S/N of the injections 25.2."""
    n = 1024
    rng = np.random.default_rng(3)
    xs = rng.uniform(60, n - 60, 12)
    ys = rng.uniform(60, n - 60, 12)
    excess_theory = _expected_excess()
    assert excess_theory > 1.3  # the scenario is what it claims to be
    # PSF-optimal S/N of flux F on unit white noise is F·√(ΣP²) = F / (2√π σ).
    flux = 25 * excess_theory * 2 * np.sqrt(np.pi) * PSF_SIGMA
    diff = _difference(_correlated_noise(n, 7), xs, ys, flux)

    cat = DetectAndMeasureTask(backend="numpy").run(diff).dia_sources
    real = _truth_match(cat, xs, ys)
    # The excess is measured, not assumed: within 3 % of the analytic value.
    assert cat.meta["noise_rescaled"]
    assert abs(cat.meta["noise_excess"] / excess_theory - 1) < 0.03, cat.meta["noise_excess"]
    # All injections found, clean; at most 2 false sources per Mpix (issue 14's target).
    assert _truth_match(cat[cat["clean"]], xs, ys).size and real.sum() == 12
    false_clean = int((cat["clean"] & ~real).sum())
    assert false_clean <= 2, false_clean
    # S/N in measured-noise units: the injections' S/N is 25 ± a few.
    snr = np.asarray(cat["snr"])[real]
    assert abs(np.median(snr) / 25 - 1) < 0.15, np.median(snr)

    lsst = DetectAndMeasureConfig(max_noise_excess=None)
    cat0 = DetectAndMeasureTask(lsst, backend="numpy").run(diff).dia_sources
    # The variance plane alone: 5σ is ~2σ of the real noise, thousands of false peaks.
    assert int((cat0["clean"] & ~_truth_match(cat0, xs, ys)).sum()) > 50


def test_white_noise_keeps_lsst_threshold():
    """White noise with a right variance plane: the excess is 1 within 3 %, nothing is
    rescaled, and the catalog is the one LSST's threshold gives."""
    n = 512
    noise = np.random.default_rng(11).standard_normal((n, n)).astype(np.float32)
    diff = _difference(noise, [100.0, 300.0], [200.0, 400.0], 300.0)
    cat = DetectAndMeasureTask(backend="numpy").run(diff).dia_sources
    assert abs(cat.meta["noise_excess"] - 1) < 0.03 and not cat.meta["noise_rescaled"]
    lsst = DetectAndMeasureConfig(max_noise_excess=None)
    cat0 = DetectAndMeasureTask(lsst, backend="numpy").run(diff).dia_sources
    assert len(cat) == len(cat0) and np.allclose(cat["psf_flux"], cat0["psf_flux"])


def test_template_cosmic_rays_are_masked_not_sources():
    """Sharp hits in a single-exposure template.  Convolved with the matching kernel they
    become PSF-like negative sources that nothing on the difference can tell from a
    vanished star (LSST's coadd templates have none).  gpudiff finds them on the template
    first: no clean DIA source within 3 px of a ray; with the option off most rays are
    clean negative sources."""
    pair = simulate_pair(
        size=384,
        seed=21,
        science=dict(psf=PsfSpec(kind="moffat", fwhm=4.2, beta=3.0), sky_subtracted=True),
        template=dict(psf=PsfSpec(kind="moffat", fwhm=3.0, beta=3.0), sky_subtracted=True),
        n_stars=120,
        n_transients=0,
    )
    tmpl = pair.template
    mi = tmpl.masked_image
    img = np.array(mi.image, copy=True)
    sigma = float(np.sqrt(np.median(mi.variance)))
    rng = np.random.default_rng(5)
    stars = np.c_[np.asarray(pair.truth["x"]), np.asarray(pair.truth["y"])]
    rays = []
    while len(rays) < 10:
        x, y = rng.uniform(40, 344, 2)
        if np.hypot(*(stars - (x, y)).T).min() > 12:
            rays.append((x, y))
    for x, y in rays:  # one- and two-pixel hits of 40-80σ
        i, j = int(y) - mi.xy0[1], int(x) - mi.xy0[0]
        img[i, j] += rng.uniform(40, 80) * sigma
        if rng.uniform() < 0.5:
            img[i, j + 1] += rng.uniform(20, 40) * sigma
    hit = Exposure.from_arrays(
        img,
        np.array(mi.variance),
        np.array(mi.mask),
        xy0=mi.xy0,
        mask_planes=mi.mask_planes,
        psf=tmpl.psf,
        wcs=tmpl.wcs,
        metadata=tmpl.metadata,
    )
    rx, ry = np.array(rays).T

    def clean_on_rays(cfg):
        res = AlardLuptonSubtractTask(cfg, backend="numpy").run(hit, pair.science)
        cat = DetectAndMeasureTask(backend="numpy").run(res.difference).dia_sources
        return int(_truth_match(cat[cat["clean"]], rx, ry, 3.0).sum())

    assert clean_on_rays(AlardLuptonSubtractConfig()) == 0
    assert clean_on_rays(AlardLuptonSubtractConfig(find_template_cosmic_rays=False)) >= 5
