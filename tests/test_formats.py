"""Users' files, read as their layouts define them: afw (before and after 2021), lsst-images,
JWST, and gpudiff's own; and a gpudiff output of each re-read by gpudiff and by astropy.

The real files are ``../shared/data/lsst_formats`` (facts in its README, truth in its
``truth*.json`` and ``*.npy``) and the JWST pair; tests on them skip when they are absent.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from gpudiff.image import (
    Box,
    Exposure,
    FormatWarning,
    GaussianPsf,
    ImagePsf,
    MaskedImage,
    PhotoCalib,
    detect_layout,
    read_exposure,
    write_exposure,
)
from gpudiff.image.io import CellPsf, PiffPsf, piff_available, psf_from_hdus
from gpudiff.image.io.jwst import DQ_FLAGS

HAS_PIFF = piff_available()


@pytest.fixture
def formats(shared_data):
    d = shared_data / "lsst_formats"
    if not d.is_dir():
        pytest.skip(f"{d} not present")
    return d


def read_quiet(path, **kw):
    """read_exposure, returning the FormatWarnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exp = read_exposure(path, **kw)
    return exp, [str(w.message) for w in caught if issubclass(w.category, FormatWarning)]


def plane_count(exp, name) -> int:
    return int(exp.masked_image.mask_of(name).sum())


def world(wcs, x, y):
    return np.array(wcs.pixel_to_world_values(x, y), dtype=np.float64)


# ----------------------------------------------------------------------------- round trips
def assert_round_trip(exp: Exposure, tmp_path, name="out.fits"):
    """write → gpudiff and astropy read it back, with nothing lost."""
    out = tmp_path / name
    write_exposure(out, exp)
    back, warned = read_quiet(out)
    assert warned == [], warned  # a gpudiff output says everything about itself
    for a in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(back, a), getattr(exp, a), err_msg=a)
    assert back.mask.dtype == exp.mask.dtype
    assert back.mask_planes == exp.mask_planes
    for n in exp.mask_planes:
        assert back.mask_planes.description(n) == exp.mask_planes.description(n)
    assert back.xy0 == exp.xy0 and back.photo_calib == exp.photo_calib
    assert [c.keyword for c in back.metadata.cards] == [c.keyword for c in exp.metadata.cards]
    for a, b in zip(
        back.metadata.cards, exp.metadata.cards
    ):  # a 20-character card may round a float's last digit
        assert a.value == b.value or (
            isinstance(b.value, float) and a.value == pytest.approx(b.value, rel=1e-15)
        )
    if exp.wcs is None:
        assert back.wcs is None
    else:
        xs, ys = np.array([0.0, 5.5, exp.shape[1] - 1.0]), np.array([0.0, 3.25, exp.shape[0] - 1.0])
        np.testing.assert_allclose(
            world(back.wcs, xs, ys), world(exp.wcs, xs, ys), rtol=0, atol=1e-11
        )
    if exp.psf is None:
        assert back.psf is None
    else:
        corners = [(exp.bbox.x0, exp.bbox.y0), (exp.bbox.x1 - 1, exp.bbox.y1 - 1)]
        # a Piff model is written as its kernels on a grid over the image: exact at the nodes
        points = corners if isinstance(exp.psf, PiffPsf) else [exp.psf.average_position, *corners]
        for x, y in points:
            np.testing.assert_allclose(
                back.psf.kernel_image(x, y), exp.psf.kernel_image(x, y), rtol=0, atol=1e-12
            )
    # astropy (and so ds9 and any FITS reader) sees the same pixels, planes, origin and WCS.
    with fits.open(out) as hdul:
        assert [h.name for h in hdul][:4] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
        np.testing.assert_array_equal(hdul["IMAGE"].data, exp.image)
        np.testing.assert_array_equal(hdul["VARIANCE"].data, exp.variance)
        words = [h for h in hdul if h.name == "MASK"]
        assert len(words) == exp.mask_planes.n_words
        for k, h in enumerate(words):  # lsst-images' rule: plane n is data & MSKMnnnn, per HDU
            hdr, data = h.header, h.data.astype(np.int64)
            for key in [k2 for k2 in hdr if k2.startswith("MSKN")]:
                n = key[4:]
                bit = exp.mask_planes[hdr[key]]
                assert hdr[f"MSKM{n}"] == 1 << (bit - 31 * k) and f"MSKD{n}" in hdr
                np.testing.assert_array_equal(
                    (data & hdr[f"MSKM{n}"]) != 0, exp.masked_image.mask_of(hdr[key])
                )
        hdr = hdul["IMAGE"].header
        assert (-hdr["LTV1"], -hdr["LTV2"]) == exp.xy0 == (hdr["CRVAL1A"], hdr["CRVAL2A"])
        if exp.wcs is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                np.testing.assert_allclose(
                    world(WCS(hdr), 3.0, 4.0), world(exp.wcs, 3.0, 4.0), rtol=0, atol=1e-11
                )
    return back


