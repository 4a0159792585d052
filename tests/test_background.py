"""ops.background: binned clipped means, bin filling, interpolation and extrapolation."""

from __future__ import annotations

import numpy as np
import pytest

from gpudiff.errors import AllMaskedError, InvalidInputError
from gpudiff.ops.background import bin_background, estimate_background, interpolate_background
from gpudiff.sim import PolynomialBackground, simulate_exposure

BG = PolynomialBackground(gradient=(150.0, -100.0), quadratic=(200.0, 50.0, -120.0))


def _rms(a):
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))


@pytest.fixture(scope="module")
def field():
    """512² star field on sky 1000 ADU plus a plane + quadratic background (±300 ADU)."""
    return simulate_exposure(512, seed=3, background=BG, sky=1000.0)


@pytest.mark.parametrize("order,bin_size", [("cubic", 128), ("cubic", 64), ("linear", 64)])
def test_plane_plus_quadratic_recovered(backend, field, order, bin_size):
    exp = field.exposure.to_backend(backend)
    before = backend.asnumpy(exp.image).copy()
    bg = estimate_background(exp, bin_size, order=order)
    assert bg.dtype == np.float32 and tuple(bg.shape) == exp.shape
    err = backend.asnumpy(bg) - field.background
    sigma = float(np.sqrt(np.median(field.exposure.variance)))  # ≈ 34 ADU
    h = bin_size // 2
    inner = _rms(err[h:-h, h:-h])
    # Measured (numpy): cubic/128 0.06σ, cubic/64 0.02σ, linear/64 0.05σ inside; the whole
    # image (afw's Taylor continuation into the outer half bin) stays below 0.1σ.
    assert inner < 0.5 * sigma
    assert (
        inner
        < {("cubic", 128): 0.1, ("cubic", 64): 0.05, ("linear", 64): 0.1}[(order, bin_size)] * sigma
    )
    assert _rms(err) < 0.5 * sigma
    np.testing.assert_array_equal(backend.asnumpy(exp.image), before)  # input untouched


def test_extrapolation_modes(backend, field):
    exp = field.exposure.to_backend(backend)
    sigma = float(np.sqrt(np.median(field.exposure.variance)))
    flat = backend.asnumpy(estimate_background(exp, 128, extrapolate="flat"))
    quad = backend.asnumpy(estimate_background(exp, 128))
    # flat: constant beyond the outer bin centres (x < 63.5) along each row
    np.testing.assert_allclose(
        flat[:, :63], np.broadcast_to(flat[:, 63:64], (512, 63)), rtol=0, atol=1e-3
    )
    assert _rms(flat - field.background) > _rms(quad - field.background)
    # measured: flat 0.86σ RMS over the image, quadratic 0.06σ
    assert _rms(flat - field.background) > 0.5 * sigma
    with pytest.raises(InvalidInputError):
        estimate_background(exp, 128, extrapolate="nearest")
    with pytest.raises(InvalidInputError):
        estimate_background(exp, 128, order="quintic")


def test_masked_regions_do_not_bias(backend, field):
    sigma = float(np.sqrt(np.median(field.exposure.variance)))  # ≈ 32 ADU
    exp = field.exposure.copy()
    exp.masked_image.image[100:260, 200:330] += 5000.0  # a big bright blob...
    exp.masked_image.mask[100:260, 200:330] |= exp.mask_planes.bitmask("BAD")  # ...that is masked
    ref = backend.asnumpy(estimate_background(field.exposure.to_backend(backend), 64))
    got = backend.asnumpy(estimate_background(exp.to_backend(backend), 64))
    # The blob does not leak in; the bins that lose pixels move by the sky gradient across
    # their remaining pixels (measured: max 0.72σ, RMS over the image 0.12σ).
    assert np.abs(got - ref).max() < 1.0 * sigma
    assert _rms(got - field.background) < 0.25 * sigma
    # unmasked, the blob drags the background up by hundreds of ADU
    exp.masked_image.mask[...] = field.exposure.mask
    biased = backend.asnumpy(estimate_background(exp.to_backend(backend), 64))
    assert (biased - ref)[100:260, 200:330].max() > 100

    # Missing data in a corner (two whole bins): filled along columns/rows through the
    # good bins, finite everywhere; outside the hole measured RMS 0.16σ.
    exp = field.exposure.copy()
    exp.masked_image.image[400:, 400:] = np.nan
    exp.masked_image.mask[400:, 400:] |= exp.mask_planes.bitmask("NO_DATA")
    got = backend.asnumpy(estimate_background(exp.to_backend(backend), 64))
    assert np.isfinite(got).all()
    outside = np.ones(got.shape, bool)
    outside[400:, 400:] = False
    assert _rms((got - field.background)[outside]) < 0.25 * sigma


