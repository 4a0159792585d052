"""Kernel sanity on the shared JWST NIRCam F200W pair with its WebbPSF models (issue 14 item 6).

Before issue 14 the kernel sum came out 0.815 where the stars' flux ratio is 1.00.  Cause:
the WebbPSF models (detector PSF, FWHM 2.0 px) are narrower than the stars of the drizzled
i2d mosaics (their adaptive-moment trace is 1.49× the model's), so every star was classified
extended and dropped from the kernel sources; the kernel was fitted on the S/N 10-20 compact
sources left, whose noisy template stamps bias a least-squares kernel sum low (errors in the
regressor).  The kernel sources are now judged against the image's own stellar locus when
the PSF model disagrees with it (a departure from LSST, whose extendedness trusts the PSF
model).  Skipped when the shared data are absent.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.io import fits

from gpudiff.image import Exposure, estimate_psf, read_exposure, read_psf
from gpudiff.ops.detection import detect_sources
from gpudiff.psfmatch.candidates import stellar_locus
from gpudiff.tasks import AlardLuptonSubtractTask

STEMS = {
    "template": "jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp",
    "science": "jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp",
}
BAD = ("NO_DATA", "EDGE", "SAT", "BAD", "CR")


def _load(base, stem, psf=True):
    """The i2d stamp with variance = ERR² from its noise map and, optionally, its WebbPSF
    model; pixels without a usable ERR or value are NO_DATA."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "JWST image without ERR": we give it below
        e = read_exposure(base / "input" / f"{stem}.fits", backend="numpy")
    err = fits.getdata(base / "auxiliary" / f"{stem}.noise.fits").astype(np.float64)
    ok = np.isfinite(err) & (err > 0) & np.isfinite(np.asarray(e.image))
    model = read_psf(base / "auxiliary" / f"{stem}.WebbPSF.fits") if psf else None
    ex = Exposure.from_arrays(
        e.image,
        np.where(ok, err**2, np.inf),
        e.mask,
        mask_planes=e.mask_planes,
        psf=model,
        wcs=e.wcs,
        metadata=e.metadata,
    )
    ex.masked_image = ex.masked_image.with_plane_set("NO_DATA", ~ok)
    return ex, err


def _aperture(img, err, x, y, r_ap=7.5, r_in=12.0, r_out=18.0):
    """Flux in a circle of radius 7.5 px (3 FWHM of the ~2.5-px stars) minus the median
    of the 12-18 px annulus, and its error from the noise map."""
    r = int(np.ceil(r_out))
    xi, yi = int(round(x)), int(round(y))
    y0, x0 = max(yi - r, 0), max(xi - r, 0)
    sl = (slice(y0, yi + r + 1), slice(x0, xi + r + 1))
    yy, xx = np.mgrid[sl]
    rr = np.hypot(xx - x, yy - y)
    ap, an = rr <= r_ap, (rr > r_in) & (rr < r_out)
    im, er = img[sl], err[sl]
    return float(np.nansum(im[ap] - np.nanmedian(im[an]))), float(np.sqrt(np.nansum(er[ap] ** 2)))


def _base(shared_data):
    return shared_data / "jwst_nircam_f200w"


def test_jwst_psf_estimate_uses_stars_not_galaxies(shared_data):
    """Without a PSF model, the estimate is built from the stars (FWHM ~2.5 px, the size
    the stars measure: 2.03 px model × √1.49 trace ratio = 2.48 px), not from the
    galaxies that dominate the field (previously ~10 px).  The field holds 2-4 stars of
    S/N ≥ 20, hence min_stars=3 and snr_min=20."""
    base = _base(shared_data)
    for stem in STEMS.values():
        exp, _ = _load(base, stem, psf=False)
        fwhm = estimate_psf(exp, min_stars=3, snr_min=20).fwhm()
        # 12 %: the estimate's star-to-star scatter with 3-4 stars (measured 2.50, 2.69).
        assert abs(fwhm / 2.48 - 1.0) < 0.12, fwhm