# ----------------------------------------------------------------------------- lsst-images
@pytest.mark.parametrize("name", ["visit_image.fits", "visit_image_lossy.fits"])
def test_lsst_images_visit_image(formats, name, tmp_path):
    d = formats / "lsst_images"
    truth = json.loads((d / "truth.json").read_text())
    path = d / name
    assert detect_layout(path) == "lsst-images"
    exp, warned = read_quiet(path)
    assert warned == []
    img = np.load(d / "visit_image.img.npy")
    if "lossy" in name:  # RICE-quantized: within half a quantization step
        with fits.open(path, disable_image_compression=True) as raw:
            step = float(np.max(raw["IMAGE"].data["ZSCALE"]))
        assert np.abs(exp.image - img).max() <= 0.5 * step * (1 + 1e-6)
    else:
        np.testing.assert_array_equal(exp.image, img)
    np.testing.assert_array_equal(exp.variance, np.load(d / "visit_image.var.npy"))
    assert exp.xy0 == (truth["x0"], truth["y0"]) == (10, 20)
    assert dict(exp.mask_planes) == truth["planes"]  # the file's own names and bits
    sat, nod, det = (
        np.load(d / f"visit_image.{k}.npy").astype(bool) for k in ("sat", "nod", "det")
    )
    for plane_name, want in (
        ("SATURATED", sat),
        ("SAT", sat),
        ("NO_DATA", nod),
        ("BAD", nod),
        ("DETECTED", det),
    ):
        np.testing.assert_array_equal(
            exp.masked_image.mask_of(plane_name), want, err_msg=plane_name
        )
    assert exp.mask_planes.description("SATURATED").startswith("Pixel was saturated")
    np.testing.assert_allclose(world(exp.wcs, 49.5, 59.5), truth["wcs_crval"], atol=1e-9)
    assert isinstance(exp.psf, GaussianPsf) and exp.psf.sigma == truth["psf_sigma"] == 2.0
    assert (
        exp.metadata["BUNIT"] == "nJy"
        and "DATAMODL" not in exp.metadata
        and "JSONADDR" not in exp.metadata
    )
    back = assert_round_trip(exp, tmp_path)
    assert detect_layout(tmp_path / "out.fits") == "gpudiff"
    assert isinstance(back.psf, GaussianPsf) and back.psf.sigma == 2.0


