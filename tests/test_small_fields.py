"""Small fields and few stars (issue 14 item 5).

The subtraction lowers the spatial orders of the kernel and background when the usable
kernel candidates cannot constrain them (down to a constant kernel and background), records
the orders used, and fails only when not even a constant kernel is constrained, saying how
many candidates each selection test removed.
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from gpudiff.errors import InsufficientKernelSourcesError
from gpudiff.image import Box, Exposure, GaussianPsf, estimate_psf, read_exposure
from gpudiff.psfmatch.candidates import selection_counts
from gpudiff.psfmatch.fit import check_kernel_sum
from gpudiff.tasks import AlardLuptonPreconvolveSubtractTask, AlardLuptonSubtractTask

# As tests/conftest.py (its fixture is function-scoped; the cutouts are loaded once here).
SHARED_DATA = Path(
    os.environ.get("GPUDIFF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)

EPOCHS = ("04", "18")
LETTERS = "abcde"


def _gauss_field(shape, xs, ys, fluxes, sigma, sky_sigma, rng):
    """Sky noise plus Gaussian stars of total ``fluxes`` (analytic pixel integrals would be
    overkill: σ ≥ 1.5 px is well sampled)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    img = np.zeros(shape)
    for x, y, f in zip(xs, ys, fluxes):
        r2 = (xx - x) ** 2 + (yy - y) ** 2
        img += f / (2 * np.pi * sigma**2) * np.exp(-r2 / (2 * sigma**2))
    var = np.full(shape, sky_sigma**2) + img  # sky plus photon noise (gain 1)
    return img + rng.normal(0.0, 1.0, shape) * np.sqrt(var), var


def test_few_star_field_gives_constant_kernel_with_known_sum(caplog):
    """Three stars on a 256² field: the default spatial orders (kernel 1, background 2:
    LSST's subtraction defaults) are lowered to a constant kernel and background, and the
    kernel recovers the Gaussian-to-Gaussian matching kernel's sum (the flux ratio 1.3)."""
    rng = np.random.default_rng(14)
    shape = (256, 256)
    xs, ys = np.array([70.0, 180.0, 128.0]), np.array([80.0, 100.0, 185.0])
    flux = np.array([2.0e5, 1.5e5, 1.0e5])
    ratio = 1.3  # science / template flux: the kernel sum to recover
    s_t, s_s = 1.6, 2.4  # template sharper: convolveTemplate
    t_img, t_var = _gauss_field(shape, xs, ys, flux, s_t, 10.0, rng)
    s_img, s_var = _gauss_field(shape, xs, ys, flux * ratio, s_s, 10.0, rng)
    tmpl = Exposure.from_arrays(
        t_img.astype(np.float32), t_var.astype(np.float32), psf=GaussianPsf(sigma=s_t)
    )
    sci = Exposure.from_arrays(
        s_img.astype(np.float32), s_var.astype(np.float32), psf=GaussianPsf(sigma=s_s)
    )
    with caplog.at_level(logging.WARNING, logger="gpudiff.psfmatch"):
        res = AlardLuptonSubtractTask(backend="numpy").run(tmpl, sci)
    m = res.metadata
    assert (m["spatial_kernel_order_used"], m["spatial_bg_order_used"]) == (0, 0)
    assert any("order 1 -> 0" in r.getMessage() for r in caplog.records)
    assert not res.psf_matching_kernel.is_spatially_varying
    # Stars of S/N ~ 400-900 in both images: the kernel sum of a 3-star constant fit is
    # good to ~0.3 % (1/Σ S/N); 1 % is the tolerance.
    assert abs(m["kernel_sum"] / ratio - 1.0) < 0.01
    # The photometric check agrees with it (the stars' own aperture flux ratio).
    assert not m["kernel_sum_check_failed"]
    assert abs(m["kernel_star_flux_ratio"] / ratio - 1.0) < 0.01
    # The check fires on a disagreement over 2 % that the stars' ratio error cannot explain
    # (a kernel 5 % off), and not on one within 2 %.
    fit = res.kernel_fit
    used = np.flatnonzero(fit.used)
    ks = m["kernel_sum"]
    with caplog.at_level(logging.WARNING, logger="gpudiff.psfmatch"):
        assert not check_kernel_sum(fit.kernel, fit.candidates, used, ks * 1.05, 0.001 * ks)
    assert any("disagrees with the kernel stars" in r.getMessage() for r in caplog.records)
    assert check_kernel_sum(fit.kernel, fit.candidates, used, ks * 1.015, 0.001 * ks)
    # ... nor on one within 3 standard errors of a poorly measured ratio.
    assert check_kernel_sum(fit.kernel, fit.candidates, used, ks * 1.05, 0.03 * ks)


