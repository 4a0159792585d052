"""FITS / CCDData I/O: lossless round trips, layout detection, variance estimation, errors."""

from __future__ import annotations

import os
import stat
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData, InverseVariance, StdDevUncertainty, VarianceUncertainty
from astropy.wcs import WCS
from hypothesis import given, settings
from hypothesis import strategies as st

from gpudiff.errors import FitsReadError, FitsWriteError, GpudiffError, InvalidInputError
from gpudiff.image import (
    DoubleGaussianPsf,
    Exposure,
    GaussianPsf,
    GridPsf,
    ImagePsf,
    MaskPlanes,
    MoffatPsf,
    PhotoCalib,
)
from gpudiff.image import fitsio
from gpudiff.image.fitsio import (
    estimate_variance,
    exposure_from_ccddata,
    exposure_to_ccddata,
    psf_from_hdus,
    psf_to_hdus,
    read_exposure,
    read_psf,
    write_exposure,
    write_psf,
)

SHAPE = (40, 50)
XY0 = (1234, -567)


def tan_wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.1, 2.2]
    w.wcs.crpix = [20.5, 25.0]
    w.wcs.cd = [[-5.0e-5, 1.0e-6], [2.0e-6, 5.0e-5]]
    return w


def _grid_psf():
    return GridPsf.from_function(
        lambda x, y: GaussianPsf(sigma=1.5 + x / 100 + y / 200, size=15),
        [0.0, 25.0, 50.0],
        [0.0, 40.0],
    )


PSFS = {
    "gaussian": lambda: GaussianPsf(
        sigma=1.7, sigma_y=2.3, theta=0.4, oversample=3, average_position=(10.5, 20.25)
    ),
    "gaussian_tiny_theta": lambda: GaussianPsf(
        sigma=1.2739827004320285, theta=1.2345678901234567e-05
    ),
    "doublegaussian": lambda: DoubleGaussianPsf(1.2, 3.5, b=0.15, size=21),
    "moffat": lambda: MoffatPsf(fwhm=3.1, beta=2.7, oversample=2),
    "image": lambda: ImagePsf(
        np.random.default_rng(5).random((13, 13)), average_position=(3.0, 4.0)
    ),
    "grid": _grid_psf,
    "none": lambda: None,
}

PARAMS = {
    GaussianPsf: ("sigma", "sigma_y", "theta", "size", "oversample", "average_position"),
    DoubleGaussianPsf: ("sigma1", "sigma2", "b", "size", "oversample", "average_position"),
    MoffatPsf: ("profile_fwhm", "beta", "size", "oversample", "average_position"),
    ImagePsf: ("average_position",),
    GridPsf: ("average_position",),
}


def assert_same_psf(a, b):
    if a is None:
        assert b is None
        return
    assert type(b) is type(a)
    for name in PARAMS[type(a)]:
        assert getattr(b, name) == getattr(a, name), name
    if isinstance(a, ImagePsf):
        np.testing.assert_array_equal(b.image, a.image)
    if isinstance(a, GridPsf):
        np.testing.assert_array_equal(b.images, a.images)
        np.testing.assert_array_equal(b.xs, a.xs)
        np.testing.assert_array_equal(b.ys, a.ys)
    for x, y in ((None, None), (3.0, 7.0), (40.3, 12.6)):
        np.testing.assert_array_equal(b.kernel_image(x, y), a.kernel_image(x, y))