@pytest.mark.parametrize(
    "name", ["dp1_visit_image_minified.fits", "dp2_difference_image_minified.fits"]
)
def test_lsst_images_dp_pieces(formats, name, tmp_path):
    d = formats / "lsst_images"
    truth = json.loads((d / "truth_masks.json").read_text())[name]
    exp, warned = read_quiet(d / name)
    assert dict(exp.mask_planes) == truth["bits"]
    for plane_name, n in truth["counts"].items():
        assert plane_count(exp, plane_name) == n, plane_name
    # afw spellings find the lsst-images planes (the issue's DP1 piece: 186 INTERPOLATED, not
    # DETECTED)
    assert plane_count(exp, "INTRP") == truth["counts"]["INTERPOLATED"] == plane_count(exp, "BAD")
    assert plane_count(exp, "EDGE") == truth["counts"]["DETECTION_EDGE"]
    assert plane_count(exp, "DETECTED") == 0
    if HAS_PIFF:
        assert isinstance(exp.psf, PiffPsf)
        ref = np.load(d / f"{name}.psf.npy")
        c = exp.bbox
        k = exp.psf.kernel_image(
            c.x0 + (c.width - 1) / 2, c.y0 + (c.height - 1) / 2, size=ref.shape[0]
        )
        np.testing.assert_allclose(k, ref, rtol=0, atol=1e-6)
    else:
        assert exp.psf is None
        assert any("Piff" in w and "'piff'" in w and "not installed" in w for w in warned), warned
    assert_round_trip(exp, tmp_path)


def test_lsst_images_cell_coadd(formats, tmp_path):
    path = formats / "lsst_images" / "dp2_cell_coadd_minified.fits"
    exp, warned = read_quiet(path)
    assert warned == []
    assert exp.xy0 == (36, 48) and exp.shape == (12, 12)
    assert {"NO_DATA", "SATURATED", "REJECTED", "CLIPPED", "INEXACT_PSF"} <= set(exp.mask_planes)
    with fits.open(path) as hdul:
        cube = hdul["PSF"].data.astype(np.float64)
        raw = hdul["MASK"].data.astype(np.int64)
        nd = hdul["MASK"].header["MSKM0000"]
    np.testing.assert_array_equal(exp.masked_image.mask_of("NO_DATA"), (raw & nd) != 0)
    psf = (
        exp.psf
    )  # 4-D cells × kernel: one kernel per 6×6 cell, the missing cell (8, 6) → a neighbour
    assert isinstance(psf, CellPsf) and psf.valid.tolist() == [[False, True], [True, True]]
    for (i, j), (x, y) in {(0, 1): (44, 50), (1, 0): (37, 57), (1, 1): (47, 59)}.items():
        np.testing.assert_allclose(
            psf.kernel_image(x, y), cube[i, j] / cube[i, j].sum(), rtol=1e-12
        )
    assert psf.cell_of(38, 49) != (0, 0) and np.isfinite(psf.kernel_image(38, 49)).all()
    ax, ay = psf.average_position
    assert exp.bbox.x0 <= ax < exp.bbox.x1 and exp.bbox.y0 <= ay < exp.bbox.y1
    with fits.open(
        path
    ) as hdul:  # not confused with gpudiff's own 2-D PSF HDU, wherever it is read
        assert isinstance(psf_from_hdus(hdul), CellPsf)
    back = assert_round_trip(exp, tmp_path)
    assert isinstance(back.psf, CellPsf) and back.psf.valid.tolist() == psf.valid.tolist()