def test_selection_error_counts_each_test():
    """A selection that leaves too few kernel sources says how many each test removed,
    and the counts add up to the rows dropped."""
    t = Table(
        {
            "x": [10.0, 50.0, 60.0, 70.0, 80.0, 90.0],
            "y": [50.0] * 6,
            "snr": [50.0, 5.0, 50.0, 50.0, 800.0, 50.0],
            "is_extended": [False, False, True, False, False, False],
            "isolated": [True, True, True, False, True, True],
            "flag_edge": [False, False, False, False, False, True],
        }
    )
    c = selection_counts(
        t, Box(0, 0, 128, 128), snr_min=10, snr_max=500, edge_buffer=21, exclude_flags=["flag_edge"]
    )
    assert c == {
        "flags/masks": 1,
        "S/N outside 10-500": 2,
        "extended (size/shape)": 1,
        "not isolated (blended)": 1,
        "too close to the edge": 1,
        "passed": 0,
    }
    assert sum(c.values()) == len(t)
    sci = Exposure.from_arrays(
        np.zeros((128, 128), np.float32),
        np.ones((128, 128), np.float32),
        psf=GaussianPsf(sigma=2.0),
    )
    with pytest.raises(InsufficientKernelSourcesError, match="S/N outside 10-500': 2"):
        AlardLuptonSubtractTask(backend="numpy").select_sources(sci, sci, t, 21, 0)


@pytest.fixture(scope="module")
def decam():
    """The ten DECam cutouts with PSFs estimated from their own stars (~8 per frame)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not present at {SHARED_DATA}")
    d = SHARED_DATA / "decam_sfft_mini" / "input"
    out = {}
    for ep, letter in itertools.product(EPOCHS, LETTERS):
        e = read_exposure(d / f"DEC-OBS{ep}{letter}.mini.fits", backend="numpy")
        # min_stars=3: a 256² cutout has 3-4 usable stars (the CLI's small-cutout retry).
        psf = estimate_psf(e, min_stars=3)
        out[ep + letter] = Exposure(e.masked_image, psf, e.wcs, e.photo_calib, e.metadata)
    return out


def test_decam_psf_estimates_match_headers(decam):
    """The estimated FWHMs agree with the headers' FWHM cards (SExtractor-like) within 12 %
    (measured: 1.3-4.4 % above the header on all ten; 12 % leaves room for the 3-4-star
    estimates' scatter)."""
    ratios = np.array([e.psf.fwhm() / float(e.metadata["FWHM"]) for e in decam.values()])
    assert np.all(np.abs(ratios - 1.0) < 0.12), ratios


@pytest.mark.slow
def test_decam_same_epoch_pairs_run_with_defaults(decam):
    """All 20 same-epoch pairs (2 epochs × the 10 pairs of 5 exposures; the sharper
    exposure of each pair is the template, as ``mode='auto'`` would choose) subtract with the
    task's defaults.  These cutouts have 3-6 usable kernel candidates, fewer than the
    default model's 6 background terms, so before issue 14 18 of the 20 failed."""
    n_run, orders = 0, []
    for ep in EPOCHS:
        for a, b in itertools.combinations(LETTERS, 2):
            ea, eb = decam[ep + a], decam[ep + b]
            tmpl, sci = (ea, eb) if ea.psf.fwhm() <= eb.psf.fwhm() else (eb, ea)
            res = AlardLuptonSubtractTask(backend="numpy").run(tmpl, sci)
            m = res.metadata
            ko, bo = m["spatial_kernel_order_used"], m["spatial_bg_order_used"]
            # Orders lowered only as far as needed: one candidate more than terms.
            n = res.kernel_fit.n_used
            assert 0 <= ko <= 1 and 0 <= bo <= 2
            assert n >= (ko + 1) * (ko + 2) // 2 + 1 and n >= (bo + 1) * (bo + 2) // 2 + 1
            # Exposures minutes apart, same exposure time: the kernel sum is the
            # transparency ratio, within 10 % of 1 (measured 0.93-1.05).
            assert 0.9 < m["kernel_sum"] < 1.1
            d = res.difference.masked_image
            good = d.good_pixels(("NO_DATA", "EDGE", "SAT", "BAD", "CR", "DETECTED"))
            z = (d.image / np.sqrt(d.variance))[good]
            robust = 1.4826 * np.median(np.abs(z - np.median(z)))
            # Sky noise of the difference within 15 % of its variance plane (a 256² cutout
            # resampled onto a common grid: correlated noise the plane does not describe).
            assert abs(robust - 1.0) < 0.15
            orders.append((ko, bo))
            n_run += 1
    assert n_run == 20
    assert (0, 0) in orders  # at least one pair needed a constant kernel


def test_decam_preconvolve_finds_kernel_sources(decam):
    """The score-image path on OBS04a − OBS18a.  LSST keeps preconvolution kernel sources 3
    kernel sizes (3 × 35 px) from the edge: on a 256² cutout none is left (issue 14: "0
    kernel sources on DECam where plain subtraction works").  It now falls back to the
    stamps' own requirement and fits the kernel on the same stars as plain subtraction."""
    res = AlardLuptonPreconvolveSubtractTask(backend="numpy").run(decam["18a"], decam["04a"])
    assert res.metadata["n_kernel_sources"] >= 3
    # Same exposures minutes apart in the same band: a kernel sum within 10 % of 1
    # (measured 1.067; plain subtraction 1.042).
    assert 0.9 < res.metadata["kernel_sum"] < 1.1
