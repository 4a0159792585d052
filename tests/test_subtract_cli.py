"""``gpudiff subtract`` end to end on FITS files of a simulated pair.

The pair: 512², 500 stars (2e3–5e5 ADU), sky-subtracted science (Gaussian FWHM 3.5 px) and
template (FWHM 2.5 px), five injected transients with S/N 10–100.  Without ``--sources``
the kernel sources are detected on the science image.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from gpudiff.cli import main
from gpudiff.image import Box, Exposure, read_exposure
from gpudiff.sim import simulate_pair


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("subtract_cli")
    pair = simulate_pair(
        size=512,
        n_stars=500,
        flux_min=2e3,
        flux_max=5e5,
        science=dict(sky_subtracted=True),
        template=dict(sky_subtracted=True),
        seed=3,
    )
    sci, tmpl = d / "science.fits", d / "template.fits"
    pair.science.write(sci)
    pair.template.write(tmpl)
    return pair, sci, tmpl, d


@pytest.fixture(scope="module")
def default_run(pair_files):
    """One default run with every optional output: (returncode, stdout, paths)."""
    _, sci, tmpl, d = pair_files
    out = d / "diff.fits"
    paths = dict(diff=out, dia=d / "dia.ecsv", matched=d / "matched.fits")
    rc = main(
        [
            "subtract",
            str(sci),
            str(tmpl),
            "-o",
            str(out),
            "--sources-out",
            str(paths["dia"]),
            "--matched-template-out",
            str(paths["matched"]),
        ]
    )
    return rc, paths


def _run(capsys, *argv):
    capsys.readouterr()
    rc = main(["subtract", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_outputs_and_header(pair_files, default_run):
    pair, sci, _, _ = pair_files
    rc, paths = default_run
    assert rc == 0
    for p in paths.values():
        assert p.is_file(), p
    diff = read_exposure(paths["diff"])
    assert diff.shape == pair.science.shape and diff.xy0 == pair.science.xy0
    assert diff.psf is not None
    assert np.isfinite(diff.image).all()
    assert (diff.variance > 0).all()
    hdr = fits.getheader(paths["diff"], 0)
    assert hdr["GDMODE"] == "convolveTemplate"
    assert hdr["GDKSUM"] == pytest.approx(1.0, abs=0.02)  # flux_scale 1
    assert isinstance(hdr["GDNUSED"], int) and hdr["GDNUSED"] >= 3
    assert hdr["GDNSRC"] >= hdr["GDNUSED"]
    assert hdr["GDBACKND"] == "numpy"
    assert hdr["GDTCOV"] == pytest.approx(1.0)
    assert hdr["GDSVSCI"] == pytest.approx(1.0, abs=0.05)
    assert hdr["GDSVTMP"] == pytest.approx(1.0, abs=0.05)
    timing_names = {
        c.comment.replace("seconds: ", "")
        for c in hdr.cards
        if c.keyword.startswith("GDT") and c.keyword[3:].isdigit()
    }
    assert {
        "read",
        "subtract",
        "kernel_fit",
        "convolution",
        "decorrelation",
        "detect",
    } <= timing_names
    # The science header (band) travels with the difference; the difference has detections.
    assert hdr["BAND"] == fits.getheader(sci, 0)["BAND"]
    assert (
        diff.mask_planes.bitmask("DETECTED")
        and (diff.mask & diff.mask_planes.bitmask("DETECTED")).any()
    )
    # The matched template is on the science grid, with the science PSF.
    mt = read_exposure(paths["matched"])
    assert mt.bbox == pair.science.bbox


def test_dia_catalog(pair_files, default_run):
    """--sources-out: the DIA catalog finds the injected transients with their flux."""
    pair, *_ = pair_files
    _, paths = default_run
    dia = Table.read(paths["dia"])
    for col in ("x", "y", "psf_flux", "psf_flux_err", "snr", "polarity", "flag_dipole"):
        assert col in dia.colnames
    tr = pair.transients
    assert len(tr) == 5
    found = 0
    for x, y, flux, snr in zip(tr["x"], tr["y"], tr["delta_flux"], tr["snr"]):
        d = np.hypot(np.asarray(dia["x"]) - x, np.asarray(dia["y"]) - y)
        i = int(np.argmin(d))
        if d[i] < 2.0:
            found += 1
            assert dia["polarity"][i] == 1
            err = float(dia["psf_flux_err"][i])
            assert abs(float(dia["psf_flux"][i]) - flux) < 5 * err + 0.05 * flux
        else:
            assert snr < 15, f"transient at ({x:.1f}, {y:.1f}) with S/N {snr:.0f} not detected"
    assert found >= 4
    assert len(dia) <= found + 3  # few false detections on 0.26 Mpx


def test_preconvolve_writes_score(pair_files, tmp_path, capsys):
    pair, sci, tmpl, _ = pair_files
    out = tmp_path / "score.fits"
    rc, stdout, err = _run(
        capsys, sci, tmpl, "-o", out, "--preconvolve", "--sources-out", tmp_path / "dia.fits"
    )
    assert rc == 0, err
    assert "wrote" in stdout
    score = read_exposure(out)
    # The score's PSF is the science PSF (docs/algorithms.md §4.3), its variance the decorrelated
    # one.
    np.testing.assert_allclose(score.psf.kernel_image(), pair.science.psf.kernel_image(), atol=1e-7)
    edge = (score.mask & score.mask_planes.bitmask("EDGE")) != 0
    assert edge[0].all() and edge[-1].all() and not edge[256, 256]
    good = ~edge
    z = score.image[good] / np.sqrt(score.variance[good])
    q1, q3 = np.percentile(z, [25, 75])
    assert 0.7413 * (q3 - q1) == pytest.approx(1.0, abs=0.1)
    hdr = fits.getheader(out, 0)
    assert hdr["GDMODE"] == "convolveTemplate"
    assert hdr["GDNUSED"] >= 3
    dia = Table.read(tmp_path / "dia.fits")
    assert len(dia) >= 4


def test_set_spatial_kernel_order_changes_fit(pair_files, default_run, tmp_path, capsys):
    _, sci, tmpl, _ = pair_files
    _, paths = default_run
    out = tmp_path / "diff0.fits"
    rc, _, err = _run(
        capsys, sci, tmpl, "-o", out, "--set", "make_kernel.spatial_kernel_order=0", "--no-detect"
    )
    assert rc == 0, err
    a, b = read_exposure(paths["diff"]), read_exposure(out)
    assert not np.array_equal(a.image, b.image)
    # Both are good subtractions: the sky noise matches the variance in either.
    for e in (a, b):
        z = e.image / np.sqrt(e.variance)
        q1, q3 = np.percentile(z, [25, 75])
        assert 0.7413 * (q3 - q1) == pytest.approx(1.0, abs=0.1)


def test_config_file_and_bad_field(pair_files, tmp_path, capsys):
    _, sci, tmpl, _ = pair_files
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"make_kernel": {"spatial_kernel_order": 0}, "do_decorrelation": false}')
    rc, _, err = _run(capsys, sci, tmpl, "-o", tmp_path / "d.fits", "--config", cfg, "--no-detect")
    assert rc == 0, err
    rc, _, err = _run(capsys, sci, tmpl, "-o", tmp_path / "e.fits", "--set", "no_such_field=1")
    assert rc == 1
    assert err.strip().count("\n") == 0 and "no_such_field" in err


def test_mode_auto(pair_files, default_run, tmp_path, capsys):
    """--mode auto picks convolveTemplate (science PSF broader) and gives the same image."""
    _, sci, tmpl, _ = pair_files
    _, paths = default_run
    out = tmp_path / "auto.fits"
    rc, stdout, err = _run(capsys, sci, tmpl, "-o", out, "--mode", "auto")
    assert rc == 0, err
    assert "convolveTemplate" in stdout
    assert fits.getheader(out, 0)["GDMODE"] == "convolveTemplate"
    np.testing.assert_array_equal(read_exposure(out).image, read_exposure(paths["diff"]).image)


def test_mode_convolve_science(pair_files, tmp_path, capsys):
    _, sci, tmpl, _ = pair_files
    out = tmp_path / "cs.fits"
    rc, _, err = _run(capsys, sci, tmpl, "-o", out, "--mode", "convolveScience", "--no-detect")
    assert rc == 0, err
    assert fits.getheader(out, 0)["GDMODE"] == "convolveScience"


def _one_line_error(rc, err):
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gpudiff subtract: error:")
    assert "Traceback" not in err
    return lines[0]


def test_error_missing_file(pair_files, tmp_path, capsys):
    _, sci, _, _ = pair_files
    missing = tmp_path / "nope.fits"
    rc, _, err = _run(capsys, sci, missing, "-o", tmp_path / "d.fits")
    line = _one_line_error(rc, err)
    assert "nope.fits" in line
    assert not (tmp_path / "d.fits").exists()


def test_error_existing_output(pair_files, tmp_path, capsys):
    _, sci, tmpl, _ = pair_files
    out = tmp_path / "exists.fits"
    out.write_bytes(b"keep me")
    rc, _, err = _run(capsys, sci, tmpl, "-o", out)
    line = _one_line_error(rc, err)
    assert "--overwrite" in line
    assert out.read_bytes() == b"keep me"
    rc, _, err = _run(capsys, sci, tmpl, "-o", out, "--overwrite", "--no-detect")
    assert rc == 0, err
    assert read_exposure(out).shape == (512, 512)


def _no_wcs_files(pair, tmp_path, box, shift=(0, 0)):
    """The science image and the part of the template inside ``box``, both without a WCS;
    the template's xy0 moved by ``shift`` (its pixels not)."""
    sci = Exposure(pair.science.masked_image, psf=pair.science.psf, wcs=None)
    small = pair.template.masked_image.subimage(box)
    small.xy0 = (small.xy0[0] + shift[0], small.xy0[1] + shift[1])
    tmpl = Exposure(small, psf=pair.template.psf, wcs=None)
    sci_p, tmpl_p = tmp_path / "sci_nowcs.fits", tmp_path / "tmpl_nowcs.fits"
    sci.write(sci_p)
    tmpl.write(tmpl_p)
    return sci_p, tmpl_p


