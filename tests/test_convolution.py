"""ops.convolution: afw correlation convention, masked convolution, spatially varying kernels."""

from __future__ import annotations

import numpy as np
import pytest

from gpudiff.errors import InvalidInputError
from gpudiff.image import MaskedImage, MaskPlanes
from gpudiff.ops import (
    convolve_masked_image,
    correlate,
    correlate_many,
    dilate_mask,
    varying_correlate,
)


def brute_correlate(img, k):
    """docs/algorithms.md §0.1 literally: out[r,c] = Σ K[i,j]·in[r−ctrY+i, c−ctrX+j], zero
    outside."""
    H, W = img.shape
    kh, kw = k.shape
    cy, cx = (kh - 1) // 2, (kw - 1) // 2
    pad = np.zeros((H + kh, W + kw))
    pad[cy : cy + H, cx : cx + W] = img
    out = np.zeros((H, W))
    for i in range(kh):
        for j in range(kw):
            out += k[i, j] * pad[i : i + H, j : j + W]
    return out


@pytest.mark.parametrize("kshape", [(5, 7), (4, 6), (1, 1), (21, 21)])
def test_fft_correlation_matches_definition(backend, rng, kshape):
    img = rng.normal(size=(48, 53))
    k = rng.normal(size=kshape)
    got = backend.asnumpy(correlate(img, k, backend, dtype=np.float64))
    np.testing.assert_allclose(got, brute_correlate(img, k), atol=1e-10)
    # float32 output: relative error at float32 rounding level of the output scale
    got32 = backend.asnumpy(correlate(img, k, backend))
    assert got32.dtype == np.float32
    np.testing.assert_allclose(
        got32, brute_correlate(img, k), atol=2e-5 * np.abs(img).max() * np.abs(k).sum()
    )


def test_delta_image_gives_flipped_kernel_delta_kernel_gives_image(backend, rng):
    # afw "convolution" is a correlation: a delta *image* comes out as the kernel
    # rotated by 180°, a delta *kernel* at (ctrY, ctrX + 1) shifts the image left by one.
    img = np.zeros((15, 15))
    img[7, 7] = 1
    k = rng.normal(size=(5, 5))
    out = backend.asnumpy(correlate(img, k, backend, dtype=np.float64))
    np.testing.assert_allclose(out[5:10, 5:10], k[::-1, ::-1], atol=1e-12)
    shift = np.zeros((3, 3))
    shift[1, 2] = 1
    field = rng.normal(size=(10, 10))
    out = backend.asnumpy(correlate(field, shift, backend, dtype=np.float64))
    np.testing.assert_allclose(out[:, :-1], field[:, 1:], atol=1e-12)


def test_correlate_many_equals_individual(backend, rng):
    img = rng.normal(size=(40, 40))
    ks = rng.normal(size=(4, 7, 7))
    many = backend.asnumpy(correlate_many(img, ks, backend, dtype=np.float64))
    for m in range(4):
        np.testing.assert_allclose(many[m], brute_correlate(img, ks[m]), atol=1e-10)


def _masked(rng, shape=(40, 44)):
    mp = MaskPlanes()
    img = rng.normal(10, 2, size=shape)
    var = rng.uniform(1, 3, size=shape)
    mask = np.zeros(shape, dtype=np.int32)
    mask[20, 22] = mp.bitmask("SAT")
    mask[5, 30] = mp.bitmask("CR")
    return MaskedImage(img, var, mask)


def test_masked_convolution_variance_mask_and_edges(backend, rng):
    mi = _masked(rng).to_backend(backend)
    mp = mi.mask_planes
    k = rng.uniform(0.0, 1.0, size=(5, 7))
    k[0, 0] = 0.0  # a zero kernel pixel does not dilate the mask
    before = backend.asnumpy(mi.image).copy()
    out = convolve_masked_image(mi, k).to_numpy()
    np.testing.assert_array_equal(backend.asnumpy(mi.image), before)  # input untouched
    ref_img = brute_correlate(mi.to_numpy().image.astype(np.float64), k)
    ref_var = brute_correlate(mi.to_numpy().variance.astype(np.float64), k * k)
    inner = (slice(2, 40 - 2), slice(3, 44 - 3))  # (kh−1)/2 = 2 rows, (kw−1)/2 = 3 columns
    np.testing.assert_allclose(out.image[inner], ref_img[inner], rtol=2e-6)
    np.testing.assert_allclose(out.variance[inner], ref_var[inner], rtol=2e-6)
    # SAT at (20, 22) spreads to rows 18..22, cols 19..25, except where K == 0
    sat = (out.mask & mp.bitmask("SAT")) != 0
    expect = np.zeros_like(sat)
    expect[18:23, 19:26] = True
    expect[22, 25] = False  # K[0,0] = 0 maps the source pixel to out[22, 25]
    np.testing.assert_array_equal(sat[inner], expect[inner])
    # Border: NaN image, inf variance, NO_DATA
    nd = mp.bitmask("NO_DATA")
    border = np.ones((40, 44), bool)
    border[inner] = False
    assert np.isnan(out.image[border]).all() and np.isinf(out.variance[border]).all()
    assert ((out.mask[border] & nd) != 0).all() and not ((out.mask[inner] & nd) != 0).any()


