"""ModelPsfMatchTask and ``gpudiff match-psf``: LSST's test_modelPsfMatch.py (docs/algorithms.md
§11.5), the issue's evidence on a simulated field with a varying Moffat PSF, and the CLI."""

from __future__ import annotations

import argparse
import functools

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from scipy import ndimage

from gpudiff.backend import get_backend
from gpudiff.commands import match_psf
from gpudiff.errors import (
    FitsWriteError,
    InsufficientKernelSourcesError,
    InvalidInputError,
    KernelTooLargeError,
    PsfError,
)
from gpudiff.image import (
    FWHM_PER_SIGMA,
    DoubleGaussianPsf,
    Exposure,
    GaussianPsf,
    GridPsf,
    ImagePsf,
    MaskedImage,
    MoffatPsf,
    PhotoCalib,
    adaptive_moments,
    read_psf,
    write_psf,
)
from gpudiff.sim import PsfSpec, make_wcs, simulate_exposure
from gpudiff.tasks.model_psf_match import (
    ModelPsfMatchConfig,
    ModelPsfMatchTask,
    model_psf_match_kernel_config,
    next_odd_integer,
    resized_psf,
)

# --- LSST test_modelPsfMatch.py (docs/algorithms.md §11.5) ----------------------------------------
KSIZE, SIGMA1, SIGMA2 = 11, 2.0, 3.7


def _lsst_config(**kernel) -> ModelPsfMatchConfig:
    kernel = dict(dict(scale_by_fwhm=False, kernel_size=9, kernel_size_min=9), **kernel)
    return ModelPsfMatchConfig(kernel=model_psf_match_kernel_config(**kernel))


def _dg(sigma: float, size: int = KSIZE) -> DoubleGaussianPsf:
    # LSST DoubleGaussianPsf(w, h, sigma1) has sigma2 = 1 and b = 0: a single Gaussian.
    return DoubleGaussianPsf(sigma, 1.0, b=0.0, size=size)


@pytest.fixture
def lsst_exposure(backend):
    n = 2 * 128  # 2·sizeCellX
    meta = fits.Header(
        {"VISIT": 12345, "FILTER": "r", "EXPTIME": 30.0, "DATE-OBS": "2026-07-01T03:04:05"}
    )
    return Exposure.from_arrays(
        np.zeros((n, n)),
        np.ones((n, n)),
        psf=_dg(SIGMA1),
        backend=backend,
        wcs=make_wcs((n, n)),
        photo_calib=PhotoCalib(57.5),
        metadata=meta,
    )


@pytest.mark.parametrize("order", [0, 1])
def test_match_forces_the_kernel_sum(backend, lsst_exposure, order):
    for ksum in (0.5, 1.0, 2.7):
        task = ModelPsfMatchTask(_lsst_config(spatial_kernel_order=order), backend=backend)
        res = task.run(lsst_exposure, _dg(SIGMA2), kernel_sum=ksum)
        k = res.psf_matching_kernel
        assert round(abs(k.kernel_image().sum() - ksum), 7) == 0  # assertAlmostEqual
        assert round(abs(k.kernel_sum(0, 255) - ksum), 7) == 0  # the sum is the same everywhere
        assert k.shape == (9, 9) and k.functions.order == order
        # 256² grown by one 128-px cell on each side: 4×4 cells, every one used.
        assert (
            res.metadata["n_cells_x"] == res.metadata["n_cells_y"] == 4
            and res.kernel_fit.n_used == 16
        )


def test_too_big(lsst_exposure):
    config = ModelPsfMatchConfig(
        kernel=_lsst_config(kernel_size=KSIZE).kernel, do_auto_pad_psf=False
    )
    with pytest.raises(KernelTooLargeError, match="at most 9 px"):
        ModelPsfMatchTask(config).run(lsst_exposure, _dg(SIGMA2))
    assert issubclass(KernelTooLargeError, ValueError)


def test_adjust_model_size(lsst_exposure):
    config = ModelPsfMatchConfig(kernel=_lsst_config().kernel, do_auto_pad_psf=False)
    res = ModelPsfMatchTask(config).run(lsst_exposure, _dg(SIGMA2, size=KSIZE + 2))
    psf = res.psf_matched_exposure.psf
    assert psf.kernel_image().shape == (KSIZE, KSIZE) and isinstance(psf, DoubleGaussianPsf)
    assert psf.sigma1 == SIGMA2


