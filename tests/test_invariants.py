"""Property tests (hypothesis) of invariants that every gpudiff operation must keep.

Inputs are never modified in place; mask algebra works by plane *name*, whatever the bit
layout; FITS round-trips are lossless; a delta kernel is the identity on image, variance
and mask; an exposure minus itself is zero with variance 2σ².  Examples are small
(≤ 32² px) so that the file runs in a few seconds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

# hypothesis is in the test extra (CI always has it); a bare GPU box may not
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from gpudiff.image import Exposure, GaussianPsf, MaskedImage, MaskPlanes, read_exposure
from gpudiff.ops.convolution import convolve_masked_image
from gpudiff.ops.stats import image_statistics
from gpudiff.tasks.masks import mask_non_finite

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = ("BAD", "SAT", "CR", "EDGE", "DETECTED", "NO_DATA", "FAKE", "STREAK")

shapes = st.tuples(st.integers(4, 32), st.integers(4, 32))


@st.composite
def masked_images(draw, shape=None, finite=True):
    """A MaskedImage with random pixels, positive variance, a random mask and a random
    (permuted) bit layout of the plane names."""
    shape = draw(shapes) if shape is None else shape
    elems = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
    if (
        not finite
    ):  # NaN/±inf mixed in; finite values stay moderate (a float32 FFT of 1e38 overflows)
        elems = st.one_of(elems, st.sampled_from([np.nan, np.inf, -np.inf, -0.0]))
    image = draw(hnp.arrays(np.float32, shape, elements=elems))
    variance = draw(hnp.arrays(np.float32, shape, elements=st.floats(0.0009765625, 1e4, width=32)))
    bits = draw(st.permutations(range(len(NAMES))))
    planes = MaskPlanes({n: int(b) for n, b in zip(NAMES, bits)})
    mask = draw(hnp.arrays(np.int32, shape, elements=st.integers(0, (1 << len(NAMES)) - 1)))
    xy0 = draw(st.tuples(st.integers(-1000, 1000), st.integers(-1000, 1000)))
    return MaskedImage(image, variance, mask, xy0=xy0, mask_planes=planes, backend="numpy")


def _plane(mi, name):
    return (mi.mask & mi.mask_planes.bitmask(name)) != 0


def _snapshot(mi):
    return mi.image.copy(), mi.variance.copy(), mi.mask.copy(), mi.mask_planes.copy(), mi.xy0


def _unchanged(mi, snap):
    img, var, msk, planes, xy0 = snap
    return (
        np.array_equal(mi.image, img, equal_nan=True)
        and np.array_equal(mi.variance, var, equal_nan=True)
        and np.array_equal(mi.mask, msk)
        and mi.mask_planes == planes
        and mi.xy0 == xy0
    )


@SETTINGS
@given(a=masked_images(finite=False), data=st.data())
def test_inputs_are_never_modified(a, data):
    b = data.draw(masked_images(shape=a.shape))
    b = MaskedImage(b.image, b.variance, b.mask, xy0=a.xy0, mask_planes=b.mask_planes)
    sa, sb = _snapshot(a), _snapshot(b)
    raw = np.array(a.image)
    MaskedImage(raw, mask=a.mask).image[...] = 7  # the constructor copies: raw is not aliased
    assert np.array_equal(raw, a.image, equal_nan=True)
    a.subtract(b)
    convolve_masked_image(a, np.ones((3, 3)), do_copy_edge=True)
    a.with_plane_set("NEW", a.mask == 0)
    a.with_planes_cleared(["BAD", "SAT"])
    a.subimage(a.bbox)
    exp = Exposure(a, psf=GaussianPsf(fwhm=2.0))
    mask_non_finite(exp)
    if bool(a.good_pixels(list(NAMES)).any()):
        image_statistics(a, bad_planes=list(NAMES))
    assert _unchanged(a, sa) and _unchanged(b, sb)


@SETTINGS
@given(a=masked_images(), data=st.data())
def test_mask_algebra_is_by_name(a, data):
    b = data.draw(masked_images(shape=a.shape))
    b = MaskedImage(b.image, b.variance, b.mask, xy0=a.xy0, mask_planes=b.mask_planes)
    d = a.subtract(b)
    for name in NAMES:  # OR per plane name, whatever bit each input uses for it
        assert np.array_equal(_plane(d, name), _plane(a, name) | _plane(b, name)), name
    # set then clear a new plane: the other planes are untouched
    where = a.image > 0
    s = a.with_plane_set("NEWPLANE", where)
    assert np.array_equal(_plane(s, "NEWPLANE"), where)
    assert all(np.array_equal(_plane(s, n), _plane(a, n)) for n in NAMES)
    c = s.with_planes_cleared(["NEWPLANE"])
    assert np.array_equal(c.mask, a.mask)
    # conforming onto another layout and back is the identity
    other = b.mask_planes
    there = other.conform(a.mask, a.mask_planes, np)
    assert np.array_equal(a.mask_planes.conform(there, other, np), a.mask)


@SETTINGS
@given(a=masked_images(finite=False))
def test_fits_round_trip_is_lossless(a):
    exp = Exposure(a, psf=GaussianPsf(fwhm=2.5, size=11))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "e.fits"
        exp.write(path)
        back = read_exposure(path, backend="numpy")
    assert np.array_equal(back.image, a.image, equal_nan=True)  # NaN, ±inf, -0.0 bit patterns too
    assert np.array_equal(back.image.view(np.int32), a.image.view(np.int32))
    assert np.array_equal(back.variance, a.variance) and np.array_equal(back.mask, a.mask)
    assert back.mask_planes == a.mask_planes and back.xy0 == a.xy0
    assert np.array_equal(back.psf.kernel_image(), exp.psf.kernel_image())


@SETTINGS
@given(a=masked_images(), k=st.sampled_from([1, 3, 5, 9]), copy_edge=st.booleans())
def test_delta_kernel_is_the_identity(a, k, copy_edge):
    if min(a.shape) < k:
        return
    delta = np.zeros((k, k))
    delta[k // 2, k // 2] = 1.0
    out = convolve_masked_image(a, delta, do_copy_edge=copy_edge)
    h = k // 2
    inner = (slice(h, a.shape[0] - h), slice(h, a.shape[1] - h))
    # The FFT correlation rounds in float32: each output is a sum of N terms of size
    # ≤ max|x|, with error ~ ε32·log2(N)·max|x| ≈ 1e-6·max|x| for ≤ 64² FFTs; 1e-5 is safe
    # and still 1e5× below any real error (a pixel shift changes values by O(max|x|)).
    tol_i = 1e-5 * float(np.abs(a.image).max()) + 1e-30
    tol_v = 1e-5 * float(a.variance.max())
    assert np.array_equal(out.mask[inner], a.mask[inner])  # exactly: the footprint is one pixel
    # gpudiff's no-data convention: a NO_DATA input pixel comes out NaN / +inf variance
    # (its value is not data); every other pixel is the identity.
    nodata = _plane(a, "NO_DATA")[inner]
    assert (
        np.isnan(out.image[inner][nodata]).all() and np.isposinf(out.variance[inner][nodata]).all()
    )
    np.testing.assert_allclose(
        out.image[inner][~nodata], a.image[inner][~nodata], rtol=0, atol=tol_i
    )
    np.testing.assert_allclose(
        out.variance[inner][~nodata], a.variance[inner][~nodata], rtol=0, atol=tol_v
    )
    border = np.ones(a.shape, bool)
    border[inner] = False
    flag = out.mask_planes.bitmask("EDGE" if copy_edge else "NO_DATA")
    assert ((out.mask[border] & flag) != 0).all()
    if copy_edge:  # afw doCopyEdge: the input, exactly, plus EDGE
        assert np.array_equal(out.image[border], a.image[border])
        assert np.array_equal(out.mask[border], a.mask[border] | flag)


@SETTINGS
@given(a=masked_images())
def test_self_subtraction_is_zero_with_twice_the_variance(a):
    d = a.subtract(a)
    assert not d.image.any()  # exactly 0: x − x is exact in floating point
    assert np.array_equal(d.variance, 2 * a.variance)  # doubling is exact in float32
    assert np.array_equal(d.mask, a.mask) and d.mask_planes == a.mask_planes
    e = Exposure(a).masked_image.subtract(a.copy())
    assert np.array_equal(e.variance, d.variance)
