"""DecorrelateALKernelTask (docs/algorithms.md §5), mirroring ip_diffim's test_imageDecorrelation.py
(§11.4).

Scenario (``makeFakeImages``): 256² images at parent −128..127, science PSF σ 3.3, template
PSF σ 2.2, white noise of variance svar / tvar, an analytic Gaussian matching kernel of
σ = sqrt(3.3² − 2.2²) on a 32×32 grid centred on pixel 15.  Pure-noise pairs are cut from
larger fields after convolving, so they have no copied edges, and tight tolerances hold.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpudiff.errors import AllMaskedError, InvalidInputError, ShapeMismatchError
from gpudiff.image import Box, Exposure, GaussianPsf, MaskedImage
from gpudiff.ops import convolve_masked_image, image_statistics
from gpudiff.psfmatch import KernelBasis, SpatialFunctions, SpatialKernel
from gpudiff.tasks.decorrelate import (
    DecorrelateALKernelConfig,
    DecorrelateALKernelTask,
    common_shape,
)

X0 = -128
EDGE = 17  # the LSST test's autocorrelation edge


def _gauss_kernel(sigma, size=32, ctr=15):
    yy, xx = np.mgrid[0:size, 0:size]
    k = np.exp(-((xx - ctr) ** 2 + (yy - ctr) ** 2) / (2 * sigma**2))
    return k / k.sum()


KERNEL = _gauss_kernel(np.sqrt(3.3**2 - 2.2**2))


def _render(n, xs, ys, flux, sigma):
    yy, xx = np.mgrid[0:n, 0:n].astype(float)
    img = np.zeros((n, n))
    for x, y, f in zip(xs, ys, flux):
        g = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
        img += f * g / g.sum()
    return img


def _fake(backend, svar, tvar, seed=66, n_src=50, n=256, s_sigma=3.3, t_sigma=2.2):
    """Science and template exposures (``makeFakeImages``), constant variance planes."""
    rng = np.random.default_rng(seed)
    xs, ys = rng.uniform(16, n - 6, n_src), rng.uniform(16, n - 6, n_src)
    flux = rng.uniform(50, 30000, n_src)
    sflux = flux.copy()
    if n_src:  # the source nearest the centre brightens by 1/50 in the science image
        sflux[np.argmin((xs - n / 2) ** 2 + (ys - n / 2) ** 2)] *= 1 + 1 / 50
    sci = _render(n, xs, ys, sflux, s_sigma) + rng.normal(0, np.sqrt(svar), (n, n))
    tmp = _render(n, xs, ys, flux, t_sigma) + rng.normal(0, np.sqrt(tvar), (n, n))

    def mk(img, v, s):
        return Exposure.from_arrays(
            img, np.full((n, n), v), xy0=(X0, X0), psf=GaussianPsf(s, size=25), backend=backend
        )

    return mk(sci, svar, s_sigma), mk(tmp, tvar, t_sigma)


def _subtract(a: MaskedImage, b: MaskedImage, scale=1.0):
    """(a − b)/scale with variances summed (/scale²) and masks ORed."""
    return MaskedImage(
        (a.image - b.image) / scale,
        (a.variance + b.variance) / scale**2,
        a.mask | b.mask,
        xy0=a.xy0,
        backend=a.backend,
    )


def _template_matched(sci, tmpl, kernel=KERNEL, copy_edge=True):
    matched = convolve_masked_image(tmpl.masked_image, kernel, do_copy_edge=copy_edge)
    return Exposure(_subtract(sci.masked_image, matched), psf=sci.psf)


def _clean_pair(backend, svar, tvar, seed, n=256, border=24, s_sigma=3.3, t_sigma=2.2):
    """Pure-noise science and template on a box cut from a larger field, so that
    convolutions of the field are valid on the whole box."""
    sci, tmpl = _fake(
        backend, svar, tvar, seed=seed, n_src=0, n=n + 2 * border, s_sigma=s_sigma, t_sigma=t_sigma
    )
    box = Box(X0 + border, X0 + border, X0 + border + n, X0 + border + n)
    return sci, tmpl, box


def _np(a, backend):
    return np.asarray(backend.asnumpy(a), dtype=np.float64)


def _rho(img, lag, axis):
    """Normalized autocorrelation at ``lag`` along ``axis``, away from the edges."""
    a = img[EDGE:-EDGE, EDGE:-EDGE]
    a = a - a.mean()
    x, y = (a[:, :-lag], a[:, lag:]) if axis == 1 else (a[:-lag], a[lag:])
    return float((x * y).mean() / a.var())


def _radial_power(img, nbins=8):
    """Noise power in radial frequency bins, normalized by the variance (1 = white)."""
    a = img[EDGE:-EDGE, EDGE:-EDGE]
    a = a - a.mean()
    p = np.abs(np.fft.fft2(a)) ** 2 / a.size
    kr = np.hypot(np.fft.fftfreq(a.shape[0])[:, None], np.fft.fftfreq(a.shape[1])[None, :])
    edges = np.linspace(0, 0.5, nbins + 1)
    return (
        np.array([p[(kr >= lo) & (kr < hi)].mean() for lo, hi in zip(edges[:-1], edges[1:])])
        / a.var()
    )


# --- §11.4 testDiffimCorrection ---------------------------------------------------------------


@pytest.mark.parametrize("complete", [False, True])
@pytest.mark.parametrize("svar,tvar", [(0.04, 0.04), (0.08, 0.04), (0.04, 0.08)])
def test_diffim_correction(backend, svar, tvar, complete):
    sci, tmpl = _fake(backend, svar, tvar)
    diff = _template_matched(sci, tmpl)
    target = svar + tvar
    before_pix, before_var = (
        image_statistics(diff)["variance"],
        image_statistics(diff, use_variance=True)["mean"],
    )
    assert before_pix < target and before_var < target
    cfg = DecorrelateALKernelConfig(complete_var_plane_propagation=complete)
    res = DecorrelateALKernelTask(cfg, backend=backend).run(sci, tmpl, diff, KERNEL)
    pix = image_statistics(res.corrected_exposure)["variance"]
    var = image_statistics(res.corrected_exposure, use_variance=True)["mean"]
    np.testing.assert_allclose(pix, target, rtol=0.05)
    np.testing.assert_allclose(var, target, rtol=0.02)
    np.testing.assert_allclose(pix, var, rtol=0.05)


# --- §11.4 testNoiseDiffimCorrection, with tighter checks ------------------------------------


def test_noise_diffim_correction(backend):
    sci, tmpl = _fake(backend, 1.0, 100.0, seed=22, n_src=0)
    diff = _template_matched(sci, tmpl)
    res = DecorrelateALKernelTask(backend=backend).run(sci, tmpl, diff, KERNEL)
    s_img, d_img = _np(sci.image, backend), _np(diff.image, backend)
    c_img = _np(res.corrected_exposure.image, backend)
    for axis in (0, 1):
        rs = [_rho(s_img, r, axis) for r in range(1, 40)]
        rd = [_rho(d_img, r, axis) for r in range(1, 4)]
        rc = [_rho(c_img, r, axis) for r in range(1, 40)]
        np.testing.assert_allclose(rs, 0, atol=0.1)
        assert min(rd) > 0.2
        np.testing.assert_allclose(rc, 0, atol=0.1)
        # Stricter than LSST: lag 1 strongly correlated before, white after.
        assert rd[0] > 0.1 and abs(rc[0]) < 0.02
    # The raw difference's power is concentrated at low frequencies; after the
    # correction it is flat to 10 %.
    raw, flat = _radial_power(d_img), _radial_power(c_img)
    assert raw.max() / raw.min() > 10
    np.testing.assert_allclose(flat, 1.0, atol=0.1)


@pytest.mark.parametrize("complete", [False, True])
def test_pure_noise_variance_plane_matches_noise(backend, complete):
    sci, tmpl, box = _clean_pair(backend, 1.0, 100.0, seed=5)
    matched = convolve_masked_image(tmpl.masked_image, KERNEL).subimage(box)
    sci, tmpl = sci.subimage(box), tmpl.subimage(box)
    diff = Exposure(_subtract(sci.masked_image, matched), psf=sci.psf)
    cfg = DecorrelateALKernelConfig(complete_var_plane_propagation=complete)
    out = (
        DecorrelateALKernelTask(cfg, backend=backend)
        .run(sci, tmpl, diff, KERNEL)
        .corrected_exposure
    )
    img, var = _np(out.image, backend), _np(out.variance, backend)
    assert abs(np.std(img) / np.sqrt(np.mean(var)) - 1) < 0.02
    assert abs(np.mean(var) / 101.0 - 1) < 0.01  # svar + tvar·kSum²
    assert _rho(_np(diff.image, backend), 1, 1) > 0.1 and abs(_rho(img, 1, 1)) < 0.02


# --- science convolved (§5.2) ----------------------------------------------------------------


@pytest.mark.parametrize("ksum", [1.0, 1.3])
def test_science_matched(backend, ksum):
    # The science has the sharper PSF and is the image convolved; the subtraction divides
    # by ΣK so the difference stays in science units.
    sci, tmpl, box = _clean_pair(backend, 25.0, 1.0, seed=8, s_sigma=2.2, t_sigma=3.3)
    kernel = KERNEL * ksum
    matched = convolve_masked_image(sci.masked_image, kernel).subimage(box)
    sci, tmpl = sci.subimage(box), tmpl.subimage(box)
    diff = Exposure(_subtract(matched, tmpl.masked_image, ksum), psf=tmpl.psf)
    res = DecorrelateALKernelTask(backend=backend).run(
        sci, tmpl, diff, kernel, template_matched=False
    )
    out = res.corrected_exposure
    img, var = _np(out.image, backend), _np(out.variance, backend)
    assert abs(np.std(img) / np.sqrt(np.mean(var)) - 1) < 0.02
    np.testing.assert_allclose(np.mean(var), (1.0 + 25.0 * ksum**2) / ksum**2, rtol=0.01)
    assert _rho(_np(diff.image, backend), 1, 1) > 0.1 and abs(_rho(img, 1, 1)) < 0.02
    assert out.psf is tmpl.psf
    np.testing.assert_allclose(res.kernel_sum, ksum, rtol=1e-12)


# --- score images (§5.3) ---------------------------------------------------------------------


def _score_pair(backend, s_sigma, t_sigma, noise=1.0, seed=7, n=256):
    sci, tmpl, box = _clean_pair(
        backend, noise**2, noise**2, seed=seed, n=n, s_sigma=s_sigma, t_sigma=t_sigma
    )
    pre = sci.psf.kernel_image()[
        ::-1, ::-1
    ]  # the reflected PSF: "convolving" is then a matched filter
    kernel = _gauss_kernel(np.sqrt(2 * s_sigma**2 - t_sigma**2), 31, 15)
    ms = convolve_masked_image(sci.masked_image, pre).subimage(box)
    mt = convolve_masked_image(tmpl.masked_image, kernel).subimage(box)
    score = Exposure(_subtract(ms, mt), psf=sci.psf)
    return sci.subimage(box), tmpl.subimage(box), score, kernel, pre


def test_score_equal_psfs(backend):
    # §11.3 test_equal_images / test_scale_variance: std ≈ √2σ/√NEA, ⟨var⟩ ≈ 2σ²/NEA.
    sci, tmpl, score, kernel, pre = _score_pair(backend, 2.4, 2.4, n=400)
    res = DecorrelateALKernelTask(backend=backend).run(
        sci, tmpl, score, kernel, pre_conv_mode=True, pre_conv_kernel=pre
    )
    out = res.corrected_exposure
    img, var = _np(out.image, backend), _np(out.variance, backend)
    nea = 1.0 / np.sum(sci.psf.kernel_image() ** 2)
    assert np.isfinite(img).all()
    np.testing.assert_allclose(np.std(img), np.sqrt(2.0 / nea), rtol=0.1)
    np.testing.assert_allclose(np.mean(var), 2.0 / nea, rtol=0.1)
    assert abs(np.std(img) / np.sqrt(np.mean(var)) - 1) < 0.05
    assert out.psf is sci.psf  # §5.4: the score keeps the science PSF
    # The default preconvolution kernel is the science PSF (symmetric here).
    dflt = DecorrelateALKernelTask(backend=backend).run(
        sci, tmpl, score, kernel, pre_conv_mode=True
    )
    np.testing.assert_allclose(_np(dflt.corrected_exposure.image, backend), img, atol=1e-6)


@pytest.mark.parametrize("t_sigma", [2.0, 2.8])
def test_score_variance_plane_matches_noise(backend, t_sigma):
    sci, tmpl, score, kernel, pre = _score_pair(backend, 2.4, t_sigma, noise=0.3, seed=9, n=400)
    res = DecorrelateALKernelTask(backend=backend).run(
        sci, tmpl, score, kernel, pre_conv_mode=True, pre_conv_kernel=pre
    )
    img, var = (
        _np(res.corrected_exposure.image, backend),
        _np(res.corrected_exposure.variance, backend),
    )
    # A score is smooth (few independent pixels), hence the looser 5 %.
    assert abs(np.std(img) / np.sqrt(np.mean(var)) - 1) < 0.05


# --- exact properties ------------------------------------------------------------------------


@pytest.mark.parametrize("template_matched", [True, False])
def test_weights_fft_shape_and_correction_kernel(backend, template_matched):
    sci, tmpl = _fake(backend, 0.5, 2.0, n_src=0, n=120)
    diff = _template_matched(sci, tmpl)
    k = KERNEL * 1.2
    res = DecorrelateALKernelTask(backend=backend).run(
        sci, tmpl, diff, k, template_matched=template_matched
    )
    s, t = (0.5, 2.0) if template_matched else (2.0, 0.5)
    w1, w2 = res.variance_weights
    # Parseval: the whitened noise power is σ_S² + σ_T²·kSum² at every frequency.
    np.testing.assert_allclose(w1 * s + w2 * t, s + t * 1.44, rtol=1e-9)
    assert (
        res.fft_shape == (152, 152) == common_shape((32, 32), (25, 25), (120, 120))
    )  # 120 + 32 − 1 → even
    ck = res.correction_kernel
    assert ck.shape == (65, 65) and np.argmax(ck) == ck.size // 2
    np.testing.assert_allclose(ck, ck[::-1, ::-1], atol=1e-12)  # real and even
    assert abs(ck.sum() - 1) < 1e-3  # corr(0) = 1: the flux scale is kept


def test_common_shape():
    assert common_shape((31, 31), (25, 25), (100, 81)) == (130, 112)
    assert common_shape((3, 5), (4, 4), (25, 25), (10, 12)) == (34, 36)  # 25+10−1, 25+12−1 → even


def test_inputs_unchanged_and_new_exposure(backend):
    sci, tmpl = _fake(backend, 0.04, 0.08, n=96, n_src=5)
    diff = _template_matched(sci, tmpl)
    before = [
        _np(a, backend).copy() for e in (sci, tmpl, diff) for a in (e.image, e.variance, e.mask)
    ]
    out = DecorrelateALKernelTask(backend=backend).run(sci, tmpl, diff, KERNEL).corrected_exposure
    after = [_np(a, backend) for e in (sci, tmpl, diff) for a in (e.image, e.variance, e.mask)]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert out is not diff and out.masked_image is not diff.masked_image
    np.testing.assert_array_equal(_np(out.mask, backend), _np(diff.mask, backend))
    assert out.xy0 == diff.xy0 and out.psf is diff.psf
    assert out.image.dtype == np.float32 and out.variance.dtype == np.float32


def test_nonfinite_pixels_restored(backend):
    sci, tmpl = _fake(backend, 0.04, 0.04, n=96, n_src=0)
    diff = _template_matched(sci, tmpl)
    img = _np(diff.image, backend)
    img[40, 50], img[10, 11], img[70, 3] = np.nan, np.inf, -np.inf
    diff = Exposure(
        MaskedImage(img, diff.variance, diff.mask, xy0=diff.xy0, backend=backend), psf=diff.psf
    )
    out = _np(
        DecorrelateALKernelTask(backend=backend)
        .run(sci, tmpl, diff, KERNEL)
        .corrected_exposure.image,
        backend,
    )
    assert np.isnan(out[40, 50]) and out[10, 11] == np.inf and out[70, 3] == -np.inf
    assert np.isfinite(out).sum() == out.size - 3


def test_all_nan_science_skips(backend):
    sci, tmpl = _fake(backend, 0.04, 0.04, n=64, n_src=0)
    diff = _template_matched(sci, tmpl)
    # No usable pixel, so the science variance mean is NaN, and the image is all NaN.
    nan_sci = Exposure.from_arrays(
        np.full((64, 64), np.nan),
        np.full((64, 64), np.nan),
        xy0=sci.xy0,
        psf=sci.psf,
        backend=backend,
    )
    res = DecorrelateALKernelTask(backend=backend).run(nan_sci, tmpl, diff, KERNEL)
    assert res.correction_kernel is None and res.corrected_exposure is not diff
    np.testing.assert_array_equal(
        _np(res.corrected_exposure.image, backend), _np(diff.image, backend)
    )


def test_ignored_mask_planes_in_variance_means(backend):
    sci, tmpl = _fake(backend, 1.0, 1.0, n=96, n_src=0)
    var = _np(sci.variance, backend)
    mask = np.zeros(var.shape, np.int32)
    var[:, :30] *= 10.0  # 31 % of the pixels: too many for the clipping to remove
    mask[:, :30] = sci.mask_planes.bitmask("DETECTED")
    sci2 = Exposure.from_arrays(
        _np(sci.image, backend), var, mask, xy0=sci.xy0, psf=sci.psf, backend=backend
    )
    diff = _template_matched(sci2, tmpl)
    res = DecorrelateALKernelTask(backend=backend).run(sci2, tmpl, diff, KERNEL)
    np.testing.assert_allclose(res.svar, 1.0, rtol=1e-6)
    cfg = DecorrelateALKernelConfig(ignore_mask_planes=())
    assert DecorrelateALKernelTask(cfg, backend=backend).run(sci2, tmpl, diff, KERNEL).svar > 3.0


class _Recorder:
    """A kernel-like object that records where it is evaluated."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def kernel_image(self, x, y):
        self.calls.append((x, y))
        return self.kernel