def test_lsst_images_mask_over_two_hdus(tmp_path):
    """> 31 planes: lsst-images' second MASK HDU (EXTVER 2) holds planes 31…; all kept, by name."""
    rng = np.random.default_rng(4)
    shape, names = (9, 11), [f"PLANE{i:02d}" for i in range(40)]
    names[1], names[33] = "SATURATED", "COSMIC_RAY"
    truth = rng.random((40, *shape)) < 0.2
    words = [np.zeros(shape, np.int32), np.zeros(shape, np.int32)]
    hdrs = [fits.Header(), fits.Header()]
    for i, name in enumerate(names):
        k, n = divmod(i, 31)
        words[k] |= truth[i].astype(np.int32) << n
        hdrs[k][f"MSKN{n:04d}"], hdrs[k][f"MSKM{n:04d}"], hdrs[k][f"MSKD{n:04d}"] = (
            name,
            1 << n,
            f"plane {i}",
        )
    primary = fits.PrimaryHDU()
    primary.header["DATAMODL"] = "https://images.lsst.io/schemas/masked_image-1.0.0"
    a = fits.Header(
        {
            "CTYPE1A": "LINEAR",
            "CTYPE2A": "LINEAR",
            "CRPIX1A": 1.0,
            "CRPIX2A": 1.0,
            "CRVAL1A": 5.0,
            "CRVAL2A": 7.0,
        }
    )
    hdus = [primary, fits.CompImageHDU(rng.normal(size=shape).astype(np.float32), a, name="IMAGE")]
    for k in range(2):
        h = fits.CompImageHDU(words[k], hdrs[k], name="MASK")
        h.header["EXTVER"] = k + 1
        hdus.append(h)
    hdus.append(fits.CompImageHDU(np.full(shape, 2.0, np.float32), a, name="VARIANCE"))
    fits.HDUList(hdus).writeto(tmp_path / "wide.fits")
    exp, warned = read_quiet(tmp_path / "wide.fits")
    assert exp.xy0 == (5, 7) and exp.mask.dtype == np.int64 and len(exp.mask_planes) == 40
    assert [w for w in warned if "PSF" not in w] == [  # planes of unknown meaning: kept, and said
        "%s: mask planes with no LSST meaning known to gpudiff are kept under their own names: %s"
        % (
            tmp_path / "wide.fits",
            ", ".join(n for n in names if n not in ("SATURATED", "COSMIC_RAY")),
        )
    ]
    for i, name in enumerate(names):
        np.testing.assert_array_equal(exp.masked_image.mask_of(name), truth[i], err_msg=name)
        assert exp.mask_planes.description(name) == f"plane {i}"
    np.testing.assert_array_equal(
        exp.masked_image.mask_of("CR"), truth[33]
    )  # alias of a plane past bit 31
    back = assert_round_trip(exp, tmp_path)
    with fits.open(tmp_path / "out.fits") as hdul:
        assert [h.ver for h in hdul if h.name == "MASK"] == [1, 2]
        assert (
            hdul["MASK", 1].header["MP_SATURATED"] == 1
            and "MP_COSMIC_RAY" not in hdul["MASK", 1].header
        )
    assert back.mask_planes["COSMIC_RAY"] == 33