def test_copy_edge_and_normalize(backend, rng):
    mi = _masked(rng).to_backend(backend)
    k = rng.uniform(0.5, 1.0, size=(3, 3))
    out = convolve_masked_image(mi, k, do_copy_edge=True, do_normalize=True).to_numpy()
    src = mi.to_numpy()
    edge = mi.mask_planes.bitmask("EDGE")
    np.testing.assert_array_equal(out.image[0], src.image[0])
    assert ((out.mask[0] & edge) != 0).all() and ((out.mask[1:-1, 1:-1] & edge) == 0).all()
    ref = brute_correlate(src.image.astype(np.float64), k / k.sum())
    np.testing.assert_allclose(out.image[1:-1, 1:-1], ref[1:-1, 1:-1], rtol=2e-6)


def test_delta_kernel_is_identity_on_all_planes(backend, rng):
    mi = _masked(rng).to_backend(backend)
    delta = np.zeros((5, 5))
    delta[2, 2] = 1.0
    out = convolve_masked_image(mi, delta).to_numpy()
    src = mi.to_numpy()
    inner = (slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(out.image[inner], src.image[inner], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(out.variance[inner], src.variance[inner], rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(out.mask[inner], src.mask[inner])


def test_nan_input_poisons_its_footprint_not_the_image(backend, rng):
    mi = _masked(rng)
    img = mi.image.copy()
    img[10, 10] = np.nan
    mi = MaskedImage(img, mi.variance, mi.mask, backend=backend)
    out = convolve_masked_image(mi, np.ones((3, 3))).to_numpy()
    nd = mi.mask_planes.bitmask("NO_DATA")
    bad = ~np.isfinite(out.image)
    assert bad[9:12, 9:12].all()
    assert bad[1:-1, 1:-1].sum() == 9  # only the 3x3 footprint of the NaN pixel
    assert ((out.mask[9:12, 9:12] & nd) != 0).all()


def test_errors(rng):
    mi = MaskedImage(rng.normal(size=(8, 8)))
    with pytest.raises(InvalidInputError, match="larger than the image"):
        convolve_masked_image(mi, np.ones((9, 9)))
    with pytest.raises(InvalidInputError, match="sum is 0"):
        convolve_masked_image(mi, np.zeros((3, 3)), do_normalize=True)
    with pytest.raises(InvalidInputError, match="2 term kernels but 1 weight"):
        varying_correlate(np.ones((8, 8)), np.ones((2, 3, 3)), [np.ones((8, 8))])


def test_varying_correlation_matches_per_pixel_reference(backend, rng):
    # K(x, y) = K0 + x'·K1 + y'·K2: exact per-pixel evaluation vs Σ_k p_k·(I ⊗ K_k).
    H, W = 24, 30
    img = rng.normal(size=(H, W))
    ks = rng.normal(size=(3, 5, 5))
    yy, xx = np.mgrid[0:H, 0:W]
    xp_, yp_ = (xx - (W - 1) / 2) / W, (yy - (H - 1) / 2) / H
    weights = [np.ones((H, W)), xp_, yp_]
    got = backend.asnumpy(
        varying_correlate(img, ks, [backend.asarray(w) for w in weights], backend)
    )
    pad = np.zeros((H + 4, W + 4))
    pad[2 : 2 + H, 2 : 2 + W] = img
    ref = np.empty((H, W))
    for r in range(H):
        for c in range(W):
            kern = ks[0] + xp_[r, c] * ks[1] + yp_[r, c] * ks[2]
            ref[r, c] = (kern * pad[r : r + 5, c : c + 5]).sum()
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())


def test_dilate_mask_uses_registry_kernel(backend, rng):
    m = np.zeros((9, 9), np.int32)
    m[4, 4] = 1 << 3
    fp = np.zeros((3, 3), bool)
    fp[0, 1] = True  # afw: out[r, c] |= m[r − 1, c]
    out = backend.asnumpy(dilate_mask(m, fp, backend))
    assert out[5, 4] == 8 and out.sum() == 8