def make_exposure(psf=None, backend=None, rng=None) -> Exposure:
    rng = np.random.default_rng(7) if rng is None else rng
    planes = MaskPlanes()
    planes.add("SAT_TEMPLATE")  # 'MP_SAT_TEMPLATE' is > 8 characters: a HIERARCH card
    image = rng.normal(100.0, 10.0, SHAPE).astype(">f4")  # big-endian, as FITS hands them out
    image[3, 4] = np.nan
    variance = rng.uniform(50.0, 150.0, SHAPE).astype(">f4")
    variance[3, 4] = np.inf
    mask = (rng.integers(0, 1 << 12, SHAPE) * (rng.random(SHAPE) < 0.3)).astype(">i4")
    mask[3, 4] |= 1 << planes["NO_DATA"]
    meta = fits.Header()
    meta["OBSERVER"] = ("Vera", "who")
    meta["EXPTIME"] = (30.0, "[s]")
    meta["BUNIT"] = "electron"
    meta["HIERARCH GPUDIFF LONG KEY"] = 3
    meta["COMMENT"] = "a comment card"
    meta["HISTORY"] = "a history card"
    return Exposure.from_arrays(
        image,
        variance,
        mask,
        xy0=XY0,
        mask_planes=planes,
        psf=psf,
        wcs=tan_wcs(),
        photo_calib=PhotoCalib(0.123456789012345678e-5, 0.01),
        metadata=meta,
        backend=backend,
    )


def cards(header):
    return [(c.keyword, c.value, c.comment) for c in header.cards]


def assert_same_wcs(a, b):
    xs, ys = np.array([0.0, 10.0, 49.0, 17.3]), np.array([0.0, 30.0, 39.0, 2.9])
    np.testing.assert_allclose(
        b.pixel_to_world_values(xs, ys), a.pixel_to_world_values(xs, ys), rtol=0, atol=1e-12
    )


def assert_same_exposure(a, b, psf=True):
    ha, hb = a.backend.asnumpy, b.backend.asnumpy
    for name in ("image", "variance", "mask"):
        np.testing.assert_array_equal(hb(getattr(b, name)), ha(getattr(a, name)), err_msg=name)
        assert hb(getattr(b, name)).dtype.isnative
    assert (
        b.image.dtype == np.float32 and b.variance.dtype == np.float32 and b.mask.dtype == np.int32
    )
    assert b.mask_planes == a.mask_planes
    assert b.xy0 == a.xy0
    assert b.photo_calib == a.photo_calib
    assert_same_wcs(a.wcs, b.wcs)
    assert cards(b.metadata) == cards(a.metadata)
    if psf:
        assert_same_psf(a.psf, b.psf)


# --------------------------------------------------------------------------- LSST layout
@pytest.mark.parametrize("psf_name", list(PSFS))
def test_lsst_round_trip_is_lossless(tmp_path, backend, psf_name):
    exp = make_exposure(PSFS[psf_name](), backend=backend)
    path = tmp_path / "exp.fits"
    write_exposure(path, exp)
    back = read_exposure(path, backend=backend)
    assert back.backend.name == backend.name
    assert_same_exposure(exp, back)
    with fits.open(path) as hdul:
        names = [h.name for h in hdul]
        assert names[:4] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
        assert ("PSF" in names) == (exp.psf is not None)
        assert hdul["IMAGE"].data.dtype == np.dtype(">f4") and hdul["MASK"].data.dtype == np.dtype(
            ">i4"
        )
        assert hdul["MASK"].header["MP_SAT_TEMPLATE"] == exp.mask_planes["SAT_TEMPLATE"]
        assert hdul["IMAGE"].header["LTV1"] == -XY0[0] and hdul["IMAGE"].header["CRVAL2A"] == XY0[1]
        if exp.psf is not None:  # non-gpudiff readers get a usable PSF image
            assert np.isclose(hdul["PSF"].data.sum(axis=(-2, -1)), 1.0).all()


def test_exposure_methods_use_fitsio(tmp_path):
    exp = make_exposure(GaussianPsf(sigma=2.0))
    exp.write(tmp_path / "a.fits")
    assert_same_exposure(exp, Exposure.read(tmp_path / "a.fits"))
    assert_same_exposure(exp, Exposure.from_ccddata(exp.to_ccddata()), psf=False)