def test_pad_psf(lsst_exposure):
    ref = _dg(SIGMA2)
    res = ModelPsfMatchTask(_lsst_config()).run(lsst_exposure, ref)
    assert res.psf_matched_exposure.psf.kernel_image().shape[1] == next_odd_integer(9 * 1.4) == 13
    for pad in (0, 2, 4):
        config = ModelPsfMatchConfig(
            kernel=_lsst_config().kernel, do_auto_pad_psf=False, pad_psf_by=pad
        )
        res = ModelPsfMatchTask(config).run(lsst_exposure, ref)
        assert res.psf_matched_exposure.psf.kernel_image().shape[1] == KSIZE + pad
        assert res.metadata["psf_size"] == KSIZE + pad
    for pad in (1, 3, 5):
        config = ModelPsfMatchConfig(
            kernel=_lsst_config().kernel, do_auto_pad_psf=False, pad_psf_by=pad
        )
        with pytest.raises(ValueError, match="even"):
            ModelPsfMatchTask(config).run(lsst_exposure, ref)


def test_propagate_visit_info(lsst_exposure):
    out = ModelPsfMatchTask(_lsst_config()).run(lsst_exposure, _dg(SIGMA2)).psf_matched_exposure
    for key in ("VISIT", "FILTER", "EXPTIME", "DATE-OBS"):
        assert out.metadata[key] == lsst_exposure.metadata[key]
    assert out.photo_calib == lsst_exposure.photo_calib
    assert out.wcs.to_header() == lsst_exposure.wcs.to_header() and out.wcs is not lsst_exposure.wcs
    assert out.bbox == lsst_exposure.bbox


def test_config_defaults_and_validation():
    kc = ModelPsfMatchConfig().kernel
    # LSST setDefaults (docs/algorithms.md §7): no clipping, constant weighting, no FWHM scaling.
    assert not (
        kc.single_kernel_clipping
        or kc.kernel_sum_clipping
        or kc.spatial_kernel_clipping
        or kc.check_condition_number
        or kc.scale_by_fwhm
    )
    assert kc.constant_variance_weighting and kc.kernel_size == 21 and kc.spatial_kernel_order == 2
    assert not kc.fit_for_background and (kc.size_cell_x, kc.size_cell_y) == (128, 128)
    cfg = ModelPsfMatchConfig()
    assert cfg.do_auto_pad_psf and cfg.auto_pad_psf_to == 1.4 and cfg.pad_psf_by == 0
    with pytest.raises(InvalidInputError):
        ModelPsfMatchConfig(auto_pad_psf_to=2.5)
    with pytest.raises(InvalidInputError):
        ModelPsfMatchConfig(kernel=model_psf_match_kernel_config(kernel_basis_set="delta-function"))
    with pytest.raises(InvalidInputError):
        ModelPsfMatchConfig(pad_psf_by=-2)