def test_kernel_position_and_spatial_kernel(backend):
    sci, tmpl = _fake(backend, 0.04, 0.04, n=96, n_src=0)
    diff = _template_matched(sci, tmpl)
    task = DecorrelateALKernelTask(backend=backend)
    rec = _Recorder(KERNEL)
    task.run(sci, tmpl, diff, rec)
    task.run(sci, tmpl, diff, rec, x=-100.0, y=-90.0)
    assert rec.calls == [
        (0.5 * (2 * X0 + 96), 0.5 * (2 * X0 + 96)),
        (-100.0, -90.0),
    ]  # LSST (begin+end)/2
    # A spatially varying kernel is evaluated once and treated as constant.
    basis = KernelBasis(np.stack([KERNEL, _gauss_kernel(1.5)]), "alard-lupton")
    sk = SpatialKernel(
        basis,
        np.array([[1.0, 0.0, 0.0], [0.0, 0.3, -0.2]]),
        SpatialFunctions("chebyshev1", 1, sci.bbox),
    )
    a = task.run(sci, tmpl, diff, sk, x=-80.0, y=-50.0).corrected_exposure
    b = task.run(sci, tmpl, diff, sk.kernel_image(-80.0, -50.0)).corrected_exposure
    np.testing.assert_allclose(_np(a.image, backend), _np(b.image, backend), atol=1e-6)
    assert not np.allclose(
        _np(task.run(sci, tmpl, diff, sk).corrected_exposure.image, backend),
        _np(a.image, backend),
        atol=1e-4,
    )