def test_lsst_mask_without_mp_cards_and_missing_mask(tmp_path):
    img = np.arange(12, dtype=np.float32).reshape(3, 4)
    hdus = [
        fits.PrimaryHDU(),
        fits.ImageHDU(img, name="IMAGE"),
        fits.ImageHDU(np.full((3, 4), 2.0, ">f8"), name="VARIANCE"),
    ]
    fits.HDUList(hdus).writeto(tmp_path / "nomask.fits")
    exp = read_exposure(tmp_path / "nomask.fits")
    assert (
        exp.mask_planes == MaskPlanes()
        and not exp.mask.any()
        and exp.xy0 == (0, 0)
        and exp.wcs is None
    )
    np.testing.assert_array_equal(exp.variance, 2.0)
    hdus.insert(
        2, fits.ImageHDU(np.full((3, 4), 5, np.int16), name="MASK")
    )  # no MP_ cards: LSST defaults
    fits.HDUList(hdus).writeto(tmp_path / "int16.fits")
    exp = read_exposure(tmp_path / "int16.fits", hdu="IMAGE")
    assert exp.mask.dtype == np.int32 and (exp.mask == 5).all() and exp.mask_planes == MaskPlanes()


# --------------------------------------------------------------------------- PSF serialization
@pytest.mark.parametrize("psf_name", [n for n in PSFS if n != "none"])
def test_psf_hdus_and_psf_files_round_trip(tmp_path, psf_name):
    psf = PSFS[psf_name]()
    assert_same_psf(psf, psf_from_hdus(psf_to_hdus(psf)))
    write_psf(tmp_path / "psf.fits", psf)
    assert_same_psf(psf, read_psf(tmp_path / "psf.fits"))


def test_foreign_psf_hdu_becomes_image_psf(tmp_path):
    star = np.outer([1.0, 4.0, 6.0, 4.0, 1.0], [1.0, 4.0, 6.0, 4.0, 1.0]).astype(">f4")
    assert psf_from_hdus([fits.PrimaryHDU()]) is None
    psf = psf_from_hdus([fits.PrimaryHDU(), fits.ImageHDU(star, name="PSF")])
    assert isinstance(psf, ImagePsf)
    np.testing.assert_allclose(psf.kernel_image(), star / star.sum(), rtol=1e-7)


@settings(max_examples=60, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300))
def test_float_cards_are_exact(value):
    hdr = fits.Header()
    fitsio._fset(hdr, "PSFSIGX", value, "[pix]")
    assert fitsio._fget(fits.Header.fromstring(hdr.tostring()), "PSFSIGX") == value


# --------------------------------------------------------------------------- CCDData
def test_ccddata_conversion_round_trip(backend):
    exp = make_exposure(MoffatPsf(fwhm=3.0), backend=backend)
    ccd = exposure_to_ccddata(exp)
    assert isinstance(ccd.uncertainty, StdDevUncertainty) and str(ccd.unit) == "electron"
    np.testing.assert_array_equal(ccd.mask, backend.asnumpy(exp.mask) != 0)
    back = exposure_from_ccddata(ccd, backend=backend)
    assert_same_exposure(exp, back, psf=False)
    # CCDData holds only a PSF image: the type is lost, the kernel image is kept.
    assert isinstance(back.psf, ImagePsf)
    np.testing.assert_allclose(back.psf.kernel_image(), exp.psf.kernel_image(), rtol=1e-12)


@pytest.mark.parametrize(
    "unc_type, to_unc",
    [
        (StdDevUncertainty, np.sqrt),
        (VarianceUncertainty, lambda v: v),
        (InverseVariance, lambda v: 1.0 / v),
    ],
)
def test_file_written_by_astropy_ccddata(tmp_path, unc_type, to_unc):
    rng = np.random.default_rng(3)
    var = rng.uniform(1.0, 4.0, (10, 12))
    data = rng.normal(size=(10, 12))
    data[2, 3] = np.nan
    kernel = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16.0
    ccd = CCDData(
        data,
        unit="adu",
        uncertainty=unc_type(to_unc(var)),
        mask=var > 3.5,
        wcs=tan_wcs(),
        meta={"FOO": 1, "LTV1": -7, "LTV2": -9},
        psf=kernel,
    )
    ccd.write(tmp_path / "ccd.fits")
    exp = read_exposure(tmp_path / "ccd.fits")
    assert exp.image.dtype == np.float32 and exp.xy0 == (7, 9)
    finite = np.isfinite(data)
    np.testing.assert_allclose(exp.variance[finite], var[finite], rtol=1e-6)
    np.testing.assert_array_equal(exp.image[finite], data[finite].astype(np.float32))
    assert np.isnan(exp.image[2, 3]) and np.isinf(exp.variance[2, 3])
    np.testing.assert_array_equal(exp.mask == exp.mask_planes.bitmask("BAD"), (var > 3.5) & finite)
    assert exp.mask[2, 3] & exp.mask_planes.bitmask("NO_DATA")
    assert exp.metadata["FOO"] == 1 and exp.metadata["BUNIT"] == "adu"
    assert "CRVAL1" not in exp.metadata and "LTV1" not in exp.metadata
    assert_same_wcs(tan_wcs(), exp.wcs)
    np.testing.assert_array_equal(exp.psf.kernel_image(), kernel)