def test_empty_bins_filled_from_neighbours(backend):
    rng = np.random.default_rng(0)
    img = (50.0 + rng.normal(0, 1, (200, 300))).astype(np.float32)
    mask = np.zeros(img.shape, np.int32)
    mask[:100, :100] = 1 << 8  # NO_DATA: exactly the first of 2×3 bins
    from gpudiff.image import MaskedImage

    mi = MaskedImage(img, None, mask, backend=backend)
    bins = bin_background(mi, 100)
    assert bins.values.shape == (2, 3)
    assert not bins.good[0, 0] and bins.good.sum() == 5
    assert np.isnan(bins.raw[0, 0]) and np.isfinite(bins.values).all()
    assert bins.values[0, 0] in (bins.values[0, 1], bins.values[1, 0])
    np.testing.assert_allclose(bins.x_centres, [49.5, 149.5, 249.5])
    bg = backend.asnumpy(interpolate_background(bins, mi.shape, backend=backend))
    assert np.abs(bg - 50.0).max() < 0.1
    # a bin needs min_fraction of usable pixels
    mask[100:, :] = 1 << 8
    mask[100:105, 200:] = 0
    mi2 = MaskedImage(img, None, mask, backend=backend)
    assert bin_background(mi2, 100).good[1].sum() == 0
    assert bin_background(mi2, 100, min_fraction=0.01).good[1].sum() == 1
    with pytest.raises(AllMaskedError):
        bin_background(
            MaskedImage(img, None, np.full(img.shape, 1 << 8, np.int32), backend=backend), 100
        )


def test_bin_geometry_and_small_images(backend):
    from gpudiff.image import MaskedImage

    img = np.full((130, 70), 7.0, np.float32)
    mi = MaskedImage(img, backend=backend)
    bins = bin_background(mi, 64)
    # ceil(130/64) = 3 rows of bins of 43-44 px, ceil(70/64) = 2 columns of 35 px
    np.testing.assert_array_equal(bins.y_edges, [0, 43, 86, 130])
    np.testing.assert_array_equal(bins.x_edges, [0, 35, 70])
    for order in ("linear", "cubic"):
        out = backend.asnumpy(estimate_background(mi, (64, 32), order=order))
        np.testing.assert_allclose(out, 7.0, atol=1e-5)
    # one bin: constant
    np.testing.assert_allclose(backend.asnumpy(estimate_background(mi, 1000)), 7.0, atol=1e-6)
    with pytest.raises(InvalidInputError):
        bin_background(mi, 0)


@pytest.mark.parametrize("extrapolate", ["flat", "linear", "quadratic"])
def test_cubic_weights_equal_scipy_not_a_knot(extrapolate):
    """The cubic weights (built without scipy.interpolate, to spare the command its import)
    are scipy's not-a-knot CubicSpline of the identity, continued by its end Taylor terms."""
    from scipy.interpolate import CubicSpline

    from gpudiff.ops.bin_interp import _interp_matrix

    rng = np.random.default_rng(3)
    for n in range(3, 24):
        for c in (np.arange(n) * 128.0 + 63.5, np.cumsum(rng.uniform(20.0, 200.0, n))):
            x = np.linspace(c[0] - 150.0, c[-1] + 150.0, 501)
            spl = CubicSpline(c, np.eye(n), axis=0)
            ref = spl(np.clip(x, c[0], c[-1]))
            if extrapolate != "flat":
                for end, out in ((c[0], x < c[0]), (c[-1], x > c[-1])):
                    dx = (x[out] - end)[:, None]
                    ref[out] += dx * spl(end, 1)[None, :]
                    if extrapolate == "quadratic":
                        ref[out] += 0.5 * dx * dx * spl(end, 2)[None, :]
            w = _interp_matrix(c, x, "cubic", extrapolate)
            np.testing.assert_allclose(w, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