# ----------------------------------------------------------------------------- afw
def test_afw_legacy_hsc(formats, tmp_path):
    path = formats / "afw_legacy" / "HSC-0908120-056-small.fits"
    assert detect_layout(path) == "afw"
    exp, _ = read_quiet(path)
    with fits.open(path) as hdul:  # EXTTYPE, no EXTNAME: HDUs 1, 2, 3
        img, msk, var, hdr = (
            hdul[1].data,
            hdul[2].data.astype(np.int64),
            hdul[3].data,
            hdul[1].header,
        )
        mp = {k[3:]: hdul[2].header[k] for k in hdul[2].header if k.startswith("MP_")}
    np.testing.assert_array_equal(exp.image, img)
    np.testing.assert_array_equal(exp.variance, var)  # the file's VARIANCE, never re-estimated
    assert (
        float(np.mean(exp.variance)) == pytest.approx(430.3, abs=0.05)
        and "GDVAREST" not in exp.metadata
    )
    assert dict(exp.mask_planes) == mp and mp["CROSSTALK"] == 8 and mp["NO_DATA"] == 9
    for name in ("DETECTED", "CROSSTALK"):
        n = plane_count(exp, name)
        assert n > 0 and n == int(((msk >> mp[name]) & 1).sum())
    assert exp.xy0 == (100, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = WCS(hdr)
    assert "SIP" in exp.wcs.wcs.ctype[0]
    np.testing.assert_allclose(
        world(exp.wcs, [0, 150.5], [0, 20.25]), world(ref, [0, 150.5], [0, 20.25]), atol=1e-12
    )
    assert (
        "AR_HDU" not in exp.metadata and "WCS_ID" not in exp.metadata
    )  # archive pointers are not metadata
    assert_round_trip(exp, tmp_path)


@pytest.mark.parametrize(
    "name, calib",
    [
        ("exposure-noversion.fits", (3631e9 / 1e6, 3631e9 / 1e6 * 0.02)),
        ("exposure-version-2.fits", (1e6, 2e4)),
    ],
)
def test_afw_legacy_small(formats, name, calib, tmp_path):
    exp, _ = read_quiet(formats / "afw_legacy" / name)
    assert exp.shape == (10, 10) and exp.xy0 == (0, 0) and exp.wcs is not None
    assert (
        exp.mask_planes["NO_DATA"] == 8
        and plane_count(exp, "BAD") == 1
        and plane_count(exp, "INTERPOLATED") == 1
    )
    assert exp.photo_calib.calibration_mean == pytest.approx(calib[0])
    assert exp.photo_calib.calibration_err == pytest.approx(calib[1])
    assert_round_trip(exp, tmp_path)


@pytest.mark.parametrize(
    "name, xy0, var_mean",
    [("scienceMI.fits", (9, 9), 102.416), ("templateMI.fits", (24, 24), 2.4162)],
)
def test_ip_diffim_pair(formats, name, xy0, var_mean, tmp_path):
    exp, warned = read_quiet(formats / "ipdiffim" / name)
    assert exp.xy0 == xy0 and float(np.mean(exp.variance)) == pytest.approx(var_mean, rel=1e-4)
    assert "GDVAREST" not in exp.metadata and exp.mask_planes["SAT"] == 1
    if name == "templateMI.fits":  # its MASK HDU claims another origin: said, and the IMAGE's used
        assert any("xy0" in w for w in warned)
    assert_round_trip(exp, tmp_path)


def test_afw_piff(formats, tmp_path):
    path = formats / "afw_piff" / "exp.fits"
    exp, warned = read_quiet(path)
    assert detect_layout(path) == "afw" and exp.shape == (301, 110)
    with fits.open(path) as hdul:
        np.testing.assert_array_equal(exp.variance, hdul["VARIANCE"].data)
    if not HAS_PIFF:  # never a silent None
        assert exp.psf is None
        assert any("PiffPsf" in w and "'piff'" in w and "not installed" in w for w in warned), (
            warned
        )
        return
    assert isinstance(exp.psf, PiffPsf)
    for x, y in ((0, 0), (-200, 30), (10, 100)):
        ref = fits.getdata(formats / "afw_piff" / f"psfIm_{x}_{y}.fits").astype(np.float64)
        np.testing.assert_allclose(exp.psf.kernel_image(x, y), ref, rtol=0, atol=1e-6)
    back = assert_round_trip(
        exp, tmp_path
    )  # written as a grid of Piff's kernel images over the image
    c = exp.bbox
    np.testing.assert_allclose(
        back.psf.kernel_image(c.x0, c.y0), exp.psf.kernel_image(c.x0, c.y0), atol=1e-12
    )


def _afw_file(path, objects, primary_cards, shape=(6, 5), planes=None):
    """A minimal afw-style file (EXTTYPE, no EXTNAME) with an archive of ``objects``:
    [(id, class name, {column: (format, value)})]."""
    rng = np.random.default_rng(1)
    prim = fits.PrimaryHDU()
    prim.header.update(primary_cards)
    hdus = [prim]
    for t, data in (
        ("IMAGE", rng.normal(size=shape).astype(">f4")),
        ("MASK", np.zeros(shape, ">i4")),
        ("VARIANCE", np.full(shape, 3.0, ">f4")),
    ):
        h = fits.ImageHDU(data)
        h.header["EXTTYPE"] = t
        if t == "MASK":
            h.header["MP_BAD"], h.header["HIERARCH MP_NO_DATA"] = 0, 8
            h.header.update(planes or {})
        hdus.append(h)
    index = fits.BinTableHDU.from_columns(
        [
            fits.Column("id", "J", array=[o[0] for o in objects]),
            fits.Column("cat.archive", "J", array=list(range(1, len(objects) + 1))),
            fits.Column("cat.persistable", "J", array=[0] * len(objects)),
            fits.Column("row0", "J", array=[0] * len(objects)),
            fits.Column("nrows", "J", array=[1] * len(objects)),
            fits.Column("name", "64A", array=[o[1] for o in objects]),
            fits.Column("module", "64A", array=["lsst.x"] * len(objects)),
        ]
    )
    index.header["EXTTYPE"], index.header["AR_CATN"] = "ARCHIVE_INDEX", 0
    hdus.append(index)
    for n, (_, cls, cols) in enumerate(objects, start=1):
        t = fits.BinTableHDU.from_columns(
            [fits.Column(k, f, array=[v]) for k, (f, v) in cols.items()]
        )
        t.header["EXTTYPE"], t.header["AR_CATN"], t.header["AR_NAME"] = "ARCHIVE_DATA", n, cls
        hdus.append(t)
    fits.HDUList(hdus).writeto(path)
    return path


def test_afw_archive_psfs(tmp_path):
    kernel = np.outer([1.0, 3.0, 5.0, 3.0, 1.0], [1.0, 2.0, 1.0])  # 5 rows × 3 columns
    p = _afw_file(
        tmp_path / "kernel.fits",
        [
            (
                1,
                "KernelPsf",
                {
                    "kernel": ("J", 2),
                    "averagePosition_x": ("D", 2.5),
                    "averagePosition_y": ("D", 1.0),
                },
            ),
            (
                2,
                "FixedKernel",
                {
                    "dimensions_x": ("J", 3),
                    "dimensions_y": ("J", 5),
                    "center_x": ("J", 1),
                    "center_y": ("J", 2),
                    "image": ("15D", kernel.ravel()),
                },
            ),
        ],
        {"PSF_ID": 1},
    )
    exp, warned = read_quiet(p)
    assert warned == [] and isinstance(exp.psf, ImagePsf) and exp.psf.average_position == (2.5, 1.0)
    np.testing.assert_allclose(exp.psf.kernel_image()[:, 1:4], kernel / kernel.sum())
    g = _afw_file(
        tmp_path / "gauss.fits",
        [
            (
                3,
                "SingleGaussianPsf",
                {"dimensions_x": ("J", 21), "dimensions_y": ("J", 21), "sigma": ("D", 1.7)},
            )
        ],
        {"HIERARCH ARCHIVE_ID_PSF": 3},
    )
    exp, _ = read_quiet(g)
    assert isinstance(exp.psf, GaussianPsf) and exp.psf.sigma == 1.7 and exp.psf.size == 21
    assert_round_trip(exp, tmp_path)
    c = _afw_file(
        tmp_path / "coadd.fits",
        [(1, "CoaddPsf", {"ctrl": ("J", 1)})],
        {"PSF_ID": 1},
        planes={"HIERARCH MP_MY_PLANE": 4},
    )
    exp, warned = read_quiet(c)
    assert exp.psf is None and any("CoaddPsf" in w for w in warned)
    assert exp.mask_planes["MY_PLANE"] == 4 and any(
        "kept under their own names: MY_PLANE" in w for w in warned
    )


# --------------------------------------------------------------------------- masks: what is assumed
def test_mask_without_names_and_unnamed_bits(tmp_path):
    shape = (4, 6)
    mask = np.zeros(shape, np.int32)
    mask[0, 0], mask[1, 1] = (
        1 << 8,
        1 << 20,
    )  # NO_DATA by afw's default bits; bit 20 named by nothing
    hdus = [
        fits.PrimaryHDU(),
        fits.ImageHDU(np.zeros(shape, np.float32), name="IMAGE"),
        fits.ImageHDU(mask, name="MASK"),
        fits.ImageHDU(np.ones(shape, np.float32), name="VARIANCE"),
    ]
    fits.HDUList(hdus).writeto(tmp_path / "bare.fits")
    exp, warned = read_quiet(tmp_path / "bare.fits")
    assert any("no MP_* or MSK* cards" in w and "assumed afw's default" in w for w in warned)
    assert any("BIT20 (1 px)" in w for w in warned)  # kept, named, said
    assert (
        plane_count(exp, "NO_DATA") == 1
        and exp.mask_planes["BIT20"] == 20
        and plane_count(exp, "BIT20") == 1
    )
    hdus[2].header["HIERARCH MP_NO_DATA"] = 8
    hdus[2].header["HIERARCH MP_MY_OWN_PLANE"] = 3
    fits.HDUList(hdus).writeto(tmp_path / "named.fits")
    exp, warned = read_quiet(tmp_path / "named.fits")
    assert dict(exp.mask_planes) == {"MY_OWN_PLANE": 3, "NO_DATA": 8, "BIT20": 20}
    assert_round_trip(exp, tmp_path)


def test_mp_and_msk_cards_that_disagree_are_reported(tmp_path):
    shape = (3, 3)
    h = fits.ImageHDU(np.full(shape, 2, np.int32), name="MASK")
    h.header["MP_SAT"], h.header["MSKN0001"], h.header["MSKM0001"] = 3, "SATURATED", 2
    fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.ImageHDU(np.zeros(shape, np.float32), name="IMAGE"),
            h,
            fits.ImageHDU(np.ones(shape, np.float32), name="VARIANCE"),
        ]
    ).writeto(tmp_path / "both.fits")
    exp, warned = read_quiet(tmp_path / "both.fits")
    assert dict(exp.mask_planes) == {"SATURATED": 1} and plane_count(exp, "SAT") == 9
    assert any("disagree" in w for w in warned)