def test_ccddata_file_keeps_bits_with_flags_hdu(tmp_path):
    exp = make_exposure(GaussianPsf(sigma=1.5))
    ccd = exposure_to_ccddata(exp)
    ccd.write(tmp_path / "flags.fits", hdu_flags="FLAGS")
    assert_same_exposure(exp, read_exposure(tmp_path / "flags.fits"), psf=False)
    assert CCDData.read(tmp_path / "flags.fits").unit == "electron"  # astropy can read it too
    ccd.write(tmp_path / "noflags.fits")  # astropy's default drops flags: bits collapse onto BAD
    back = read_exposure(tmp_path / "noflags.fits")
    np.testing.assert_array_equal(back.mask != 0, exp.mask != 0)
    bad, nodata = back.mask_planes.bitmask("BAD"), back.mask_planes.bitmask("NO_DATA")
    assert set(np.unique(back.mask)) == {0, bad, bad | nodata}  # the NaN pixel is NO_DATA again


# --------------------------------------------------------------------------- plain images
def _star_field(rng, gain=None, gain_keys=None, sigma=10.0, sky=50.0, shape=(200, 200)):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    stars = np.zeros(shape)
    positions = [(50, 60), (120, 40), (150, 150), (30, 170), (100, 100)]
    for x, y in positions:
        stars += 5000.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.0**2))
    img = sky + stars + rng.normal(0.0, sigma, shape)
    img[[5, 6, 7], [9, 9, 10]] = np.nan
    hdr = fits.Header(gain_keys or {})
    return img, stars, positions, hdr


def test_plain_image_variance_is_sky_noise(tmp_path, backend):
    img, stars, _, hdr = _star_field(np.random.default_rng(11))
    fits.PrimaryHDU(img.astype(">f8"), hdr).writeto(tmp_path / "plain.fits")
    exp = read_exposure(tmp_path / "plain.fits", backend=backend)
    var, mask, image = (backend.asnumpy(a) for a in (exp.variance, exp.mask, exp.image))
    sky = (stars < 1e-3) & np.isfinite(img)
    assert np.median(var[sky]) == pytest.approx(100.0, rel=0.03)
    nodata = (mask & exp.mask_planes.bitmask("NO_DATA")) != 0
    np.testing.assert_array_equal(nodata, ~np.isfinite(img))
    assert np.isnan(image[nodata]).all() and np.isposinf(var[nodata]).all()
    assert np.isfinite(var[~nodata]).all() and (var[~nodata] > 0).all()
    assert image.dtype == np.float32 and exp.metadata["GDVAREST"] == "sky"
    exp.masked_image.validate()


@pytest.mark.parametrize("how", ["header", "argument", "amplifiers"])
def test_plain_image_poisson_term_follows_gain(tmp_path, how):
    gain = 2.0
    keys = {
        "header": {"GAIN": gain},
        "argument": {"GAIN": 99.0},
        "amplifiers": {"GAINA": 1.5, "GAINB": 2.5},
    }[how]
    img, stars, positions, hdr = _star_field(np.random.default_rng(12), gain_keys=keys)
    fits.PrimaryHDU(img.astype(np.float32), hdr).writeto(tmp_path / "plain.fits")
    exp = read_exposure(tmp_path / "plain.fits", gain=gain if how == "argument" else None)
    sky_var = exp.metadata["GDSKYSIG"] ** 2
    assert exp.metadata["GDGAIN"] == gain
    for x, y in positions:  # star pixels: extra variance = (image − sky)/gain
        extra = exp.variance[y, x] - sky_var
        assert extra == pytest.approx((img[y, x] - 50.0) / gain, rel=0.02)
        assert exp.variance[y, x] > 20 * sky_var