def test_template_partly_covering_without_wcs_is_no_data_where_it_misses(
    pair_files, tmp_path, capsys
):
    """A template on a box that covers 78 % of the science, no WCS to warp with: as LSST's
    template retrieval, it is taken on the science box in their common pixel frame, NO_DATA
    where it does not reach (said in a warning); the covered part subtracts to the noise."""
    pair, *_ = pair_files
    sci_p, tmpl_p = _no_wcs_files(pair, tmp_path, Box(0, 0, 512, 400))
    out = tmp_path / "d.fits"
    rc, outtxt, err = _run(capsys, sci_p, tmpl_p, "-o", out, "--no-detect")
    assert rc == 0, err
    assert "covers 78.1 % of the science grid" in outtxt + err
    diff = read_exposure(out)
    assert diff.shape == (512, 512)
    no_data = (np.asarray(diff.mask) & diff.mask_planes.bitmask("NO_DATA")) != 0
    # Every row the template misses is NO_DATA (the kernel's reach widens it, never less).
    assert no_data[400:].all()
    assert not no_data[50:350, 50:460].any()
    # The covered part: source-free pixels at the noise of the variance plane (robust σ
    # within 10 %: 512 × 300 pixels of mostly sky; stars' residuals are few).
    z = (np.asarray(diff.image) / np.sqrt(np.asarray(diff.variance)))[50:350, 50:460]
    q1, q3 = np.percentile(z[np.isfinite(z)], [25, 75])
    assert 0.741 * (q3 - q1) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize(
    "shift, needs",
    [((15, 15), ("(+15, +15) px", "xy0")), ((600, 0), ("does not overlap", "WCS"))],
    ids=["misregistered", "disjoint"],
)
def test_template_frame_errors_without_wcs(pair_files, tmp_path, capsys, shift, needs):
    """No WCS, and the template's xy0 moved (its pixels not): by (+15, +15) px the content
    check names the offset (the shared ip_diffim fixture's template has such an xy0); by
    600 px the boxes do not overlap.  Either is an error, and nothing is written."""
    pair, *_ = pair_files
    sci_p, tmpl_p = _no_wcs_files(pair, tmp_path, Box(0, 0, 512, 512), shift=shift)
    rc, _, err = _run(capsys, sci_p, tmpl_p, "-o", tmp_path / "d.fits")
    line = _one_line_error(rc, err)
    assert all(n in line for n in needs), line
    assert not (tmp_path / "d.fits").exists()