# ----------------------------------------------------------------------------- JWST
@pytest.fixture
def jwst_pair(shared_data):
    d = shared_data / "jwst_nircam_f200w"
    if not d.is_dir():
        pytest.skip(f"{d} not present")
    sci = sorted((d / "input").glob("jw02561*_i2d_stamp.fits"))[0]
    return sci, d / "auxiliary" / sci.name.replace(".fits", ".noise.fits")


def test_jwst_stamp_pair(shared_data, tmp_path):
    d = shared_data / "jwst_nircam_f200w"
    if not d.is_dir():
        pytest.skip(f"{d} not present")
    for path in sorted((d / "input").glob("*.fits")):
        assert detect_layout(path) == "jwst"
        exp, warned = read_quiet(path)
        assert exp.metadata["GDVAREST"] == "sky" and any(
            "without ERR" in w for w in warned
        )  # said, not silent
        assert exp.metadata["BUNIT"] == "MJy/sr" and exp.wcs is not None
        assert_round_trip(exp, tmp_path, name=path.name)


def test_jwst_full_product(jwst_pair, tmp_path):
    """A cal/i2d-style file built from the real stamp and its ERR map: ERR is the noise,
    DQ bits become planes by the JWST definitions, WHT = 0 is no data."""
    sci_path, err_path = jwst_pair
    with fits.open(sci_path) as s, fits.open(err_path) as e:
        sci, sci_hdr, err = (
            s[0].data.astype(np.float32),
            s[0].header.copy(),
            e[0].data.astype(np.float32),
        )
    shape = sci.shape
    bit = {f: 1 << i for i, f in enumerate(DQ_FLAGS)}
    dq = np.zeros(shape, np.uint32)
    dq[10, 10] = bit["DO_NOT_USE"] | bit["SATURATED"]
    dq[20, 20:23] = bit["JUMP_DET"]
    dq[30, 30] = bit["PERSISTENCE"] | bit["HOT"]
    dq[40, 40] = bit["REFERENCE_PIXEL"]
    wht = np.ones(shape, np.float32)
    wht[50, 50:60] = 0.0
    primary = fits.PrimaryHDU()
    primary.header["TELESCOP"], primary.header["INSTRUME"] = "JWST", "NIRCAM"
    sci_hdr.remove("EXTNAME")
    hdus = [
        primary,
        fits.ImageHDU(sci, sci_hdr, name="SCI"),
        fits.ImageHDU(err, name="ERR"),
        fits.ImageHDU(dq, name="DQ"),
        fits.ImageHDU(wht, name="WHT"),
    ]
    fits.HDUList(hdus).writeto(tmp_path / "cal.fits")
    exp, warned = read_quiet(tmp_path / "cal.fits")
    assert detect_layout(tmp_path / "cal.fits") == "jwst" and "GDVAREST" not in exp.metadata
    good = ~exp.masked_image.mask_of("NO_DATA")
    np.testing.assert_allclose(exp.variance[good], (err.astype(np.float64) ** 2)[good], rtol=1e-6)
    m = exp.masked_image
    assert (
        m.mask_of("BAD")[10, 10] and m.mask_of("NO_DATA")[10, 10] and m.mask_of("SATURATED")[10, 10]
    )
    assert (
        m.mask_of("SAT").sum() == 1
        and m.mask_of("COSMIC_RAY")[20, 20:23].all()
        and m.mask_of("CR").sum() == 3
    )
    assert (
        m.mask_of("BAD")[30, 30]
        and m.mask_of("PERSISTENCE")[30, 30]
        and m.mask_of("PERSISTENCE").sum() == 1
    )
    assert any("PERSISTENCE (1 px)" in w for w in warned)  # unmapped flag: own name, said
    assert m.mask_of("NO_DATA")[40, 40] and m.mask_of("NO_DATA")[50, 50:60].all()
    assert (
        np.isfinite(exp.image[10, 10]) and exp.image[10, 10] == sci[10, 10]
    )  # values kept, the mask says no
    assert_round_trip(exp, tmp_path)
    # without ERR, the VAR_* extensions add up to the variance
    hdus[2] = fits.ImageHDU(err.astype(np.float64) ** 2 * 0.75, name="VAR_POISSON")
    hdus.append(fits.ImageHDU(err.astype(np.float64) ** 2 * 0.25, name="VAR_RNOISE"))
    fits.HDUList(hdus).writeto(tmp_path / "var.fits")
    exp2, _ = read_quiet(tmp_path / "var.fits")
    np.testing.assert_allclose(exp2.variance[good], exp.variance[good], rtol=1e-6)


