"""The shared real pairs end to end (skipped when ../shared/data is absent).

DECam: science OBS04a (FWHM ≈ 5.2 px) against template OBS18a (≈ 3.9 px), plain FITS with
no PSF (estimated from the ~8 bright stars) and no variance plane (estimated from the sky
noise and the gain).  JWST NIRCam F200W: the two i2d stamps with their WebbPSF models and
noise maps (variance = ERR²).
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from gpudiff.cli import main
from gpudiff.image import Exposure, read_exposure, read_psf
from gpudiff.psfmatch import PsfMatchConfig
from gpudiff.tasks import AlardLuptonSubtractConfig, AlardLuptonSubtractTask

BAD = ("NO_DATA", "EDGE", "SAT", "BAD", "CR")


def _robust(z):
    return 1.4826 * np.median(np.abs(z - np.median(z)))


def _star_chi2(d, xs, ys, r):
    z = d.image / np.sqrt(d.variance)
    good = d.good_pixels(BAD)
    out = []
    for x, y in zip(xs, ys):
        x0, y0 = int(round(x)) - d.xy0[0], int(round(y)) - d.xy0[1]
        if r <= x0 < d.shape[1] - r and r <= y0 < d.shape[0] - r:
            zz, gg = (
                z[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1],
                good[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1],
            )
            if gg.sum() > 10:
                out.append(float(np.mean(zz[gg] ** 2)))
    return np.array(out)


def test_decam_pair_via_cli(shared_data, tmp_path):
    d = shared_data / "decam_sfft_mini" / "input"
    out = tmp_path / "diff.fits"
    cat = tmp_path / "dia.ecsv"
    # A 256² cutout holds ~8 usable stars: a spatially constant kernel and background.
    rc = main(
        [
            "subtract",
            str(d / "DEC-OBS04a.mini.fits"),
            str(d / "DEC-OBS18a.mini.fits"),
            "-o",
            str(out),
            "--mode",
            "auto",
            "--sources-out",
            str(cat),
            "--backend",
            "numpy",
            "--set",
            "make_kernel.spatial_kernel_order=0",
            "--set",
            "make_kernel.spatial_bg_order=0",
        ]
    )
    assert rc == 0
    diff = read_exposure(out)
    assert fits.getheader(out, 0)["GDMODE"] == "convolveTemplate"  # the template is sharper
    dm = diff.masked_image
    good = dm.good_pixels(BAD + ("DETECTED", "DETECTED_NEGATIVE"))
    z = (dm.image / np.sqrt(dm.variance))[good]
    # Sky noise of the difference within 10 % of what its variance plane predicts.
    assert abs(_robust(z) - 1) < 0.10
    # Star residuals at the noise: the brightest stars of the science (from its own
    # detections) have χ²/pixel within 2 FWHM below 2× the sky's (these cutouts were
    # resampled onto a common grid, so residuals of a few per cent of a bright star
    # remain; measured median χ² ratio recorded in the closing note).
    from gpudiff.ops import detect_sources

    sci = read_exposure(d / "DEC-OBS04a.mini.fits")
    det = detect_sources(sci.masked_image, diff.psf, threshold=20).catalog
    chi = _star_chi2(dm, det["x"], det["y"], 10)
    assert len(chi) >= 3 and np.median(chi) / np.mean(z**2) < 2.0


def test_jwst_pair_with_webbpsf_and_noise_maps(shared_data):
    base = shared_data / "jwst_nircam_f200w"
    names = {
        "template": "jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp",
        "science": "jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp",
    }
    exps = {}
    for role, stem in names.items():
        e = read_exposure(base / "input" / f"{stem}.fits")
        err = fits.getdata(base / "auxiliary" / f"{stem}.noise.fits").astype(np.float64)
        ok = np.isfinite(err) & (err > 0)
        var = np.where(ok, err**2, np.inf)
        psf = read_psf(base / "auxiliary" / f"{stem}.WebbPSF.fits")
        exps[role] = Exposure.from_arrays(
            e.image, var, e.mask, mask_planes=e.mask_planes, psf=psf, wcs=e.wcs, metadata=e.metadata
        )
        # pixels without a usable ERR carry no information: NO_DATA (the tasks reject an
        # unmasked pixel with infinite variance rather than guess)
        exps[role].masked_image = exps[role].masked_image.with_plane_set("NO_DATA", ~ok)
    cfg = AlardLuptonSubtractConfig(
        mode="auto",
        do_scale_variance=False,
        make_kernel=PsfMatchConfig(
            fit_for_background=True, spatial_kernel_order=0, spatial_bg_order=1
        ),
    )
    res = AlardLuptonSubtractTask(cfg, backend="numpy").run(exps["template"], exps["science"])
    d = res.difference.masked_image
    good = d.good_pixels(BAD)
    z = (d.image / np.sqrt(d.variance))[good]
    # A deep extragalactic field: most pixels hold faint galaxies, so the robust σ (MAD)
    # of the whole difference is the sky noise; within 10 % of the variance plane.
    assert abs(_robust(z) - 1) < 0.10
    assert res.kernel_fit.n_used >= 3


# Some of these 256² cutouts hold 4-6 stars: the spatial kernel system of a pair can be
# ill-conditioned, which the fit reports as a RuntimeWarning (the CLI prints it) and the
# condition-number fallback handles; it is not what this test is about.
@pytest.mark.filterwarnings("ignore:spatial kernel system is ill-conditioned:RuntimeWarning")
def test_decam_same_epoch_pairs_via_cli_have_few_clean_sources(shared_data, tmp_path):
    """Issue 14's real-data target: all 20 same-epoch DECam pairs (exposures minutes
    apart, so nearly every DIA source is false) through the command line with its
    defaults give ≤ 5 clean DIA sources per Mpix; the transient of OBS04a − OBS18a at
    array pixel ≈ (129, 129) is found clean.

    Measured: 23 clean sources on the 20 pairs (17.5 per Mpix) before template cosmic
    rays were found (12 of the 23), bright-star residuals were flagged from the science
    sources and the threshold was put in units of the measured (correlated) noise of
    these resampled cutouts; 5 after (3.8 per Mpix; 15 pairs with none).
    """
    import itertools

    from astropy.table import Table

    d = shared_data / "decam_sfft_mini" / "input"
    n_clean, n_pairs = 0, 0
    for ep in ("04", "18"):
        for a, b in itertools.combinations("abcde", 2):
            out, cat = tmp_path / f"{ep}{a}{b}.fits", tmp_path / f"{ep}{a}{b}.ecsv"
            sci, tmpl = d / f"DEC-OBS{ep}{a}.mini.fits", d / f"DEC-OBS{ep}{b}.mini.fits"
            argv = ["subtract", str(sci), str(tmpl), "-o", str(out), "--sources-out", str(cat)]
            assert main(argv + ["--backend", "numpy"]) == 0
            t = Table.read(cat)
            n_clean += int(t["clean"].sum()) if len(t) else 0
            n_pairs += 1
    mpix = n_pairs * 256 * 256 / 1e6
    assert n_pairs == 20 and n_clean / mpix <= 5.0, (n_clean, n_clean / mpix)

    out, cat = tmp_path / "x.fits", tmp_path / "x.ecsv"
    argv = [str(d / "DEC-OBS04a.mini.fits"), str(d / "DEC-OBS18a.mini.fits")]
    assert main(["subtract", *argv, "-o", str(out), "--sources-out", str(cat)]) == 0
    t = Table.read(cat)
    near = np.hypot(np.asarray(t["x_array"]) - 129, np.asarray(t["y_array"]) - 129) < 3
    assert near.any() and bool(t["clean"][near].any())
