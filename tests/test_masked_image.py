"""MaskedImage and Exposure: dtypes, copies (inputs never modified), validation, transfers."""

from __future__ import annotations

import numpy as np
import pytest

from gpudiff.errors import (
    AllMaskedError,
    InvalidInputError,
    InvalidVarianceError,
    ShapeMismatchError,
)
from gpudiff.image import Box, Exposure, GaussianPsf, MaskedImage, MaskPlanes, PhotoCalib


def test_dtypes_and_defaults(backend):
    mi = MaskedImage(np.arange(6, dtype=">f8").reshape(2, 3), backend=backend)
    assert (
        mi.image.dtype == np.float32
        and mi.variance.dtype == np.float32
        and mi.mask.dtype == np.int32
    )
    assert mi.shape == (2, 3)
    np.testing.assert_array_equal(backend.asnumpy(mi.variance), 1.0)
    np.testing.assert_array_equal(backend.asnumpy(mi.mask), 0)


def test_inputs_are_copied_not_shared(backend):
    img = np.ones((4, 4), dtype=np.float32)
    var = np.full((4, 4), 2.0, dtype=np.float32)
    msk = np.zeros((4, 4), dtype=np.int32)
    mi = MaskedImage(img, var, msk, backend=backend)
    mi.image[0, 0] = 99
    mi.variance[0, 0] = 99
    mi.mask[0, 0] = 99
    assert img[0, 0] == 1 and var[0, 0] == 2 and msk[0, 0] == 0
    c = mi.copy()
    c.image[1, 1] = -5
    assert float(mi.image[1, 1]) == 1.0


def test_shape_and_dtype_errors():
    with pytest.raises(
        ShapeMismatchError, match=r"variance has shape \(3, 3\) but image has shape \(4, 4\)"
    ):
        MaskedImage(np.zeros((4, 4)), np.ones((3, 3)))
    with pytest.raises(ShapeMismatchError, match="mask"):
        MaskedImage(np.zeros((4, 4)), None, np.zeros((4, 5), dtype=np.int32))
    with pytest.raises(InvalidInputError, match="2-D"):
        MaskedImage(np.zeros(10))
    with pytest.raises(InvalidInputError, match="mask must be integer"):
        MaskedImage(np.zeros((2, 2)), None, np.zeros((2, 2)))


def test_subimage_and_bbox():
    img = np.arange(100, dtype=np.float32).reshape(10, 10)
    mi = MaskedImage(img, xy0=(100, 200))
    assert mi.bbox == Box(100, 200, 110, 210)
    sub = mi.subimage(Box(102, 203, 105, 207))
    assert sub.xy0 == (102, 203) and sub.shape == (4, 3)
    np.testing.assert_array_equal(sub.image, img[3:7, 2:5])
    with pytest.raises(InvalidInputError, match="not inside"):
        mi.subimage(Box(95, 200, 105, 205))
    assert Box(0, 0, 10, 10).intersection(Box(5, 5, 20, 20)) == Box(5, 5, 10, 10)
    assert Box(0, 0, 10, 10).intersection(Box(10, 0, 20, 10)) is None


def test_validate_variance_and_all_masked(backend):
    mp = MaskPlanes()
    img = np.ones((5, 5))
    var = np.ones((5, 5))
    mask = np.zeros((5, 5), dtype=np.int32)
    var[0, 0] = 0.0  # bad variance on an unmasked pixel
    mi = MaskedImage(img, var, mask, backend=backend)
    with pytest.raises(InvalidVarianceError, match="science: 1 unmasked pixel"):
        mi.validate("science")
    # The same pixel masked NO_DATA is fine.
    mask[0, 0] = mp.bitmask("NO_DATA")
    MaskedImage(img, var, mask, backend=backend).validate("science")
    all_masked = MaskedImage(img, var, np.full((5, 5), mp.bitmask("NO_DATA")), backend=backend)
    with pytest.raises(AllMaskedError, match="template: every pixel is masked"):
        all_masked.validate("template")


def test_good_pixels_excludes_nonfinite_and_planes():
    mp = MaskPlanes()
    img = np.ones((3, 3))
    img[0, 0] = np.nan
    mask = np.zeros((3, 3), dtype=np.int32)
    mask[1, 1] = mp.bitmask("SAT")
    mi = MaskedImage(img, None, mask)
    good = mi.good_pixels(("SAT", "NO_DATA"))
    assert good.sum() == 7 and not good[0, 0] and not good[1, 1]