def test_sources_catalog(pair_files, tmp_path, capsys):
    """--sources: a kernel-source catalog (x, y, psf_flux, psf_flux_err) instead of detection."""
    pair, sci, tmpl, _ = pair_files
    t = pair.truth
    stars = t[np.asarray(t["is_star"]) & np.asarray(t["in_science"])]
    cat = Table()
    cat["x"] = stars["x_science"]
    cat["y"] = stars["y_science"]
    cat["psf_flux"] = stars["flux_science"]
    cat["psf_flux_err"] = np.sqrt(np.asarray(stars["flux_science"])) + 10.0
    cat_p = tmp_path / "kernel_sources.ecsv"
    cat.write(cat_p)
    out = tmp_path / "d.fits"
    rc, _, err = _run(capsys, sci, tmpl, "-o", out, "--sources", cat_p, "--no-detect")
    assert rc == 0, err
    hdr = fits.getheader(out, 0)
    snr = np.asarray(cat["psf_flux"]) / np.asarray(cat["psf_flux_err"])
    assert 3 <= hdr["GDNSRC"] <= int(((snr >= 10) & (snr <= 500)).sum())
    assert math.isfinite(hdr["GDKSUM"])


def test_plots_are_valid_pngs(pair_files, tmp_path, monkeypatch):
    """Without matplotlib, --plots writes the kernel grid and the residual histogram as plain
    RGB bitmaps (stdlib PNG writer) and logs what they show."""
    import zlib

    from gpudiff.commands import _plots

    monkeypatch.setattr(_plots, "have_matplotlib", lambda: False)
    _, sci, tmpl, _ = pair_files
    out, pdir = tmp_path / "d.fits", tmp_path / "plots"
    assert (
        main(
            [
                "subtract",
                str(sci),
                str(tmpl),
                "-o",
                str(out),
                "--plots",
                str(pdir),
                "--no-detect",
                "--backend",
                "numpy",
            ]
        )
        == 0
    )
    for name in ("kernel_grid.png", "residual_histogram.png"):
        data = (pdir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        i = data.index(b"IDAT")
        n = int.from_bytes(data[i - 4 : i], "big")
        raw = zlib.decompress(data[i + 4 : i + 4 + n])
        assert len(raw) == h * (1 + 3 * w) and w > 50 and h > 50


def test_plots_with_matplotlib_have_axes_labels_and_colour_bar(pair_files, tmp_path, monkeypatch):
    """With matplotlib (the plots extra) the figures carry labelled axes and the kernel grid a
    colour bar; the PNGs read back as images."""
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from gpudiff.commands import _plots

    figures = {}
    save = _plots._save_figure

    def keep(path, fig):
        figures[Path(path).name] = fig
        save(path, fig)

    monkeypatch.setattr(_plots, "_save_figure", keep)
    _, sci, tmpl, _ = pair_files
    out, pdir = tmp_path / "d.fits", tmp_path / "plots"
    assert (
        main(
            [
                "subtract",
                str(sci),
                str(tmpl),
                "-o",
                str(out),
                "--plots",
                str(pdir),
                "--no-detect",
                "--backend",
                "numpy",
            ]
        )
        == 0
    )
    grid, hist = figures["kernel_grid.png"], figures["residual_histogram.png"]
    panels = [ax for ax in grid.axes if ax.images]
    assert len(panels) == 9 and len(grid.axes) == 10  # nine kernel panels and the colour bar
    assert grid.axes[-1].get_ylabel() == "kernel value"
    assert all(ax.get_title().startswith("x=") for ax in panels)
    assert panels[-1].get_xlabel() == "dx [px]" and panels[0].get_ylabel() == "dy [px]"
    (ax,) = hist.axes
    assert ax.get_xlabel().startswith("difference") and ax.get_ylabel() == "probability density"
    assert "robust" in ax.get_title()
    for name in figures:
        img = imread(pdir / name)
        assert img.ndim == 3 and min(img.shape[:2]) > 300 and img[..., :3].std() > 0.05  # not blank