def test_template_cropped_to_science_box(backend):
    sci, tmpl, box = _clean_pair(backend, 0.04, 0.04, seed=3, n=64, border=10)
    s = sci.subimage(box)
    diff = Exposure(_subtract(s.masked_image, tmpl.subimage(box).masked_image), psf=s.psf)
    task = DecorrelateALKernelTask(backend=backend)
    a = task.run(s, tmpl, diff, KERNEL).corrected_exposure
    b = task.run(s, tmpl.subimage(box), diff, KERNEL).corrected_exposure
    np.testing.assert_array_equal(_np(a.variance, backend), _np(b.variance, backend))
    with pytest.raises(ShapeMismatchError):
        task.run(sci, tmpl, diff, KERNEL)  # the difference is not on the science box


def test_mode_errors(backend):
    sci, tmpl = _fake(backend, 0.04, 0.04, n=64, n_src=0)
    diff = _template_matched(sci, tmpl)
    task = DecorrelateALKernelTask(backend=backend)
    with pytest.raises(InvalidInputError):
        task.run(sci, tmpl, diff, KERNEL, template_matched=False, pre_conv_mode=True)
    with pytest.raises(InvalidInputError):
        task.run(sci, tmpl, diff, KERNEL, pre_conv_kernel=KERNEL)
    with pytest.raises(InvalidInputError):
        task.run(sci, tmpl, diff, np.ones(5))