def test_exposure_copy_and_metadata_independent():
    exp = Exposure.from_arrays(
        np.ones((8, 8)), psf=GaussianPsf(sigma=1.5), photo_calib=PhotoCalib(2.0)
    )
    exp.metadata["VISIT"] = 7
    c = exp.copy()
    c.metadata["VISIT"] = 8
    c.image[0, 0] = 5
    assert exp.metadata["VISIT"] == 7 and exp.image[0, 0] == 1
    assert c.psf is exp.psf and c.photo_calib.calibration_mean == 2.0
    with pytest.raises(InvalidInputError):
        PhotoCalib(0.0)
    with pytest.raises(InvalidInputError, match="MaskedImage"):
        Exposure(np.ones((3, 3)))


def test_to_backend_round_trip(backend):
    rng = np.random.default_rng(3)
    img = rng.normal(size=(16, 16)).astype(np.float32)
    exp = Exposure.from_arrays(img, xy0=(3, 4))
    moved = exp.to_backend(backend).to_backend("numpy")
    np.testing.assert_array_equal(moved.image, img)
    assert moved.xy0 == (3, 4)


def test_mask_of_finds_aliases_and_wide_masks_are_int64(backend):
    planes = MaskPlanes({"SATURATED": 1, "NO_DATA": 2})
    m = np.array([[2, 0], [4, 6]], np.int32)
    mi = MaskedImage(np.zeros((2, 2)), None, m, mask_planes=planes, backend=backend)
    np.testing.assert_array_equal(
        backend.asnumpy(mi.mask_of("SAT")), [[True, False], [False, True]]
    )
    assert not backend.asnumpy(mi.mask_of("CLIPPED")).any()
    assert mi.good_pixels(("NO_DATA", "SAT")).sum() == 1
    wide = mi.with_plane_set("CR", m == 0)  # bit 0: still int32
    assert wide.mask.dtype == np.int32 and wide.mask_planes["CR"] == 0
    full = MaskPlanes({f"P{i}": i for i in range(31)})
    a = MaskedImage(
        np.zeros((2, 2)),
        None,
        np.array([[1 << 30, 0], [0, 0]], np.int32),
        mask_planes=full,
        backend=backend,
    )
    b = a.with_plane_set("EXTRA", np.array([[True, False], [False, True]]))
    assert b.mask.dtype == np.int64 and b.mask_planes["EXTRA"] == 31
    np.testing.assert_array_equal(
        backend.asnumpy(b.mask), [[(1 << 30) | (1 << 31), 0], [0, 1 << 31]]
    )
    np.testing.assert_array_equal(
        backend.asnumpy(b.mask_of("P30")), [[True, False], [False, False]]
    )
    d = b.subtract(a)  # an int64 and an int32 mask: ORed on the wide definition
    assert d.mask.dtype == np.int64 and backend.asnumpy(d.mask_of("EXTRA")).sum() == 2
    assert b.subimage(Box(0, 0, 1, 2)).mask.dtype == np.int64
    # an int32 array whose bit 31 is a plane keeps that bit only (no sign extension)
    wide_planes = MaskPlanes({"TOP": 31})
    c = MaskedImage(
        np.zeros((1, 1)),
        None,
        np.array([[-(2**31)]], np.int32),
        mask_planes=wide_planes,
        backend=backend,
    )
    assert int(backend.asnumpy(c.mask)[0, 0]) == 1 << 31


def test_on_box_copies_the_overlap_and_marks_the_rest_no_data():
    """A template on a partly overlapping box becomes one on the science box: its pixels
    where the boxes meet, NO_DATA (NaN, infinite variance) elsewhere; the input unchanged."""
    rng = np.random.default_rng(0)
    img = rng.normal(size=(30, 40)).astype(np.float32)
    planes = MaskPlanes()
    planes.add("BAD")
    mask = np.zeros((30, 40), np.int32)
    mask[5, 6] = planes.bitmask("BAD")
    mi = MaskedImage(img, np.full_like(img, 2.0), mask, xy0=(10, 20), mask_planes=planes)
    before = (mi.image.copy(), mi.variance.copy(), mi.mask.copy())
    out = mi.on_box(Box(0, 25, 45, 60))
    assert out.bbox == Box(0, 25, 45, 60)
    nd = out.mask_planes.bitmask("NO_DATA")
    inside = np.zeros(out.shape, bool)
    inside[0:25, 10:45] = True  # rows 25..49, columns 10..44 of the parent frame
    np.testing.assert_array_equal(out.image[inside], img[5:30, 0:35].ravel())
    assert (out.variance[inside] == 2.0).all()
    assert ((out.mask[inside] & nd) == 0).all()
    assert out.mask[0, 16] & out.mask_planes.bitmask("BAD")  # (x 16, y 25) was BAD
    assert ((out.mask[~inside] & nd) != 0).all()
    assert np.isnan(out.image[~inside]).all() and np.isinf(out.variance[~inside]).all()
    for a, b in zip(before, (mi.image, mi.variance, mi.mask)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InvalidInputError):
        mi.on_box(Box(100, 100, 110, 110))
