"""gpudiff.sim: measured properties of the simulated exposures and their truth."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from astropy.table import Table

from gpudiff.errors import InvalidInputError
from gpudiff.image import Box, Exposure, GaussianPsf, GridPsf, MoffatPsf
from gpudiff.image.psf import adaptive_moments
from gpudiff.sim import (
    ChebyshevBackground,
    FieldConfig,
    Ghost,
    ObsConfig,
    PolynomialBackground,
    PsfSpec,
    SimPair,
    SimResult,
    Trail,
    flux_for_snr,
    make_catalog,
    make_test_image,
    make_wcs,
    psf_snr,
    simulate_exposure,
    simulate_pair,
)


def _bit(exp: Exposure, name: str) -> np.ndarray:
    return (exp.mask & exp.mask_planes.bitmask(name)) != 0


def _one_star(x: float, y: float, flux: float) -> Table:
    return Table({"x": [x], "y": [y], "flux": [flux]})


# --- noise and variance -----------------------------------------------------------------
@pytest.mark.parametrize("noise", ["poisson", "gaussian"])
def test_noise_is_normalized_by_the_variance_plane(noise):
    res = simulate_exposure(
        320,
        xy0=(1000, 2000),
        seed=3,
        n_stars=60,
        n_galaxies=10,
        sky=400.0,
        gain=2.0,
        read_noise=7.0,
        noise=noise,
        saturation=30000.0,
        bad_columns=2,
        cosmic_rays=8,
        no_data=[(1000, 2000, 1030, 2040)],
        background=PolynomialBackground(
            offset=20.0, gradient=(15.0, -10.0), quadratic=(5.0, 0.0, 3.0)
        ),
    )
    exp = res.exposure
    good = (exp.mask == 0) & ~res.cr_mask
    assert good.sum() > 0.9 * exp.image.size
    z = (exp.image[good].astype(np.float64) - res.model[good]) / np.sqrt(exp.variance[good])
    assert abs(z.std() - 1.0) < 0.02
    assert abs(z.mean()) < 0.02


def test_variance_is_the_expectation_from_the_model():
    res = simulate_exposure(128, seed=4, n_stars=20, sky=250.0, gain=1.7, read_noise=4.0)
    expected = (np.clip(res.model.astype(np.float64), 0, None) * 1.7 + 16.0) / 1.7**2
    np.testing.assert_allclose(res.exposure.variance, expected, rtol=1e-5)


def test_sky_subtracted_keeps_the_variance():
    a = simulate_exposure(128, seed=9, n_stars=15, sky=300.0)
    b = simulate_exposure(128, seed=9, n_stars=15, sky=300.0, sky_subtracted=True)
    np.testing.assert_array_equal(a.exposure.variance, b.exposure.variance)
    np.testing.assert_allclose(b.exposure.image, a.exposure.image - 300.0, atol=1e-3)
    np.testing.assert_allclose(b.background, a.background - 300.0, atol=1e-3)
    assert b.exposure.metadata["SKYSUB"] is True


# --- fluxes and PSFs --------------------------------------------------------------------
def test_total_model_flux_equals_the_truth_fluxes():
    res = simulate_exposure(
        256,
        seed=5,
        n_stars=120,
        n_galaxies=15,
        margin=-25.0,
        noise="none",
        sky=100.0,
        galaxy_sersic_n=(0.8, 2.5),
        psf=PsfSpec(kind="moffat", fwhm=3.2),
    )
    assert res.truth["in_image"].all()
    total = float(res.sources.astype(np.float64).sum())
    assert total == pytest.approx(float(np.sum(res.truth["flux"])), rel=1e-3)
    # noise "none": the image is the model
    np.testing.assert_array_equal(res.exposure.image, res.model)


@pytest.mark.parametrize(
    "psf",
    [
        PsfSpec(fwhm=2.7),
        PsfSpec(kind="moffat", fwhm=3.6, beta=2.5),
        PsfSpec(fwhm=3.0, axis_ratio=0.7, theta=0.4),
    ],
)
def test_rendered_star_is_exactly_the_attached_psf(psf):
    x, y, flux = 60.3, 47.72, 1.0e4
    res = simulate_exposure(120, catalog=_one_star(x, y, flux), psf=psf, noise="none", sky=0.0)
    att = res.exposure.psf
    assert type(att) is (MoffatPsf if psf.kind == "moffat" else GaussianPsf)
    assert att.oversample == 5
    stamp = att.compute_image(x, y)
    h = att.size // 2
    cut = res.model[48 - h : 48 + h + 1, 60 - h : 60 + h + 1]
    np.testing.assert_allclose(cut, flux * stamp, atol=1e-9 * flux, rtol=1e-5)


def test_attached_psf_fwhm_matches_the_request():
    g = simulate_exposure(64, n_stars=3, psf=PsfSpec(fwhm=3.3), seed=1).exposure.psf
    assert g.fwhm() == pytest.approx(3.3, rel=1e-12)
    m = simulate_exposure(64, n_stars=3, psf=PsfSpec(kind="moffat", fwhm=4.0), seed=1).exposure.psf
    assert isinstance(m, MoffatPsf) and m.profile_fwhm == pytest.approx(4.0)
    assert m.size >= 2 * math.ceil(4 * 4.0) + 1  # the wings are inside the stamp


def test_varying_moffat_psf_follows_the_fwhm_function():
    spec = PsfSpec(kind="moffat", fwhm=4.0, beta=3.0, variation=(0.15, 0.0, 0.0, 0.0, 0.0))
    box = Box(-100, 50, 412, 562)
    x, y = 5.4, 300.6
    res = simulate_exposure(box, catalog=_one_star(x, y, 5e4), psf=spec, noise="none", sky=0.0)
    att = res.exposure.psf
    assert isinstance(att, GridPsf)
    size = att.size
    # the star is the analytic profile of the local FWHM, exactly
    local = spec.make_psf(float(spec.fwhm_at(x, y, box)), size)
    h = size // 2
    cut = res.model[301 - 50 - h : 301 - 50 + h + 1, 5 + 100 - h : 5 + 100 + h + 1]
    np.testing.assert_allclose(cut, 5e4 * local.compute_image(x, y), atol=1e-5, rtol=1e-5)
    # the attached model's FWHM at corners and centre matches that of the MoffatPsf model of
    # the requested profile FWHM, within 2 %
    centre = ((box.x0 + box.x1 - 1) / 2, (box.y0 + box.y1 - 1) / 2)
    corners = [
        (box.x0, box.y0),
        (box.x1 - 1, box.y0),
        (box.x0, box.y1 - 1),
        (box.x1 - 1, box.y1 - 1),
    ]
    f_centre = att.fwhm(*centre)
    for px, py in corners + [centre]:
        want = spec.make_psf(float(spec.fwhm_at(px, py, box)), size).fwhm()
        assert att.fwhm(px, py) == pytest.approx(want, rel=0.02)
    for px, py in corners:
        ratio = float(spec.fwhm_at(px, py, box) / spec.fwhm_at(*centre, box))
        assert att.fwhm(px, py) / f_centre == pytest.approx(ratio, rel=0.02)
    assert res.truth["psf_fwhm"][0] == pytest.approx(float(spec.fwhm_at(x, y, box)))


def test_psf_callable_and_psf_instances():
    res = simulate_exposure(
        96,
        n_stars=10,
        seed=2,
        noise="none",
        sky=0.0,
        margin=-15.0,
        psf=lambda x, y: GaussianPsf(fwhm=2.5 + 0.01 * x, size=15),
    )
    assert isinstance(res.exposure.psf, GridPsf)
    assert res.sources.sum() == pytest.approx(np.sum(res.truth["flux"]), rel=1e-5)
    psf = MoffatPsf(fwhm=3.0, beta=4.0, size=25, oversample=3)
    res = simulate_exposure(96, n_stars=10, seed=2, psf=psf)
    assert res.exposure.psf is psf


# --- detector effects -------------------------------------------------------------------
def test_saturated_pixels_are_clipped_and_flagged():
    res = simulate_exposure(200, seed=6, n_stars=40, flux_min=1e5, flux_max=1e6, saturation=20000.0)
    exp = res.exposure
    sat = _bit(exp, "SAT")
    assert sat.any()
    np.testing.assert_array_equal(sat, exp.image >= 20000.0)
    assert np.nanmax(exp.image) == 20000.0
    np.testing.assert_array_equal(sat, res.masks["saturated"])
    assert exp.metadata["SATURATE"] == 20000.0


def test_bad_columns_and_no_data():
    res = simulate_exposure(
        100,
        xy0=(100, 200),
        seed=7,
        n_stars=10,
        bad_columns=3,
        bad_column_value=-5.0,
        no_data=[Box(100, 200, 120, 230), (180, 280, 300, 400)],
    )
    exp = res.exposure
    nd = _bit(exp, "NO_DATA")
    assert nd[:30, :20].all() and nd[80:, 80:].all() and nd.sum() == 600 + 400
    assert np.isnan(exp.image[nd]).all() and np.isposinf(exp.variance[nd]).all()
    assert np.isfinite(exp.image[~nd]).all() and np.isfinite(exp.variance[~nd]).all()
    bad = _bit(exp, "BAD")
    cols = np.flatnonzero(bad.any(axis=0))
    assert cols.size == 3
    assert (exp.image[bad & ~nd] == -5.0).all()
    np.testing.assert_array_equal(bad, res.masks["bad_column"])
    exp.masked_image.validate()  # usable as an algorithm input
    res2 = simulate_exposure(50, seed=1, n_stars=2, bad_columns=[3, 17])
    assert np.flatnonzero(_bit(res2.exposure, "BAD").all(axis=0)).tolist() == [3, 17]


def test_cosmic_rays_are_reported_and_unmasked_by_default():
    kw = dict(seed=8, n_stars=20, sky=200.0)
    clean = simulate_exposure(128, **kw)
    res = simulate_exposure(128, cosmic_rays=15, **kw)
    cr = res.cr_mask
    assert cr.sum() >= 15
    assert not _bit(res.exposure, "CR").any()
    # the charge is on top of the otherwise identical noise realization
    assert (res.exposure.image[cr] > clean.exposure.image[cr] + 40).all()
    np.testing.assert_array_equal(res.exposure.image[~cr], clean.exposure.image[~cr])
    np.testing.assert_array_equal(res.exposure.variance, clean.exposure.variance)
    masked = simulate_exposure(128, cosmic_rays=15, mask_cosmic_rays=True, **kw)
    np.testing.assert_array_equal(_bit(masked.exposure, "CR"), cr)


def test_trails_ghosts_and_backgrounds():
    trail = Trail(x=10.0, y=20.0, angle=30.0, brightness=50.0, width=1.5)
    ghost = Ghost(x=90.0, y=90.0, radius=20.0, brightness=8.0, inner_radius=8.0)
    res = simulate_exposure(
        128, seed=2, n_stars=0, sky=100.0, noise="none", trails=[trail], ghosts=[ghost]
    )
    src = res.sources
    # on the line: peak brightness (pixel centres on the line)
    assert src[20, 10] == pytest.approx(50.0, rel=1e-6)
    x = 70
    y_line = 20 + (x - 10) * math.tan(math.radians(30))
    assert res.masks["trail"][int(round(y_line)), x]
    assert src[90, 90] == pytest.approx(0.0, abs=1e-3)  # the donut's hole
    assert src[90, 90 + 14] == pytest.approx(8.0, rel=1e-3)  # the ring
    assert res.masks["ghost"][90, 104] and not res.masks["ghost"][90, 90]

    cheb = ChebyshevBackground((2.2, 2.1, 2.0, 1.2, 1.1, 1.0))
    r = simulate_exposure(
        64, xy0=(123, 456), seed=1, n_stars=0, sky=10.0, noise="none", background=cheb
    )
    # x' = y' = 0 at the box centre (pixel 31.5): T0 = 1, T1 = 0, T2 = -1
    xs, ys = np.array([123 + 31.5]), np.array([456 + 31.5])
    assert cheb.evaluate(xs, ys, Box(123, 456, 187, 520))[0] == pytest.approx(2.2 - 1.2 - 1.0)
    # at the Box2D corner (x' = y' = 1) every T is 1
    assert cheb.evaluate(np.array([186.5]), np.array([519.5]), Box(123, 456, 187, 520))[
        0
    ] == pytest.approx(9.6)
    assert r.background.shape == (64, 64) and np.isfinite(r.background).all()

    poly = PolynomialBackground(offset=5.0, gradient=(2.0, -1.0), center=(0.0, 0.0), scale=100.0)
    r = simulate_exposure(32, xy0=(100, 200), n_stars=0, sky=1.0, noise="none", background=poly)
    assert r.background[0, 0] == pytest.approx(1.0 + 5.0 + 2.0 * 1.0 - 1.0 * 2.0, rel=1e-6)
    r = simulate_exposure(
        32, n_stars=0, sky=1.0, noise="none", background=lambda x, y: 0.5 * x + 0 * y
    )
    assert r.background[3, 7] == pytest.approx(1.0 + 3.5)


def test_galaxies_are_extended_and_flagged():
    res = simulate_exposure(
        240,
        seed=11,
        n_stars=0,
        n_galaxies=4,
        galaxy_r_eff=(3.0, 3.0),
        min_separation=50.0,
        margin=-40.0,
        noise="none",
        sky=0.0,
        galaxy_flux_min=1e4,
        galaxy_flux_max=1e4,
    )
    t = res.truth
    assert t["is_galaxy"].all() and not t["is_star"].any()
    psf_ixx = res.exposure.psf.moments()[0]
    for row in t:
        cx, cy = int(round(row["x"])), int(round(row["y"]))
        cut = res.sources[cy - 20 : cy + 21, cx - 20 : cx + 21].astype(np.float64)
        _, _, ixx, iyy, _ = adaptive_moments(cut)
        assert (ixx + iyy) / 2 > 2 * psf_ixx
        assert cut.sum() == pytest.approx(1e4, rel=2e-3)


# --- catalogs ---------------------------------------------------------------------------
def test_catalog_power_law_and_min_separation():
    cat = make_catalog(
        Box(0, 0, 400, 400),
        n_stars=300,
        flux_min=100.0,
        flux_max=1e5,
        flux_alpha=2.0,
        min_separation=12.0,
        seed=3,
    )
    from scipy.spatial import cKDTree

    xy = np.column_stack([cat["x"], cat["y"]])
    d, _ = cKDTree(xy).query(xy, k=2)
    assert d[:, 1].min() >= 12.0
    f = np.asarray(cat["flux"])
    assert f.min() >= 100.0 and f.max() <= 1e5
    # dN/dF ∝ F^-2 ⇒ half the stars below the harmonic-mean point 2/(1/fmin + 1/fmax)
    assert np.median(f) == pytest.approx(2 / (1 / 100 + 1 / 1e5), rel=0.2)
    # simulate_exposure without a catalog draws this catalog
    res = simulate_exposure(
        400,
        n_stars=300,
        flux_min=100.0,
        flux_max=1e5,
        flux_alpha=2.0,
        min_separation=12.0,
        seed=3,
        noise="none",
    )
    np.testing.assert_array_equal(np.sort(res.truth["id"]), np.arange(300))
    np.testing.assert_allclose(res.truth["x"], cat["x"][res.truth["id"]])


# --- pairs ------------------------------------------------------------------------------
def _pair(**kw) -> SimPair:
    base = dict(
        seed=21,
        dx=0.3,
        dy=-0.45,
        template_border=20,
        flux_scale=1.3,
        n_stars=25,
        min_separation=35.0,
        flux_min=2e5,
        flux_max=6e5,
        n_transients=4,
        n_vanished=2,
        transient_isolation=35.0,
    )
    base.update(kw)
    return simulate_pair(256, xy0=(500, 700), **base)


def test_pair_geometry_and_misregistration():
    pair = _pair()
    sci, tpl = pair.science, pair.template
    assert sci.shape == (256, 256) and tpl.shape == (296, 296)
    assert sci.xy0 == (500, 700) and tpl.xy0 == (480, 680)
    # the same parent pixel is the same sky position in both WCSs
    ra_s, de_s = sci.wcs.all_pix2world([[100.0 - 500, 150.0 - 700]], 0)[0]
    ra_t, de_t = tpl.wcs.all_pix2world([[100.0 - 480, 150.0 - 680]], 0)[0]
    assert ra_s == pytest.approx(ra_t, abs=1e-10) and de_s == pytest.approx(de_t, abs=1e-10)
    # template sharper
    assert tpl.psf.fwhm() < sci.psf.fwhm()
    # centroid a bright isolated static star in both (noisy, background-subtracted) images
    t = pair.truth
    ok = (~t["is_transient"]) & t["is_star"] & t["in_science"]
    ok &= (
        (t["x_science"] > 520)
        & (t["x_science"] < 736)
        & (t["y_science"] > 720)
        & (t["y_science"] < 936)
    )
    row = t[ok][np.argmax(t["flux_template"][ok])]
    meas = []
    for exp, bkg, x, y in (
        (tpl, pair.template_background, row["x"], row["y"]),
        (sci, pair.science_background, row["x_science"], row["y_science"]),
    ):
        cx, cy = int(round(x)) - exp.xy0[0], int(round(y)) - exp.xy0[1]
        cut = (exp.image - bkg)[cy - 12 : cy + 13, cx - 12 : cx + 13].astype(np.float64)
        xc, yc, *_ = adaptive_moments(cut)
        meas.append((xc + cx - 12 + exp.xy0[0], yc + cy - 12 + exp.xy0[1]))
    assert meas[1][0] - meas[0][0] == pytest.approx(0.3, abs=0.05)
    assert meas[1][1] - meas[0][1] == pytest.approx(-0.45, abs=0.05)
    assert meas[0][0] == pytest.approx(row["x"], abs=0.05) and meas[0][1] == pytest.approx(
        row["y"], abs=0.05
    )


def test_pair_transient_fluxes_are_recovered_from_the_models():
    pair = _pair()
    tr = pair.transients
    assert (
        len(tr) == 6 and (tr["kind"] == "new").sum() == 4 and (tr["kind"] == "vanished").sum() == 2
    )
    new = tr[tr["kind"] == "new"]
    assert ((new["snr"] >= 10 - 1e-9) & (new["snr"] <= 100 + 1e-9)).all()
    assert (tr["delta_flux"][tr["kind"] == "vanished"] < 0).all()
    # science − scaled template over a box around each transient
    sci_src = pair.science_model.astype(np.float64) - pair.science_background
    tpl_src = pair.template_model.astype(np.float64) - pair.template_background
    tpl_on_sci = tpl_src[20:-20, 20:-20]
    diff = sci_src - pair.flux_scale * tpl_on_sci
    h = 15
    for row in tr:
        cx, cy = int(round(row["x"])) - 500, int(round(row["y"])) - 700
        got = diff[cy - h : cy + h + 1, cx - h : cx + h + 1].sum()
        assert got == pytest.approx(row["delta_flux"], rel=0.01)
    # truth bookkeeping
    t = pair.truth
    assert t["is_transient"].sum() == 6
    np.testing.assert_allclose(t["x_science"] - t["x"], 0.3)
    static = ~t["is_transient"]
    np.testing.assert_allclose(t["flux_science"][static], 1.3 * t["flux_template"][static])
    assert pair.science.photo_calib.calibration_mean == pytest.approx(
        pair.template.photo_calib.calibration_mean / 1.3
    )


def test_pair_defaults_and_determinism():
    a = simulate_pair(size=128, seed=2)
    b = simulate_pair(size=128, seed=2)
    c = simulate_pair(size=128, seed=3)
    for name in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(a.science, name), getattr(b.science, name))
        np.testing.assert_array_equal(getattr(a.template, name), getattr(b.template, name))
    np.testing.assert_array_equal(a.science_model, b.science_model)
    assert a.truth.pformat() == b.truth.pformat()
    assert not np.array_equal(a.science.image, c.science.image)
    assert len(a.transients) == 5 and a.template.psf.fwhm() < a.science.psf.fwhm()
    r1 = simulate_exposure(96, seed=(4, 5), n_stars=10, cosmic_rays=3, bad_columns=1, n_galaxies=2)
    r2 = simulate_exposure(96, seed=(4, 5), n_stars=10, cosmic_rays=3, bad_columns=1, n_galaxies=2)
    np.testing.assert_array_equal(r1.exposure.image, r2.exposure.image)
    np.testing.assert_array_equal(r1.cr_mask, r2.cr_mask)


def test_snr_helpers_invert_each_other():
    k = GaussianPsf(fwhm=3.0, size=21).kernel_image()
    f = flux_for_snr(np.array([5.0, 20.0, 100.0]), k, 400.0, gain=2.0)
    np.testing.assert_allclose(psf_snr(f, k, 400.0, gain=2.0), [5.0, 20.0, 100.0], rtol=1e-10)


# --- metadata ---------------------------------------------------------------------------
def test_exposure_metadata_wcs_and_calibration():
    res = simulate_exposure(
        64,
        xy0=(10, 20),
        seed=12,
        n_stars=5,
        gain=1.5,
        read_noise=6.0,
        saturation=50000.0,
        visit=903342,
        photo_calib=2.5,
    )
    md = res.exposure.metadata
    assert md["GAIN"] == 1.5 and md["RDNOISE"] == 6.0 and md["SATURATE"] == 50000.0
    assert md["SIMSEED"] == 12 and md["VISIT"] == 903342
    assert res.exposure.photo_calib.calibration_mean == 2.5
    w = res.exposure.wcs
    scale = np.abs(np.linalg.det(w.pixel_scale_matrix)) ** 0.5 * 3600
    assert scale == pytest.approx(0.2)
    ra, dec = w.all_pix2world([[31.5, 31.5]], 0)[0]
    assert ra == pytest.approx(150.0) and dec == pytest.approx(2.2)
    assert isinstance(res, SimResult) and res.truth.meta["gain"] == 1.5
    wcs2 = make_wcs(Box(0, 0, 10, 10), ra=10.0, dec=-30.0, reference=(0.0, 0.0))
    assert tuple(wcs2.wcs.crpix) == (1.0, 1.0)


# --- validation -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call",
    [
        lambda: simulate_exposure(-5),
        lambda: simulate_exposure((0, 10)),
        lambda: simulate_exposure(32, gain=0.0),
        lambda: simulate_exposure(32, read_noise=-1.0),
        lambda: simulate_exposure(32, sky=-1.0),
        lambda: simulate_exposure(32, noise="laplace"),
        lambda: simulate_exposure(32, no_such_option=1),
        lambda: simulate_exposure(32, seed=-1),
        lambda: simulate_exposure(32, seed="x"),
        lambda: simulate_exposure(32, n_stars=-3),
        lambda: simulate_exposure(32, flux_min=10.0, flux_max=1.0),
        lambda: simulate_exposure(32, psf=-2.0),
        lambda: simulate_exposure(32, psf="gaussian"),
        lambda: simulate_exposure(32, n_stars=500, min_separation=10.0),
        lambda: simulate_exposure(32, catalog=Table({"x": [1.0]})),
        lambda: PsfSpec(fwhm=0.0),
        lambda: PsfSpec(kind="airy"),
        lambda: PsfSpec(kind="moffat", beta=0.5),
        lambda: PsfSpec(variation=(1, 2, 3, 4, 5, 6)),
        lambda: PsfSpec(fwhm=3.0, variation=(-2.0,)).fwhm_at(9.0, 0.0, Box(0, 0, 10, 10)),
        lambda: simulate_exposure(32, psf=PsfSpec(fwhm=3.0, variation=(0.0, 0.0, -2.0))),
        lambda: FieldConfig(galaxy_axis_ratio=(0.5, 1.5)),
        lambda: ObsConfig(trails=[1]),
        lambda: simulate_pair(64, template_border=-1),
        lambda: simulate_pair(64, science={"not_a_field": 1}),
        lambda: simulate_pair(64, sky=3.0),
        lambda: make_test_image(kernel_size=30),
        lambda: make_test_image(x_size=20, y_size=20),
        lambda: ChebyshevBackground((1.0, 2.0)),
    ],
)
def test_invalid_inputs_raise_invalid_input_error(call):
    with pytest.raises(InvalidInputError):
        call()


# --- LSST makeTestImage -----------------------------------------------------------------
def test_make_test_image_follows_lsst_steps():
    exp, cat = make_test_image()
    assert exp.shape == (256, 256) and exp.xy0 == (12345, 67890)
    psf = exp.psf
    assert (
        isinstance(psf, GaussianPsf) and psf.sigma == 2.0 and psf.size == 31 and psf.oversample == 1
    )
    rng = np.random.RandomState(5)
    buf = 31 // 2 + 1
    np.testing.assert_array_equal(cat["x"], rng.rand(20) * (256 - 2 * buf) + buf + 12345)
    np.testing.assert_array_equal(cat["y"], rng.rand(20) * (256 - 2 * buf) + buf + 67890)
    np.testing.assert_array_equal(cat["flux"], (rng.rand(20) * (2 - 1) + 1) * 500)
    assert (cat["flux_err"] == 20).all() and (cat["footprint_radius"] == 10.0).all()
    # rebuild the model from the catalog: variance = sqrt|model| + 25, noise mean-subtracted
    model = np.zeros((256, 256))
    for row in cat:
        st = psf.compute_image(row["x"], row["y"]) * row["flux"]
        cx, cy = int(round(row["x"])) - 12345, int(round(row["y"])) - 67890
        model[cy - 15 : cy + 16, cx - 15 : cx + 16] += st
    np.testing.assert_allclose(exp.variance, np.sqrt(np.abs(model)) + 25.0, rtol=1e-5)
    noise = exp.image.astype(np.float64) - model
    assert abs(noise.mean()) < 1e-4
    assert noise.std() == pytest.approx(5.0, rel=0.02)
    noise_ref = np.random.RandomState(6).randn(256, 256) * 5.0
    np.testing.assert_allclose(noise, noise_ref - noise_ref.mean(), atol=2e-3)
    det = _bit(exp, "DETECTED")
    for row in cat:
        assert det[int(round(row["y"])) - 67890, int(round(row["x"])) - 12345]
    assert det.mean() < 0.3
    # a template border keeps the same sources (LSST's invariant) in a larger image
    tmpl, tcat = make_test_image(template_border_size=20, noise_seed=7)
    assert tmpl.shape == (296, 296) and tmpl.xy0 == (12325, 67870)
    np.testing.assert_allclose(tcat["x"], cat["x"]) and np.testing.assert_allclose(
        tcat["y"], cat["y"]
    )
    # calibration divides the masked image
    cal, _ = make_test_image(calibration=2.0, detect=False)
    np.testing.assert_allclose(cal.image, exp.image / 2.0, rtol=1e-6)
    np.testing.assert_allclose(cal.variance, exp.variance / 4.0, rtol=1e-6)
    assert cal.photo_calib.calibration_mean == 2.0
    again, _ = make_test_image()
    np.testing.assert_array_equal(again.image, exp.image)
    np.testing.assert_array_equal(again.mask, exp.mask)


# --- scale ------------------------------------------------------------------------------
def test_a_2048_field_with_2000_stars_renders():
    t0 = time.perf_counter()
    res = simulate_exposure(2048, n_stars=2000, seed=1, psf=PsfSpec(kind="moffat", fwhm=3.5))
    elapsed = time.perf_counter() - t0
    assert res.exposure.shape == (2048, 2048) and len(res.truth) == 2000
    assert np.isfinite(res.exposure.image).all()
    assert elapsed < 60  # generous: a sanity bound, not a benchmark


@pytest.mark.slow
def test_a_4096_field_with_5000_stars_renders():
    res = simulate_exposure(
        4096, n_stars=5000, seed=1, psf=PsfSpec(kind="moffat", fwhm=4.0, variation=(0.15, 0.1))
    )
    assert res.exposure.shape == (4096, 4096) and isinstance(res.exposure.psf, GridPsf)


# --- realistic_raw_pair (issue 14): the defects of raw data, each measured -------------------


def test_realistic_raw_pair_carries_raw_defects():
    from gpudiff.sim import realistic_raw_pair

    p = realistic_raw_pair(384, science_fwhm_ratio=1.4, seed=3)
    sci, tpl = p.science, p.template
    a = p.artefacts
    bad_bit = sci.mask_planes.bitmask("BAD")
    for exp, cols in ((sci, a["bad_columns_science"]), (tpl, a["bad_columns_template"])):
        assert len(cols) == 2
        for c in cols:
            col = np.asarray(exp.image)[:, c]
            assert (np.asarray(exp.mask)[:, c] & bad_bit).all()
            # Garbage: spread over [-500, 5 x saturation], far beyond any real pixel.
            assert col.max() > 2 * a["saturation"] and col.std() > 0.5 * a["saturation"]
    assert set(a["bad_columns_science"]).isdisjoint(a["bad_columns_template"])
    # Saturated cores are masked SAT; the PSF stamps reach beyond the largest kernel (35 px).
    sat = p.science_result.masks["saturated"]
    assert sat.any() and (np.asarray(sci.mask)[sat] & sci.mask_planes.bitmask("SAT")).all()
    assert sci.psf.kernel_image(192, 192).shape[0] > 35
    # A trail in the science image only.
    assert p.science_result.masks["trail"].any() and not p.template_result.masks["trail"].any()
    # Residual sky: source-free science pixels sit 0.3 sigma above zero on average (the
    # plane is 0.3 sigma at the centre with a linear gradient, so its mean over the image
    # is 0.3 sigma); 0.05 sigma tolerance covers the ~1e4 pixels' noise and faint wings.
    srcs = p.science_result.sources
    free = (np.abs(srcs) < 0.01) & (np.asarray(sci.mask) == 0)
    resid = np.median(np.asarray(sci.image)[free]) / a["sky_sigma_science"]
    assert abs(resid - 0.3) < 0.05, resid
    # Cosmic rays: some flagged CR, some not.
    cr = p.science_result.cr_mask
    flagged = (np.asarray(sci.mask) & sci.mask_planes.bitmask("CR")) != 0
    assert (cr & flagged).any() and (cr & ~flagged).any()
    # NO_DATA strip in the template: NaN image, masked.
    x0, _, x1, _ = a["no_data"]
    assert np.isnan(np.asarray(tpl.image)[:, x0:x1]).all()
    assert (np.asarray(tpl.mask)[:, x0:x1] & tpl.mask_planes.bitmask("NO_DATA")).all()
    # Transients span S/N 5-100 and are flagged when a defect is near.
    snr = np.asarray(p.transients["snr"], float)
    new = np.asarray(p.transients["kind"]) == "new"
    assert snr[new].min() >= 5 - 1e-9 and snr[new].max() <= 100 + 1e-9
    assert "near_defect" in p.transients.colnames


def test_realistic_raw_pair_few_stars_and_orderings():
    from gpudiff.sim import realistic_raw_pair

    p = realistic_raw_pair(256, science_fwhm_ratio=0.75, few_stars=True, seed=5)
    truth = p.truth
    static = truth["is_star"] & ~truth["is_transient"]
    unsaturated = np.asarray(truth["flux_template"])[static] < 1e6
    assert unsaturated.sum() < 10
    assert p.science.psf.fwhm() < p.template.psf.fwhm()
    q = realistic_raw_pair(256, science_fwhm_ratio=1.4, few_stars=True, seed=5)
    assert q.science.psf.fwhm() > 1.3 * q.template.psf.fwhm()


def test_bright_stars_do_not_move_other_sources():
    base = make_catalog(256, n_stars=30, seed=9)
    more = make_catalog(256, n_stars=30, n_bright_stars=3, bright_flux=(1e6, 2e6), seed=9)
    assert len(more) == 33
    assert np.array_equal(np.asarray(base["x"]), np.asarray(more["x"])[:30])
    assert (np.asarray(more["flux"])[30:] >= 1e6).all()