def test_estimate_variance_is_unbiased_on_pure_noise():
    rng = np.random.default_rng(21)
    var, sky, sigma = estimate_variance(rng.normal(-3.0, 10.0, (300, 300)))
    assert sigma**2 == pytest.approx(100.0, rel=0.015) and sky == pytest.approx(-3.0, abs=0.1)
    np.testing.assert_array_equal(var, np.float32(sigma**2))
    var_g, _, _ = estimate_variance(np.array([[0.0, 1.0], [-1.0, np.nan]]) * 10 + 1000.0, gain=4.0)
    assert (
        np.isposinf(var_g[1, 1])
        and var_g[0, 1] > var_g[0, 0]
        and var_g[1, 0] == pytest.approx(var_g.min())
    )


def test_all_nan_plain_image_is_all_no_data(tmp_path):
    var, sky, sigma = estimate_variance(np.full((4, 4), np.nan))
    assert np.isposinf(var).all() and np.isnan(sky) and np.isnan(sigma)
    fits.PrimaryHDU(np.full((4, 5), np.nan, np.float32)).writeto(tmp_path / "nan.fits")
    exp = read_exposure(tmp_path / "nan.fits")
    assert (exp.mask == exp.mask_planes.bitmask("NO_DATA")).all() and np.isposinf(
        exp.variance
    ).all()
    assert "GDSKYSIG" not in exp.metadata