def test_all_masked_variance_mean_raises(backend):
    sci, tmpl = _fake(backend, 0.04, 0.04, n=64, n_src=0)
    diff = _template_matched(sci, tmpl)
    edge = np.full((64, 64), sci.mask_planes.bitmask("EDGE"), np.int32)
    masked = Exposure.from_arrays(
        _np(sci.image, backend),
        _np(sci.variance, backend),
        edge,
        xy0=sci.xy0,
        psf=sci.psf,
        backend=backend,
    )
    with pytest.raises(AllMaskedError):
        DecorrelateALKernelTask(backend=backend).run(masked, tmpl, diff, KERNEL)


def test_complete_propagation_keeps_nonfinite_variance(backend):
    sci, tmpl = _fake(backend, 0.04, 0.04, n=96, n_src=0)
    var = _np(tmpl.variance, backend)
    var[30, 40] = np.nan
    tmpl2 = Exposure.from_arrays(
        _np(tmpl.image, backend), var, xy0=tmpl.xy0, psf=tmpl.psf, backend=backend
    )
    diff = _template_matched(sci, tmpl)
    cfg = DecorrelateALKernelConfig(complete_var_plane_propagation=True)
    res = DecorrelateALKernelTask(cfg, backend=backend).run(sci, tmpl2, diff, KERNEL)
    out = _np(res.corrected_exposure.variance, backend)
    # The pixel stays NaN; its neighbours saw the mean variance in its place.
    assert np.isnan(out[30, 40]) and np.isfinite(out).sum() == out.size - 1
    np.testing.assert_allclose(np.nanmedian(out), 0.08, rtol=0.01)