@pytest.mark.slow
def test_jwst_kernel_sum_matches_star_flux_ratio(shared_data):
    base = _base(shared_data)
    (tmpl, t_err), (sci, s_err) = _load(base, STEMS["template"]), _load(base, STEMS["science"])
    res = AlardLuptonSubtractTask(backend="numpy").run(tmpl, sci)
    ksum = res.metadata["kernel_sum"]

    # Matched stars: compact sources of the science on the stellar locus (trace within
    # 15 % of it), S/N > 40, off the edge; aperture photometry on both images.
    cat = detect_sources(
        sci.masked_image,
        sci.psf,
        threshold=5.0,
        polarity="positive",
        background="estimate",
        backend="numpy",
    ).catalog
    locus = stellar_locus(cat)
    assert 1.3 < locus < 1.7  # the stars are broader than the WebbPSF model (see above)
    tr = (np.asarray(cat["ixx"]) + np.asarray(cat["iyy"])) / (
        np.asarray(cat["psf_ixx"]) + np.asarray(cat["psf_iyy"])
    )
    stars = cat[
        (np.asarray(cat["snr"]) > 40)
        & (np.abs(tr / locus - 1) < 0.15)
        & ~np.asarray(cat["flag_edge"])
    ]
    assert len(stars) >= 3
    s_img = np.asarray(sci.image, dtype=np.float64)
    t_img = np.asarray(tmpl.image, dtype=np.float64)
    ratios, weights = [], []
    for x, y in zip(stars["x"], stars["y"]):
        fs, es = _aperture(s_img, s_err, x, y)
        ft, et = _aperture(t_img, t_err, x, y)
        q = fs / ft
        ratios.append(q)
        weights.append(1.0 / (q * q * ((es / fs) ** 2 + (et / ft) ** 2)))
    ratios, weights = np.array(ratios), np.array(weights)
    ratio = float((weights * ratios).sum() / weights.sum())
    # Measured: ratio 1.0014 ± 0.0011 (dominated by the S/N-1000 star), kernel sum 0.994.
    assert abs(ksum / ratio - 1.0) < 0.02, (ksum, ratio)

    d = res.difference.masked_image
    good = d.good_pixels(BAD)
    z = (np.asarray(d.image) / np.sqrt(np.asarray(d.variance)))[good]
    robust = 1.4826 * np.median(np.abs(z - np.median(z)))
    # Sky noise of the difference within 10 % of its variance plane (measured 1.06; the
    # deep field's faint galaxies sit in most pixels, so the MAD is the sky's).
    assert abs(robust - 1.0) < 0.10

    # Star residuals: the flux left in the difference at each matched star, in units of the
    # aperture noise measured on the difference itself (MAD of the same aperture and annulus
    # at 400 random positions: the drizzled noise is correlated, so the ERR map under-
    # predicts an aperture's noise 2.8-fold), is at the noise (< 3σ, measured ≤ 1.3σ) for
    # the fainter stars; for the S/N-1000 star it is under 2 % of the star's flux (measured
    # 0.9 %; its shape is not matched to the noise: the visits' PSFs differ in orientation,
    # which no convolution kernel undoes).
    dimg = np.asarray(d.image, dtype=np.float64)
    dimg = np.where(good, dimg, np.nan)
    rng = np.random.default_rng(0)
    sky = np.array([_aperture(dimg, s_err, x, y)[0] for x, y in rng.uniform(30, 870, (400, 2))])
    sky = sky[np.isfinite(sky)]
    ap_noise = 1.4826 * np.median(np.abs(sky - np.median(sky)))
    for x, y, snr in zip(stars["x"], stars["y"], stars["snr"]):
        fd, _ = _aperture(dimg, s_err, x, y)
        fs, _ = _aperture(s_img, s_err, x, y)
        if snr > 500:
            assert abs(fd / fs) < 0.02, (x, y, fd / fs)
        else:
            assert abs(fd / ap_noise) < 3.0, (x, y, fd / ap_noise)