def test_integer_image_and_extension_image(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.integers(900, 1100, (30, 30)).astype(np.int16)
    fits.HDUList(
        [fits.PrimaryHDU(), fits.ImageHDU(np.zeros(5)), fits.ImageHDU(data, name="SCI")]
    ).writeto(tmp_path / "int.fits")
    exp = read_exposure(tmp_path / "int.fits")
    assert exp.image.dtype == np.float32 and exp.mask.dtype == np.int32
    np.testing.assert_array_equal(exp.image, data.astype(np.float32))
    np.testing.assert_array_equal(
        read_exposure(tmp_path / "int.fits", hdu=("SCI", 1)).image, exp.image
    )


# --------------------------------------------------------------------------- errors
def _lsst_file(path, **replace):
    hdus = {
        "IMAGE": np.zeros((6, 7), np.float32),
        "MASK": np.zeros((6, 7), np.int32),
        "VARIANCE": np.ones((6, 7), np.float32),
    }
    hdus.update(replace)
    fits.HDUList(
        [fits.PrimaryHDU()] + [fits.ImageHDU(v, name=k) for k, v in hdus.items() if v is not None]
    ).writeto(path)
    return path


def _raises(exc_type, path, **kw):
    with pytest.raises(exc_type) as info:
        read_exposure(path, **kw)
    assert type(info.value) is exc_type
    assert os.path.basename(str(path)) in str(info.value)
    return str(info.value)


def test_read_errors_name_the_file(tmp_path):
    _raises(FitsReadError, tmp_path / "missing.fits")
    (tmp_path / "garbage.fits").write_bytes(b"this is not a FITS file at all " * 200)
    _raises(FitsReadError, tmp_path / "garbage.fits")
    (tmp_path / "empty.fits").write_bytes(b"")
    _raises(FitsReadError, tmp_path / "empty.fits")
    good = _lsst_file(
        tmp_path / "good.fits",
        IMAGE=np.zeros((60, 70), np.float32),
        MASK=np.zeros((60, 70), np.int32),
        VARIANCE=np.ones((60, 70), np.float32),
    )
    raw = good.read_bytes()
    for frac in (0.5, 0.7, 0.99):
        cut = tmp_path / f"cut{int(frac * 100)}.fits"
        cut.write_bytes(raw[: int(len(raw) * frac)])
        assert "truncated" in _raises(FitsReadError, cut)
    msg = _raises(FitsReadError, good, hdu="NOPE")
    assert "NOPE" in msg and "IMAGE" in msg and "VARIANCE" in msg  # lists what is there
    _raises(FitsReadError, good, hdu=17)
    msg = _raises(FitsReadError, _lsst_file(tmp_path / "novar.fits", VARIANCE=None))
    assert "VARIANCE" in msg
    msg = _raises(
        FitsReadError, _lsst_file(tmp_path / "shape.fits", VARIANCE=np.ones((6, 8), np.float32))
    )
    assert "VARIANCE" in msg and "(6, 8)" in msg
    msg = _raises(
        FitsReadError, _lsst_file(tmp_path / "fmask.fits", MASK=np.zeros((6, 7), np.float32))
    )
    assert "MASK" in msg and "integer" in msg
    msg = _raises(
        FitsReadError, _lsst_file(tmp_path / "cube.fits", IMAGE=np.zeros((2, 6, 7), np.float32))
    )
    assert "IMAGE" in msg and "2-D" in msg
    fits.PrimaryHDU(np.zeros(10)).writeto(tmp_path / "oned.fits")
    _raises(FitsReadError, tmp_path / "oned.fits")
    bad_psf = fits.HDUList(
        [
            fits.PrimaryHDU(np.random.default_rng(1).random((5, 5))),
            fits.ImageHDU(np.ones((3, 3)), name="PSFIMAGE"),
        ]
    )
    bad_psf["PSFIMAGE"].header["PSFTYPE"] = "SPLINE"
    bad_psf.writeto(tmp_path / "badpsf.fits")
    assert "SPLINE" in _raises(FitsReadError, tmp_path / "badpsf.fits")
    with pytest.raises(InvalidInputError):
        read_exposure(good, gain=-1.0)
    with pytest.raises(FitsReadError, match="missing.fits"):
        read_psf(tmp_path / "missing.fits")


def test_write_errors_name_the_file(tmp_path):
    exp = make_exposure()
    target = tmp_path / "out.fits"
    target.write_bytes(b"old")
    with pytest.raises(FitsWriteError, match="out.fits"):
        write_exposure(target, exp)
    assert target.read_bytes() == b"old"
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")  # works as root too, unlike chmod
    with pytest.raises(FitsWriteError, match="a_file"):
        write_exposure(blocker / "out.fits", exp)
    with pytest.raises(FitsWriteError, match="no_such_dir"):
        write_exposure(tmp_path / "no_such_dir" / "out.fits", exp)
    write_exposure(target, exp, overwrite=True)
    assert_same_exposure(exp, read_exposure(target))
    assert issubclass(FitsWriteError, GpudiffError) and issubclass(FitsWriteError, OSError)


def test_write_is_atomic(tmp_path, monkeypatch):
    exp = make_exposure(GaussianPsf(sigma=2.0))
    target = tmp_path / "out.fits"
    seen = []

    def boom(self, fileobj, *args, **kwargs):
        seen.append(sorted(os.listdir(tmp_path)))  # the temporary exists by now
        fileobj.write(b"SIMPLE  =                    T" + b" " * 100)  # a partial file
        raise OSError("disk full")

    monkeypatch.setattr(fits.HDUList, "writeto", boom)
    with pytest.raises(FitsWriteError, match="out.fits"):
        write_exposure(target, exp)
    assert len(seen[0]) == 1 and seen[0][0].endswith(".tmp")
    assert os.listdir(tmp_path) == []  # no target, no temporary left behind
    monkeypatch.undo()
    write_exposure(target, exp)
    before = target.read_bytes()
    monkeypatch.setattr(fits.HDUList, "writeto", boom)
    with pytest.raises(FitsWriteError):
        write_exposure(target, make_exposure(), overwrite=True)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["out.fits"]  # old file intact
    monkeypatch.undo()
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


# --------------------------------------------------------------------------- real data
def test_real_jwst_i2d_stamp(shared_data):
    path = next((shared_data / "jwst_nircam_f200w" / "input").glob("jw01324*.fits"))
    exp = read_exposure(path)
    assert exp.shape == (900, 900) and exp.image.dtype == np.float32 and exp.image.dtype.isnative
    nodata = (exp.mask & exp.mask_planes.bitmask("NO_DATA")) != 0
    assert (
        nodata.sum() == 5
        and np.isnan(exp.image[nodata]).all()
        and np.isposinf(exp.variance[nodata]).all()
    )
    assert np.isfinite(exp.variance[~nodata]).all() and (exp.variance[~nodata] > 0).all()
    assert exp.wcs is not None and exp.wcs.has_celestial
    assert exp.metadata["BUNIT"] == "MJy/sr" and "CRVAL1" not in exp.metadata
    with fits.open(path) as hdul, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FITSFixedWarning about OBSGEO
        ref = WCS(hdul[0].header)
    np.testing.assert_allclose(
        exp.wcs.pixel_to_world_values([0, 450], [0, 899]),
        ref.pixel_to_world_values([0, 450], [0, 899]),
        rtol=0,
        atol=1e-12,
    )


def test_real_decam_cutout(shared_data, tmp_path):
    path = shared_data / "decam_sfft_mini" / "input" / "DEC-OBS04a.mini.fits"
    with fits.open(path) as hdul:
        raw, hdr = hdul[0].data.astype(np.float64), hdul[0].header
    assert raw.dtype == np.float64 and "GAINA" in hdr and "GAINB" in hdr
    exp = read_exposure(path)
    assert exp.image.dtype == np.float32 and exp.xy0 == (1, 1)  # LTV1 = LTV2 = -1
    np.testing.assert_array_equal(exp.image, raw.astype(np.float32))
    assert exp.metadata["GDGAIN"] == pytest.approx(hdr["GAIN"])
    assert exp.metadata["GDSKYSIG"] == pytest.approx(hdr["AVSIG"], rel=0.1)  # DESDM's own sky sigma
    y, x = np.unravel_index(np.argmax(raw), raw.shape)
    extra = exp.variance[y, x] - exp.metadata["GDSKYSIG"] ** 2
    assert extra == pytest.approx((raw[y, x] - exp.metadata["GDSKYLEV"]) / hdr["GAIN"], rel=1e-4)
    assert exp.wcs is not None and exp.wcs.has_celestial
    write_exposure(tmp_path / "decam.fits", exp)
    assert_same_exposure(exp, read_exposure(tmp_path / "decam.fits"))


def test_real_webbpsf(shared_data):
    path = next((shared_data / "jwst_nircam_f200w" / "auxiliary").glob("*WebbPSF.fits"))
    psf = read_psf(path)
    assert isinstance(psf, ImagePsf) and psf.size % 2 == 1
    assert psf.kernel_image().sum() == pytest.approx(1.0, abs=1e-9)
    assert psf.fwhm() == pytest.approx(2.1, rel=0.25)  # adaptive-moment FWHM, pixels


def test_fitsio_module_keeps_its_names():
    """gpudiff.image.fitsio is the former single module: every public name, and the private
    helpers other modules used, are gpudiff.image.io's."""
    from gpudiff.image import io

    for name in (
        "read_exposure",
        "write_exposure",
        "read_psf",
        "write_psf",
        "psf_to_hdus",
        "psf_from_hdus",
        "estimate_variance",
        "exposure_from_ccddata",
        "exposure_to_ccddata",
    ):
        assert getattr(fitsio, name) is getattr(io, name), name
    for old, new in (
        ("_read_xy0", "read_xy0"),
        ("_write_xy0", "write_xy0"),
        ("_read_wcs", "read_wcs"),
        ("_read_photocalib", "read_photocalib"),
        ("_atomic_write", "atomic_write_hdus"),
        ("_fset", "fset"),
        ("_fget", "fget"),
    ):
        assert getattr(fitsio, old) is getattr(io, new), old
    import gpudiff.image.exposure as exposure_module

    with open(
        exposure_module.__file__
    ) as f:  # no import circle: exposure.py never imports the FITS layer
        src = f.read()
    assert "from .fitsio" not in src and "from .io" not in src and "import io" not in src