def test_corrected_diffim_psf_helper(backend):
    psf = GaussianPsf(2.0, size=15).kernel_image()
    flat = np.ones((40, 21))  # corr ≡ 1 on the rfft half-plane of a 40 × 40 grid: the identity
    out = DecorrelateALKernelTask.compute_corrected_diffim_psf(flat, psf, (40, 40), backend=backend)
    np.testing.assert_allclose(out, psf, atol=1e-12)


def test_grown_planes_skip_bad_fills_not_ray_fills(backend):
    """``grow_mask_planes`` dilate the defect planes by the filter's footprint (a gpudiff
    departure: LSST leaves the mask alone); with ``grow_skip_bad_fills`` a filled detector
    defect (BAD and INTRP) keeps its bits at its pixels, while a cosmic ray's fill (INTRP
    and CR) and an unfilled BAD pixel are still grown (docs/algorithms.md §14)."""
    sci, tmpl = _fake(backend, 0.04, 0.08, n=96, n_src=5)
    diff = _template_matched(sci, tmpl)
    mi = diff.masked_image
    planes = mi.mask_planes
    bad, intrp, cr = (planes.bitmask(p) for p in ("BAD", "INTRP", "CR"))
    m = np.zeros(mi.shape, np.int32)
    m[:, 30] = bad | intrp  # a filled bad column
    m[60:63, 70] = cr | intrp  # a filled cosmic ray
    m[20, 80] = bad  # a bad pixel left as it is
    d = Exposure(
        MaskedImage(mi.image, mi.variance, backend.asarray(m), xy0=mi.xy0, mask_planes=planes),
        diff.psf,
    )
    grown = {}
    for skip in (False, True):
        cfg = DecorrelateALKernelConfig(
            grow_mask_planes=("BAD", "INTRP", "CR"),
            grow_skip_bad_fills=skip,
            grow_mask_threshold=1e-3,
        )
        out = DecorrelateALKernelTask(cfg, backend=backend).run(sci, tmpl, d, KERNEL)
        grown[skip] = _np(out.corrected_exposure.mask, backend).astype(np.int64)
    for skip, g in grown.items():
        assert (g[:, 30] & bad).all()  # the column keeps its bits either way
        # The ray and the lone bad pixel are grown (their neighbours flagged) either way.
        assert (g[61, 69] & cr) and (g[61, 71] & cr) and (g[20, 79] & bad) and (g[20, 81] & bad)
    assert (grown[False][:, 29] & bad).all() and (grown[False][:, 31] & bad).all()
    assert not (grown[True][:, 29] & bad).any() and not (grown[True][:, 31] & bad).any()