# ---------------------------------------------------------------------- gpudiff's own, and FitsWarp
def test_gpudiff_output_and_warp_reader(formats, tmp_path):
    from gpudiff.tasks.coadd_warps import FitsWarp

    exp, _ = read_quiet(formats / "lsst_images" / "visit_image.fits")
    planes = exp.mask_planes.copy()
    mi = MaskedImage(
        exp.image, exp.variance, exp.mask, xy0=exp.xy0, mask_planes=planes
    ).with_plane_set("SAT", exp.image > 1e9)  # adds nothing: SAT is SATURATED
    assert mi.mask_planes == exp.mask_planes
    out = Exposure(
        mi, psf=exp.psf, wcs=exp.wcs, photo_calib=PhotoCalib(2.0, 0.1), metadata=exp.metadata
    )
    back = assert_round_trip(out, tmp_path)
    warp = FitsWarp(tmp_path / "out.fits")
    sub = warp.read(Box(12, 25, 40, 60))
    np.testing.assert_array_equal(
        sub.mask_of("SAT"), back.masked_image.subimage(Box(12, 25, 40, 60)).mask_of("SAT")
    )
    lsst = FitsWarp(formats / "lsst_images" / "visit_image.fits")  # lsst-images files as warps too
    assert lsst.mask_planes == exp.mask_planes and isinstance(lsst.psf, GaussianPsf)
