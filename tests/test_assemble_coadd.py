"""AssembleCoaddTask: LSST's drp_tasks tests (docs/algorithms.md §11.7) and the stacking rules of
§10.1–§10.3.

The mock data follow ``MockCoaddTestData``: a 201×301 box at (−123, −45), 10 visits
(100–109), 37 Gaussian sources, per-visit PSF σ ~ U(1.5, 3.0) (PSF-matched: σ = 3.0),
background 314.592, uniform noise U(0, 1)·5 (median-subtracted, identical in the direct
and PSF-matched warps), variance |image| + 5 and DETECTED where image > bg + 5·5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.io import fits

from gpudiff.errors import FitsReadError, InvalidInputError, NoWorkFound
from gpudiff.image import Box, Exposure, GaussianPsf, MaskPlanes, PhotoCalib, write_exposure
from gpudiff.ops.stats import clipped_mean_std
from gpudiff.tasks.assemble_coadd import AssembleCoaddConfig, AssembleCoaddTask, unpack_input_map
from gpudiff.tasks.coadd_warps import ExposureWarp, FitsWarp, as_warp
from gpudiff.tasks.compare_warp import CompareWarpAssembleCoaddConfig, CompareWarpAssembleCoaddTask

BBOX = Box(-123, -45, -123 + 201, -45 + 301)
VISITS = list(range(100, 110))
BG = 314.592


def _gauss_image(shape, xy0, xs, ys, fluxes, sigma):
    H, W = shape
    yy = np.arange(H)[:, None] + xy0[1]
    xx = np.arange(W)[None, :] + xy0[0]
    img = np.zeros(shape)
    for x, y, f in zip(xs, ys, fluxes):
        img += (
            f / (2 * np.pi * sigma**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
        )
    return img


def mock_coadd_data(seed=0, n_visits=10):
    """(direct warps, PSF-matched warps) as Exposures, per MockCoaddTestData."""
    rng = np.random.default_rng(seed)
    xs = rng.uniform(BBOX.x0 + 10, BBOX.x1 - 10, 37)
    ys = rng.uniform(BBOX.y0 + 10, BBOX.y1 - 10, 37)
    fluxes = rng.uniform(1, 1e4, 37) * 5.0 * 20  # bright and faint sources alike
    planes = MaskPlanes()
    det = planes.bitmask("DETECTED")
    direct, matched = [], []
    for k in range(n_visits):
        sigma = rng.uniform(1.5, 3.0)
        noise = rng.uniform(0, 1, BBOX.shape) * 5.0
        noise -= np.median(noise)
        out = []
        for s in (sigma, 3.0):
            img = _gauss_image(BBOX.shape, (BBOX.x0, BBOX.y0), xs, ys, fluxes, s) + BG + noise
            var = np.abs(img) + 5.0
            mask = np.where(img > BG + 25.0, det, 0).astype(np.int32)
            meta = fits.Header()
            meta["VISIT"] = VISITS[k]
            meta["BUNIT"] = "nJy"
            out.append(
                Exposure.from_arrays(
                    img,
                    var,
                    mask,
                    xy0=(BBOX.x0, BBOX.y0),
                    mask_planes=planes,
                    psf=GaussianPsf(sigma=s, size=15),
                    metadata=meta,
                    photo_calib=PhotoCalib(1.0),
                )
            )
        direct.append(out[0])
        matched.append(out[1])
    return direct, matched


@pytest.fixture(scope="module")
def mock():
    return mock_coadd_data()


# ----------------------------------------------------------------------------------------
# LSST's tests (docs/algorithms.md §11.7)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("warp_type", ["direct", "psfMatched"])
def test_basic_run_produces_a_coadd(mock, warp_type):
    direct, matched = mock
    warps = direct if warp_type == "direct" else matched
    res = AssembleCoaddTask(AssembleCoaddConfig(warp_type=warp_type, do_n_image=True)).run(warps)
    exp = res.coadd_exposure
    assert exp.bbox == BBOX
    assert np.isfinite(exp.image).all() and (exp.variance > 0).all()
    # every visit covers every pixel: nImage is 10 except where DETECTED... DETECTED is not bad
    assert (res.n_image == 10).all()
    # the background survives coaddition (noise medians are zero): within 0.5 (noise σ 1.4/√10)
    assert abs(np.median(exp.image) - BG) < 0.5
    if warp_type == "psfMatched":
        assert exp.psf.size == 15 and exp.psf.fwhm() == pytest.approx(3.0 * 2.354820, rel=1e-2)


def test_online_mean_equals_stack_mean(mock):
    direct, _ = mock
    stack = AssembleCoaddTask(AssembleCoaddConfig(statistic="MEAN")).run(direct).coadd_exposure
    online = AssembleCoaddTask(AssembleCoaddConfig(statistic="MEAN", do_online_for_mean=True)).run(
        direct
    )
    online = online.coadd_exposure
    # LSST's tolerances (testOnlineCoadd): image rtol 1e-3, variance rtol 1e-6, same masks
    np.testing.assert_allclose(online.image, stack.image, rtol=1e-3)
    np.testing.assert_allclose(online.variance, stack.variance, rtol=1e-6)
    np.testing.assert_array_equal(online.mask, stack.mask)


def test_input_map(mock):
    direct, _ = mock
    warps = [d.copy() for d in direct]
    bad = warps[5].mask_planes.bitmask("BAD")
    m = warps[5].mask.copy()
    m[50:150, 60:160] |= bad  # visit 105: a 100×100 BAD box
    warps[5] = Exposure.from_arrays(
        warps[5].image,
        warps[5].variance,
        m,
        xy0=warps[5].xy0,
        mask_planes=warps[5].mask_planes,
        psf=warps[5].psf,
    )
    res = AssembleCoaddTask(AssembleCoaddConfig(do_input_map=True, do_n_image=True)).run(warps)
    present = unpack_input_map(res.input_map, 10)
    assert present.shape == (10,) + BBOX.shape
    box = np.zeros(BBOX.shape, bool)
    box[50:150, 60:160] = True
    assert not present[5][box].any() and present[5][~box].all()
    for k in range(10):
        if k != 5:
            assert present[k].all()
    np.testing.assert_array_equal(present.sum(axis=0), res.n_image)
    # the BAD box rejected an input there: REJECTED and INEXACT_PSF, not NO_DATA
    mask = res.coadd_exposure.mask
    pl = res.coadd_exposure.mask_planes
    assert ((mask[box] & pl.bitmask("REJECTED")) != 0).all()
    assert ((mask[box] & pl.bitmask("INEXACT_PSF")) != 0).all()
    assert ((mask[~box] & pl.bitmask("REJECTED")) == 0).all()


def _with_cosmic_ray(exp: Exposure, rows, cols, amp=5000.0) -> Exposure:
    img = exp.image.copy()
    img[rows, cols] += amp
    return Exposure.from_arrays(
        img,
        exp.variance,
        exp.mask,
        xy0=exp.xy0,
        mask_planes=exp.mask_planes,
        psf=exp.psf,
        metadata=exp.metadata,
    )


def test_artifact_mask_identity(mock):
    """testArtifactMask: the direct warps with the artifact masks pre-applied, stacked with
    MEAN and bad planes (NO_DATA, BAD, SAT, CLIPPED, REJECTED), reproduce the CompareWarp
    coadd exactly (image and variance)."""
    direct, matched = mock
    direct, matched = list(direct), list(matched)
    # a cosmic ray (in both versions of visit 103) and a streak of 3 px (visit 107)
    for lst in (direct, matched):
        lst[3] = _with_cosmic_ray(lst[3], slice(100, 104), slice(40, 43))
        lst[7] = _with_cosmic_ray(lst[7], slice(200, 201), slice(20, 120), amp=800.0)
    cw = CompareWarpAssembleCoaddTask(CompareWarpAssembleCoaddConfig(do_scale_warp_variance=False))
    res = cw.run(direct, matched)
    assert res.metadata["n_clipped_footprints"] >= 2
    clipped_in = [len(a["CLIPPED"]) for a in res.alt_mask_list]
    assert clipped_in[3] >= 12 and clipped_in[7] >= 100
    pre = []
    for exp, alt in zip(direct, res.alt_mask_list):
        m = exp.mask.copy().reshape(-1)
        pl = exp.mask_planes.copy()
        for plane, idx in alt.items():
            m[idx] |= np.int32(1 << pl.add(plane))
        pre.append(
            Exposure.from_arrays(
                exp.image,
                exp.variance,
                m.reshape(exp.shape),
                xy0=exp.xy0,
                mask_planes=pl,
                psf=exp.psf,
            )
        )
    cfg = AssembleCoaddConfig(
        statistic="MEAN", bad_mask_planes=("NO_DATA", "BAD", "SAT", "CLIPPED", "REJECTED")
    )
    ref = AssembleCoaddTask(cfg).run(pre, weights=res.weights).coadd_exposure
    np.testing.assert_array_equal(ref.image, res.coadd_exposure.image)
    np.testing.assert_array_equal(ref.variance, res.coadd_exposure.variance)
    # and the artifacts are gone: the coadd at the cosmic ray is the mean of the other 9
    cpl = res.coadd_exposure.mask_planes
    assert ((res.coadd_exposure.mask[100:104, 40:43] & cpl.bitmask("CLIPPED")) != 0).all()


# ----------------------------------------------------------------------------------------
# statistics, variance and weights
# ----------------------------------------------------------------------------------------


def _stack(exps):
    return (
        np.stack([e.image for e in exps]).astype(np.float64),
        np.stack([e.variance for e in exps]).astype(np.float64),
    )


def test_weights_are_inverse_clipped_mean_variance(mock):
    direct, _ = mock
    task = AssembleCoaddTask(AssembleCoaddConfig(max_weight_samples=None))
    inputs = task.prepare_inputs(direct)
    w = inputs.weights
    assert not inputs.skipped
    for e, wk in zip(direct, w):
        m, _, _ = clipped_mean_std(
            e.variance,
            3.0,
            2,
            bad=(e.mask & e.mask_planes.bitmask(["NO_DATA", "BAD", "SAT", "EDGE"])) != 0,
        )
        assert wk == pytest.approx(1.0 / m, rel=1e-12)
    # the strided sample (every k-th pixel) changes weights by far less than their spread
    w_sub = (
        AssembleCoaddTask(AssembleCoaddConfig(max_weight_samples=5000))
        .prepare_inputs(direct)
        .weights
    )
    np.testing.assert_allclose(w_sub, w, rtol=2e-2)


def test_weighted_mean_and_propagated_variance(mock):
    direct, _ = mock
    res = AssembleCoaddTask(AssembleCoaddConfig(statistic="MEAN")).run(direct)
    img, var = _stack(direct)
    w = res.weights[:, None, None]
    expect = (w * img).sum(0) / w.sum()
    expect_var = (w * w * var).sum(0) / w.sum() ** 2
    # float32 output of float64 sums: relative 1e-6
    np.testing.assert_allclose(res.coadd_exposure.image, expect, rtol=1e-6)
    np.testing.assert_allclose(res.coadd_exposure.variance, expect_var, rtol=1e-6)


def test_median_and_meanclip_statistics(mock, rng):
    direct, _ = mock
    img, var = _stack(direct)
    med = AssembleCoaddTask(AssembleCoaddConfig(statistic="MEDIAN")).run(direct).coadd_exposure
    np.testing.assert_allclose(med.image, np.median(img, axis=0), rtol=1e-6)
    # MEANCLIP: a 10000-count outlier in one visit is clipped, and CLIPPED is set there only
    exps = list(direct)
    exps[2] = _with_cosmic_ray(exps[2], slice(10, 12), slice(10, 12), amp=1e4)
    res = AssembleCoaddTask(AssembleCoaddConfig(statistic="MEANCLIP")).run(exps)
    c = res.coadd_exposure
    clipped = (c.mask & c.mask_planes.bitmask("CLIPPED")) != 0
    assert clipped[10:12, 10:12].all()
    others = np.delete(img, 2, axis=0)[:, 10:12, 10:12]
    w = np.delete(res.weights, 2)[:, None, None]
    np.testing.assert_allclose(c.image[10:12, 10:12], (w * others).sum(0) / w.sum(), rtol=1e-5)
    # variance of the clipped pixels is propagated from the 9 used inputs only
    v = np.delete(var, 2, axis=0)[:, 10:12, 10:12]
    np.testing.assert_allclose(
        c.variance[10:12, 10:12], (w * w * v).sum(0) / w.sum() ** 2, rtol=1e-5
    )


def test_scatter_variance_option(mock):
    direct, _ = mock
    cfg = AssembleCoaddConfig(statistic="MEAN", calc_error_from_input_variance=False)
    res = AssembleCoaddTask(cfg).run(direct, weights=np.ones(10))
    img, _ = _stack(direct)
    np.testing.assert_allclose(res.coadd_exposure.variance, img.var(axis=0, ddof=1) / 10, rtol=1e-4)


# ----------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------


def _flag(exp: Exposure, plane: str, where) -> Exposure:
    pl = exp.mask_planes.copy()
    m = exp.mask | np.where(where, np.int32(1 << pl.add(plane)), np.int32(0))
    return Exposure.from_arrays(
        exp.image, exp.variance, m, xy0=exp.xy0, mask_planes=pl, psf=exp.psf
    )


def test_mask_propagation_rules(mock):
    direct, _ = mock
    exps = list(direct)
    H, W = BBOX.shape
    r = np.zeros((H, W), bool)
    r[0:10, :] = True  # SAT in one of 10 inputs (weight fraction ~0.1)
    r2 = np.zeros((H, W), bool)
    r2[20:30, :] = True  # SAT in three inputs (> 10 % of the weight)
    for k in (0, 1, 2):
        exps[k] = _flag(exps[k], "SAT", r2 | (r if k == 0 else False))
    exps[4] = _flag(exps[4], "EDGE", np.pad(np.ones((H, 5), bool), ((0, 0), (0, W - 5))))
    nodata = np.zeros((H, W), bool)
    nodata[-5:, -5:] = True
    for k in range(10):
        exps[k] = _flag(exps[k], "NO_DATA", nodata)
    res = AssembleCoaddTask(AssembleCoaddConfig(do_n_image=True)).run(exps)
    c = res.coadd_exposure
    pl = c.mask_planes
    has = lambda p: (c.mask & pl.bitmask(p)) != 0  # noqa: E731
    w = res.weights
    frac0 = w[0] / w.sum()
    # SAT from one input: set only if that input's weight fraction exceeds 0.1
    assert has("SAT")[0:10].all() == (frac0 > 0.1) and has("SAT")[0:10].any() == (frac0 > 0.1)
    assert has("SAT")[20:30].all()
    assert has("REJECTED")[20:30].all() and has("REJECTED")[0:10].all()
    assert has("SENSOR_EDGE")[:, :5].all() and not has("SENSOR_EDGE")[:, 5:].any()
    assert has("INEXACT_PSF")[:, :5].all()
    # no input: NO_DATA, NaN image, infinite variance, nImage 0
    assert has("NO_DATA")[nodata].all() and not has("NO_DATA")[~nodata].any()
    assert np.isnan(c.image[nodata]).all() and np.isinf(c.variance[nodata]).all()
    assert (res.n_image[nodata] == 0).all() and (res.n_image[20:30, 10:] == 7).all()
    # DETECTED of the used inputs is ORed in
    assert has("DETECTED").any()


def test_band_height_does_not_change_the_result(mock):
    direct, _ = mock
    one = AssembleCoaddTask(AssembleCoaddConfig(do_n_image=True)).run(direct)
    many = AssembleCoaddTask(
        AssembleCoaddConfig(do_n_image=True, max_band_bytes=48 * 10 * 201 * 7)
    ).run(direct)
    # max_band_bytes is shared by the CPU band threads: at most 7 rows per band
    rows = many.metadata["band_rows"]
    assert (
        one.metadata["n_bands"] == 1
        and rows <= 7
        and many.metadata["n_bands"] == math.ceil(301 / rows)
    )
    for a, b in (
        (one.coadd_exposure.image, many.coadd_exposure.image),
        (one.coadd_exposure.variance, many.coadd_exposure.variance),
        (one.coadd_exposure.mask, many.coadd_exposure.mask),
        (one.n_image, many.n_image),
    ):
        np.testing.assert_array_equal(a, b)


def test_partial_overlap_and_union_bbox(mock):
    direct, _ = mock
    part = [
        d.subimage(Box(BBOX.x0, BBOX.y0 + 100 * (k % 2), BBOX.x1, BBOX.y1))
        for k, d in enumerate(direct)
    ]
    res = AssembleCoaddTask(AssembleCoaddConfig(do_n_image=True)).run(part)
    assert res.coadd_exposure.bbox == BBOX
    assert (res.n_image[:100] == 5).all() and (res.n_image[100:] == 10).all()


# ----------------------------------------------------------------------------------------
# warp sources and input errors
# ----------------------------------------------------------------------------------------


def test_fits_warps_are_read_lazily_and_match_memory(mock, tmp_path):
    direct, _ = mock
    paths = []
    for k, d in enumerate(direct[:4]):
        p = tmp_path / f"w{k}.fits"
        write_exposure(p, d)
        paths.append(str(p))
    fw = as_warp(paths[0])
    assert isinstance(fw, FitsWarp) and fw.bbox == BBOX and fw.psf is not None
    band = fw.read(Box(BBOX.x0 + 3, BBOX.y0 + 10, BBOX.x0 + 50, BBOX.y0 + 20))
    np.testing.assert_array_equal(band.image, direct[0].image[10:20, 3:50])
    cfg = AssembleCoaddConfig(max_band_bytes=48 * 4 * 201 * 50)
    a = AssembleCoaddTask(cfg).run(paths).coadd_exposure
    b = AssembleCoaddTask(cfg).run([ExposureWarp(d) for d in direct[:4]]).coadd_exposure
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)


def test_bad_inputs_raise_clear_errors(mock, tmp_path):
    direct, _ = mock
    task = AssembleCoaddTask()
    with pytest.raises(InvalidInputError, match="non-empty list"):
        task.run([])
    with pytest.raises(InvalidInputError, match="input 1: a warp must be"):
        task.run([direct[0], 42])
    other = Exposure.from_arrays(
        direct[1].image,
        direct[1].variance,
        direct[1].mask,
        xy0=direct[1].xy0,
        photo_calib=PhotoCalib(2.0),
    )
    with pytest.raises(InvalidInputError, match="photometric calibration"):
        task.run([direct[0], other])
    nan = Exposure.from_arrays(np.full(BBOX.shape, np.nan), direct[0].variance, xy0=direct[0].xy0)
    with pytest.raises(NoWorkFound):
        task.run([nan])
    res = task.run([direct[0], nan, direct[1]])
    assert list(res.skipped.values()) == ["every pixel is NaN"] and res.weights[1] == 0
    with pytest.raises(FitsReadError, match="no such file"):
        task.run([str(tmp_path / "missing.fits")])
    for bad in (
        dict(statistic="MODE"),
        dict(clip_iter=0),
        dict(sigma_clip=-1.0),
        dict(max_band_bytes=0),
        dict(mask_propagation_thresholds={"SAT": 2.0}),
        dict(warp_type="deep"),
    ):
        with pytest.raises(InvalidInputError):
            AssembleCoaddConfig(**bad)
    with pytest.raises(InvalidInputError, match="weights"):
        task.run(direct[:2], weights=[1.0])
    with pytest.raises(InvalidInputError, match="PSF-matched"):
        CompareWarpAssembleCoaddTask().run(direct[:2], direct[:1])


def test_inputs_are_not_modified(mock):
    direct, matched = mock
    before = [(d.image.copy(), d.variance.copy(), d.mask.copy()) for d in direct]
    CompareWarpAssembleCoaddTask(CompareWarpAssembleCoaddConfig(do_scale_warp_variance=False)).run(
        direct, matched
    )
    for d, (i, v, m) in zip(direct, before):
        np.testing.assert_array_equal(d.image, i)
        np.testing.assert_array_equal(d.variance, v)
        np.testing.assert_array_equal(d.mask, m)