@pytest.mark.parametrize("shape", [(2068, 2068), (1058, 1060), (530, 514)])
def test_host_kernel_rfft_and_cutout_equal_whole_plane_transforms(shape):
    """The CPU shortcuts (the kernel's rows only; the cut-out's rows only) give the bits of
    rfft2 of the wrapped kernel and of the cropped whole irfft2."""
    import scipy.fft as sfft

    from gpudiff.tasks.decorrelate import _wrap_kernel

    task = DecorrelateALKernelTask(backend="numpy")
    fkw = task.backend.fft_kwargs
    rng = np.random.default_rng(7)
    for kh, kw in ((21, 21), (35, 33), (4, 6)):
        k = rng.normal(size=(kh, kw))
        ref = sfft.rfft2(_wrap_kernel(np, k, shape), s=shape, **fkw)
        kft = task._kernel_rfft(k, shape)
        assert np.array_equal(kft, ref)
        corr = np.sqrt(1.0 / (0.3 + kft.real**2 + kft.imag**2))
        for half in (kh, 10):
            h = min(half, shape[0] // 2 - 1, shape[1] // 2 - 1)
            j = np.arange(-h, h + 1)
            whole = sfft.irfft2(corr, s=shape, **fkw)[np.ix_(j % shape[0], j % shape[1])]
            assert np.array_equal(task._cutout(corr, shape, half), whole)