def test_cell_grid_follows_lsst():
    from gpudiff.image import Box

    grid = ModelPsfMatchTask().cell_grid(Box(100, 200, 100 + 300, 200 + 256))
    assert grid.region == Box(-28, 72, 528, 584)
    assert grid.xs.tolist() == [128 * c + 64 - 28 for c in range(556 // 128)]  # floor: 4 cells
    assert grid.ys.tolist() == [128 * r + 64 + 72 for r in range(4)]


def test_errors(lsst_exposure):
    task = ModelPsfMatchTask(_lsst_config())
    no_psf = Exposure(lsst_exposure.masked_image)
    with pytest.raises(PsfError, match="no PSF"):
        task.run(no_psf, _dg(SIGMA2))
    with pytest.raises(InvalidInputError):
        task.run(lsst_exposure, "a Gaussian")
    with pytest.raises(InvalidInputError):
        task.run(lsst_exposure, _dg(SIGMA2), kernel_sum=0.0)
    tiny = Exposure.from_arrays(np.zeros((16, 16)), psf=GaussianPsf(fwhm=3.0))
    with pytest.raises(KernelTooLargeError):  # the 21-px kernel does not fit in the image
        ModelPsfMatchTask().run(tiny, GaussianPsf(fwhm=5.0))
    small = Exposure.from_arrays(np.zeros((100, 100)), psf=GaussianPsf(fwhm=3.0))
    with pytest.raises(
        InsufficientKernelSourcesError, match="2x2 cells"
    ):  # 4 cells, 6 spatial terms
        ModelPsfMatchTask().run(small, GaussianPsf(fwhm=5.0))
    res = ModelPsfMatchTask(_lsst_config(spatial_kernel_order=1)).run(small, GaussianPsf(fwhm=5.0))
    assert res.kernel_fit.n_used == 4


# --- every PSF model, as input and as reference -------------------------------------------
def _grid_psf(fwhm0: float, slope: float, box_side: int = 256) -> GridPsf:
    nodes = np.linspace(0, box_side - 1, 4)
    return GridPsf.from_function(
        lambda x, y: GaussianPsf(fwhm=fwhm0 * (1 + slope * x / box_side), size=25), nodes, nodes
    )


_INPUTS = {
    "gaussian": lambda: GaussianPsf(fwhm=3.5, sigma_y=1.3, theta=0.4),
    "double-gaussian": lambda: DoubleGaussianPsf(1.4, 3.0, b=0.1),
    "moffat": lambda: MoffatPsf(3.5, beta=3.0, oversample=3),
    "image": lambda: ImagePsf(MoffatPsf(3.5, beta=2.5).kernel_image()),
    "grid": lambda: _grid_psf(3.0, 0.3),
}
_REFERENCES = {
    "gaussian": lambda: GaussianPsf(fwhm=6.0),
    "double-gaussian": lambda: DoubleGaussianPsf(2.5, 5.0, b=0.05),
    "moffat": lambda: MoffatPsf(6.0, beta=3.5),
    "image": lambda: ImagePsf(GaussianPsf(fwhm=6.0, sigma_y=2.4).kernel_image()),
    "grid": lambda: _grid_psf(5.5, 0.2),
}


@pytest.mark.parametrize(
    "kind,which", [(k, "input") for k in _INPUTS] + [(k, "reference") for k in _REFERENCES]
)
def test_every_psf_model(kind, which):
    psf = _INPUTS[kind]() if which == "input" else _INPUTS["moffat"]()
    ref = _REFERENCES[kind]() if which == "reference" else _REFERENCES["gaussian"]()
    rng = np.random.default_rng(4)
    exp = Exposure.from_arrays(100 + rng.normal(size=(256, 256)), np.ones((256, 256)), psf=psf)
    res = ModelPsfMatchTask().run(exp, ref)
    meta = res.metadata
    out = res.psf_matched_exposure
    assert type(out.psf) is type(ref) and out.psf.size == meta["psf_size"] >= 31
    # PSF_input ⊗ K reproduces the reference to a few per cent of its norm in every cell.
    assert meta["residual_max"] < 0.03, meta["residual_max"]
    assert res.psf_matching_kernel.kernel_sum() == pytest.approx(1.0, abs=1e-12)
    inner = out.image[10:-10, 10:-10]
    assert np.isfinite(inner).all() and np.allclose(
        inner.mean(), 100, atol=0.1
    )  # flat sky stays flat
    assert len(res.candidates) == meta["n_cells_x"] * meta["n_cells_y"] == 16


def test_resized_psf_keeps_the_model():
    g = GaussianPsf(sigma=2.0, size=25)
    assert resized_psf(g, 25) is g
    small = resized_psf(g, 11)
    assert isinstance(small, GaussianPsf) and small.sigma == 2.0 and small.size == 11
    grid = resized_psf(_grid_psf(3.0, 0.3), 31)
    assert isinstance(grid, GridPsf) and grid.images.shape[2:] == (31, 31)
    img = ImagePsf(np.outer([1, 2, 3, 2, 1], [1, 2, 3, 2, 1]))
    assert np.allclose(resized_psf(img, 9).image[2:7, 2:7], img.image)


# --- the evidence: a 1024² field with a ±15 % varying Moffat PSF -------------------
N, SPACING, SKY_HALF = 1024, 96, 27  # stars on a 96-px grid; 55×55 boxes hold each matched star
FIRST = (N - SPACING * (N // SPACING - 1)) // 2  # 80: the grid is centred, 80 px from every edge


@functools.lru_cache(maxsize=2)
def _evidence(backend_name: str):
    rng = np.random.default_rng(11)
    c = FIRST + SPACING * np.arange(N // SPACING)
    gx, gy = np.meshgrid(c, c)
    n = gx.size
    cat = Table(
        {
            "x": gx.ravel() + rng.uniform(-0.5, 0.5, n),
            "y": gy.ravel() + rng.uniform(-0.5, 0.5, n),
            "flux": np.exp(rng.uniform(np.log(2e5), np.log(1e6), n)),
        }
    )
    # FWHM multiplier 1 + 0.1x' + 0.05y': 0.85 to 1.15 between opposite corners.
    sim = simulate_exposure(
        N,
        catalog=cat,
        psf=PsfSpec(kind="moffat", fwhm=3.5, beta=3.0, variation=(0.1, 0.05)),
        seed=7,
        visit=4242,
    )
    psf = sim.exposure.psf
    largest = max(psf.fwhm(x, y) for x in psf.xs for y in psf.ys)
    ref = GaussianPsf(fwhm=1.3 * largest)
    be = get_backend(backend_name)
    res = ModelPsfMatchTask(backend=be).run(sim.exposure.to_backend(be), ref)
    out = res.psf_matched_exposure.to_backend("numpy")
    # The noiseless model through the same kernel: the truth of the output.
    model = res.psf_matching_kernel.convolve(
        MaskedImage(sim.model, np.ones_like(sim.model)), do_normalize=True
    )
    return sim, ref, res, out, model.image


def _fwhm(img, x, y, h=20):
    xi, yi = int(round(x)), int(round(y))
    _, _, ixx, iyy, _ = adaptive_moments(img[yi - h : yi + h + 1, xi - h : xi + h + 1])
    return FWHM_PER_SIGMA * np.sqrt(0.5 * (ixx + iyy))


def _box_sum(img, x, y, h=SKY_HALF):
    xi, yi = int(round(x)), int(round(y))
    return float(img[yi - h : yi + h + 1, xi - h : xi + h + 1].sum())


def test_output_psf_is_the_reference_at_centre_and_corners(backend):
    sim, ref, res, out, _ = _evidence(backend.name)
    x, y = np.asarray(sim.truth["x"]), np.asarray(sim.truth["y"])
    sky_in = sim.background
    # the 4 stars round the centre, the 3 nearest each corner (113 and 196 px from it)
    regions = {
        "centre": ((N - 1) / 2, 100),
        "(0,0)": (0, 210),
        "(N,0)": ((N - 1, 0), 210),
        "(0,N)": ((0, N - 1), 210),
        "(N,N)": ((N - 1, N - 1), 210),
    }
    widths_in = []
    for name, (pos, radius) in regions.items():
        px, py = (pos, pos) if np.isscalar(pos) else pos
        sel = np.hypot(x - px, y - py) < radius
        assert sel.sum() == (4 if name == "centre" else 3), name
        for xs, ys in zip(x[sel], y[sel]):
            widths_in.append(_fwhm(sim.exposure.image - sky_in, xs, ys))
            got = _fwhm(out.image - sky_in, xs, ys)
            assert abs(got / ref.fwhm() - 1) < 0.02, (name, xs, ys, got, ref.fwhm())
    assert max(widths_in) / min(widths_in) > 1.25  # the input PSF really varies that much
    assert res.metadata["n_cells_narrower"] == 0 and res.metadata["residual_max"] < 0.02


def test_star_fluxes_are_preserved(backend):
    sim, _, _, out, model = _evidence(backend.name)
    truth = sim.truth
    sky = sim.background
    for row in truth:
        flux_in = _box_sum(sim.exposure.image - sky, row["x"], row["y"])
        flux_out = _box_sum(out.image - sky, row["x"], row["y"])
        assert abs(flux_out / flux_in - 1) < 0.005, (row["x"], row["y"], flux_out, flux_in)
        # noiseless: the convolved model against the simulated (true) flux
        assert abs(_box_sum(model - sky, row["x"], row["y"]) / row["flux"] - 1) < 0.005


def test_variance_plane_predicts_the_output_sky_noise(backend):
    sim, _, res, out, model = _evidence(backend.name)
    noise = out.image - model  # K ⊗ (image − model): the output's noise alone
    src = sim.model - sim.background
    sigma_in = np.sqrt(np.median(sim.exposure.variance))
    # Sky = away from every source by more than the kernel half-width (its noise is not
    # correlated with any star's photon noise) and inside the valid output.
    busy = (
        ndimage.maximum_filter(
            (np.abs(src) > 1e-3 * sigma_in).astype(np.uint8), size=res.psf_matching_kernel.shape[0]
        )
        > 0
    )
    sky = ~busy & np.isfinite(noise) & np.isfinite(out.variance)
    assert sky.mean() > 0.5
    # The noise is correlated, so its per-pixel variance (not a binned or smoothed one) is
    # what V ⊗ K² predicts.  ~700k sky pixels, but correlated over ~2πσ_K² ≈ 25 px: the
    # ratio's statistical error is ~0.9 % on the whole field and ~1.2 % per half.
    assert abs(np.mean(noise[sky] ** 2) / np.mean(out.variance[sky]) - 1) < 0.03
    # The kernel, hence V ⊗ K², varies across the field (the input PSF is narrower on the
    # left, so the kernel is broader and the output variance lower there): each half too.
    plane = []
    for half in (np.s_[:, : N // 2], np.s_[:, N // 2 :]):
        s = sky[half]
        plane.append(np.mean(out.variance[half][s]))
        assert abs(np.mean(noise[half][s] ** 2) / plane[-1] - 1) < 0.05
    assert plane[1] > 1.1 * plane[0]
    # Matching to a 1.3× broader PSF smooths the noise: the output variance is lower.
    assert np.median(out.variance[sky]) < 0.5 * sigma_in**2
    assert out.metadata["VISIT"] == 4242 and out.wcs.to_header() == sim.exposure.wcs.to_header()


def test_narrower_reference_warns_and_sharpens(backend):
    rng = np.random.default_rng(2)
    cat = Table({"x": [100.3, 300.6, 200.2], "y": [120.4, 250.1, 330.8], "flux": [3e5, 4e5, 5e5]})
    sim = simulate_exposure(
        448, catalog=cat, psf=PsfSpec(kind="moffat", fwhm=4.0), seed=int(rng.integers(99))
    )
    ref = GaussianPsf(fwhm=3.5)
    with pytest.warns(UserWarning, match="narrower"):
        res = ModelPsfMatchTask(backend=backend).run(sim.exposure.to_backend(backend), ref)
    out = res.psf_matched_exposure.to_backend("numpy")
    assert (
        res.metadata["n_cells_narrower"] == res.metadata["n_cells_checked"] == res.kernel_fit.n_used
    )
    assert np.isfinite(out.image[10:-10, 10:-10]).all()
    assert res.psf_matching_kernel.kernel_sum() == pytest.approx(1.0, abs=1e-12)
    for row in cat:  # the documented behaviour: the fit sharpens towards the reference
        w_in = _fwhm(sim.exposure.image - sim.background, row["x"], row["y"])
        w_out = _fwhm(out.image - sim.background, row["x"], row["y"])
        assert w_out < w_in and abs(w_out / ref.fwhm() - 1) < 0.05, (w_in, w_out)
    # ... and amplifies the noise: the variance plane says so
    assert np.median(out.variance[10:-10, 10:-10]) > 2 * np.median(sim.exposure.variance)


# --- gpudiff match-psf ----------------------------------------------------------------------
def _cli(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default=None)  # added by gpudiff.cli for every command
    match_psf.configure(parser)
    return match_psf.run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def small_field(tmp_path_factory):
    sim = simulate_exposure(
        320,
        n_stars=60,
        flux_min=2e4,
        flux_max=3e5,
        min_separation=25,
        psf=PsfSpec(kind="moffat", fwhm=3.2),
        seed=3,
        visit=77,
    )
    path = tmp_path_factory.mktemp("mpm") / "in.fits"
    sim.exposure.write(path)
    return sim, path


def test_cli_round_trip_with_reference_fwhm(small_field, tmp_path, capsys):
    sim, path = small_field
    out_path = tmp_path / "out.fits"
    assert (
        _cli([str(path), "-o", str(out_path), "--reference-fwhm", "5.5", "--kernel-size", "19"])
        == 0
    )
    text = capsys.readouterr().out
    assert "Gaussian of FWHM 5.5 px" in text and "kernel 19 px" in text and "wrote" in text
    out = Exposure.read(out_path)
    assert isinstance(out.psf, GaussianPsf) and out.psf.fwhm() == pytest.approx(5.5)
    assert out.shape == sim.exposure.shape and out.metadata["VISIT"] == 77
    assert out.metadata["MPMKSIZE"] == 19 and out.metadata["MPMKSUM"] == pytest.approx(1.0)
    assert np.isfinite(out.image[9:-9, 9:-9]).all() and np.isnan(out.image[0, 0])
    with pytest.raises(FitsWriteError, match="exists"):
        _cli([str(path), "-o", str(out_path), "--reference-fwhm", "5.5"])
    assert (
        _cli(
            [
                str(path),
                "-o",
                str(out_path),
                "--reference-fwhm",
                "6",
                "--overwrite",
                "--set",
                "kernel.spatial_kernel_order=1",
                "--set",
                "do_auto_pad_psf=false",
            ]
        )
        == 0
    )
    assert "spatial order 1" in capsys.readouterr().out
    assert Exposure.read(out_path).metadata["MPMORDER"] == 1


def test_cli_reference_psf_file_and_estimated_input_psf(small_field, tmp_path, capsys):
    sim, _ = small_field
    no_psf = Exposure(
        sim.exposure.masked_image, wcs=sim.exposure.wcs, metadata=sim.exposure.metadata
    )
    in_path, psf_path, out_path = (
        tmp_path / "nopsf.fits",
        tmp_path / "ref.fits",
        tmp_path / "out.fits",
    )
    no_psf.write(in_path)
    write_psf(psf_path, MoffatPsf(6.0, beta=3.5))
    assert _cli([str(in_path), "-o", str(out_path), "--reference-psf", str(psf_path)]) == 0
    text = capsys.readouterr().out
    assert "has no PSF; estimated one" in text
    out = Exposure.read(out_path)
    assert isinstance(out.psf, MoffatPsf) and out.psf.profile_fwhm == 6.0
    assert out.psf.size == out.metadata["MPMPSFSZ"] and read_psf(psf_path).profile_fwhm == 6.0


def test_cli_usage_errors(small_field, tmp_path):
    _, path = small_field
    for argv in (
        [str(path), "-o", "x.fits"],  # no reference
        [str(path), "-o", "x.fits", "--reference-fwhm", "3", "--reference-psf", "p.fits"],
        [str(path), "-o", "x.fits", "--reference-fwhm", "-1"],
        [str(path), "-o", "x.fits", "--reference-fwhm", "4", "--kernel-size", "20"],
    ):
        with pytest.raises(SystemExit):
            _cli(argv)


def test_cli_through_gpudiff_main(small_field, tmp_path, monkeypatch, capsys):
    from gpudiff import cli

    # gpudiff.cli registers the command as "match-psf"; make sure it is, whatever its state
    monkeypatch.setitem(cli.COMMANDS, "match-psf", "commands.match_psf")
    _, path = small_field
    out_path = tmp_path / "out.fits"
    assert (
        cli.main(
            [
                "match-psf",
                str(path),
                "-o",
                str(out_path),
                "--reference-fwhm",
                "5",
                "--backend",
                "numpy",
            ]
        )
        == 0
    )
    assert out_path.exists()
    assert (
        cli.main(
            [
                "match-psf",
                str(tmp_path / "missing.fits"),
                "-o",
                str(tmp_path / "o.fits"),
                "--reference-fwhm",
                "5",
            ]
        )
        == 1
    )
    assert "gpudiff match-psf: error:" in capsys.readouterr().err
