"""ops.warp: Lanczos resampling between WCSs, masks, variance, PSF, overlap checks."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from gpudiff.errors import InvalidInputError, NoOverlapError
from gpudiff.image import Box, Exposure, GaussianPsf, adaptive_moments
from gpudiff.ops.warp import (
    _kernel,
    check_overlap,
    pixel_mapping,
    warp_exposure,
    wcs_equal,
    wcs_overlap,
)
from gpudiff.sim import simulate_exposure


def shifted_wcs(wcs, dx, dy):
    """A WCS whose array pixel (c, r) sees what ``wcs`` sees at (c + dx, r + dy)."""
    w = copy.deepcopy(wcs)
    w.wcs.crpix = [wcs.wcs.crpix[0] - dx, wcs.wcs.crpix[1] - dy]
    return w


def rotated_wcs(wcs, angle, dx=0.0, dy=0.0):
    w = shifted_wcs(wcs, dx, dy)
    c, s = np.cos(angle), np.sin(angle)
    w.wcs.cd = np.asarray(wcs.wcs.cd) @ np.array([[c, -s], [s, c]])
    return w


@pytest.fixture(scope="module")
def stars():
    """Noiseless, well-sampled (σ = 2 px) isolated stars, away from the edges."""
    return simulate_exposure(
        256,
        seed=2,
        n_stars=25,
        psf=2.0 * 2.3548,
        noise="none",
        sky=0.0,
        read_noise=0.0,
        min_separation=30,
        margin=-25,
    )


def test_lanczos_weights():
    n, f = _kernel("lanczos3")
    assert n == 6
    x = np.random.default_rng(0).uniform(0, 1, 500)
    w = f(np, x)
    t = x[None, :] + (2 - np.arange(6))[:, None]
    ref = np.sinc(t) * np.sinc(t / 3)
    np.testing.assert_allclose(w, ref / ref.sum(axis=0), atol=1e-14)
    np.testing.assert_allclose(f(np, np.zeros(1))[:, 0], [0, 0, 1, 0, 0, 0], atol=1e-15)
    assert _kernel("bilinear")[0] == 2 and _kernel("lanczos4")[0] == 8
    with pytest.raises(InvalidInputError):
        _kernel("cubic")


def test_integer_shift_is_exact(backend):
    sim = simulate_exposure(
        200, seed=2, n_stars=30, bad_columns=[577], saturation=20000.0, flux_max=3e5, xy0=(500, 700)
    )
    exp = sim.exposure.to_backend(backend)
    dx, dy = 3, -2
    out = warp_exposure(exp, shifted_wcs(exp.wcs, dx, dy), exp.bbox)
    img, msk = backend.asnumpy(out.image), backend.asnumpy(out.mask)
    src_i, src_m = sim.exposure.image, sim.exposure.mask
    # out[r, c] = src[r + dy, c + dx] wherever the 6×6 footprint fits in the source
    sl_out = (slice(5, 197), slice(3, 194))
    sl_src = (slice(5 + dy, 197 + dy), slice(3 + dx, 194 + dx))
    np.testing.assert_allclose(img[sl_out], src_i[sl_src], rtol=0, atol=1e-5 * np.abs(src_i).max())
    np.testing.assert_allclose(
        backend.asnumpy(out.variance)[sl_out], sim.exposure.variance[sl_src], rtol=1e-6
    )
    np.testing.assert_array_equal(msk[sl_out], src_m[sl_src])  # BAD column and SAT moved
    assert (msk[sl_out] & out.mask_planes.bitmask("BAD")).any()
    # the border the kernel does not fit is NO_DATA with NaN/inf
    nod = out.mask_planes.bitmask("NO_DATA")
    assert (msk[:4] == nod).all() and np.isnan(img[:4]).all()
    assert np.isinf(backend.asnumpy(out.variance)[:4]).all()
    assert out.xy0 == exp.xy0 and out.wcs is not exp.wcs
    assert out.psf is exp.psf  # same pixel grid up to a shift: PSF kept
    assert out.photo_calib == exp.photo_calib and out.metadata["BAND"] == exp.metadata["BAND"]


def test_subpixel_shift_there_and_back(backend, stars):
    exp = stars.exposure.to_backend(backend)
    there = warp_exposure(exp, shifted_wcs(exp.wcs, 0.37, -0.61), exp.bbox)
    back = warp_exposure(there, exp.wcs, exp.bbox)
    src = stars.exposure.image
    got = backend.asnumpy(back.image)
    ok = np.isfinite(got)
    assert ok[8:-8, 8:-8].all()
    # measured: flux ratio 1 − 1e-7; max error 0.85 % of the peak at σ = 2 px (1.45 % at
    # σ = 1.5 px: Lanczos-3 attenuates a little at 0.1–0.2 cycles/px, twice here)
    assert abs(got[ok].sum() / src[ok].sum() - 1) < 1e-3
    assert np.abs(got[ok] - src[ok]).max() < 0.01 * src.max()
    # one way: total flux of the field is preserved too
    t = backend.asnumpy(there.image)
    assert abs(np.nansum(t) / src.sum() - 1) < 1e-3


def _aperture_flux(img, x, y, r=9):
    ix, iy = int(round(x)), int(round(y))
    return float(img[iy - r : iy + r + 1, ix - r : ix + r + 1].sum())


def test_rotation_90_degrees_puts_stars_in_the_right_pixel(backend, stars):
    exp = stars.exposure.to_backend(backend)
    dest = rotated_wcs(exp.wcs, np.pi / 2)
    out = warp_exposure(exp, dest, exp.bbox)
    img = backend.asnumpy(out.image)
    ra, dec = exp.wcs.pixel_to_world_values(stars.truth["x"], stars.truth["y"])
    px, py = dest.world_to_pixel_values(ra, dec)
    inside = (px > 12) & (px < 243) & (py > 12) & (py < 243)
    assert inside.sum() >= 8
    yy, xx = np.mgrid[-6:7, -6:7]
    for x, y in zip(px[inside], py[inside]):
        ix, iy = int(round(x)), int(round(y))
        st = img[iy - 6 : iy + 7, ix - 6 : ix + 7]
        assert st.argmax() == 6 * 13 + 6 or np.hypot(x - ix, y - iy) > 0.45  # peak pixel
        assert (st * xx).sum() / st.sum() == pytest.approx(x - ix, abs=0.01)
        assert (st * yy).sum() / st.sum() == pytest.approx(y - iy, abs=0.01)
    # a 90° rotation of a round PSF: the realized PSF has the same (pixelized) size
    assert out.psf is not exp.psf
    ref = adaptive_moments(exp.psf.kernel_image())
    np.testing.assert_allclose(out.psf.moments(), [ref[3], ref[2], -ref[4]], rtol=1e-3, atol=1e-4)


def test_small_rotation_and_shift_preserve_star_fluxes(backend, stars):
    exp = stars.exposure.to_backend(backend)
    dest = rotated_wcs(exp.wcs, np.deg2rad(7.0), 1.3, -0.8)
    out = warp_exposure(exp, dest, exp.bbox)
    img = backend.asnumpy(out.image)
    ra, dec = exp.wcs.pixel_to_world_values(stars.truth["x"], stars.truth["y"])
    px, py = dest.world_to_pixel_values(ra, dec)
    inside = (px > 15) & (px < 240) & (py > 15) & (py < 240)
    assert inside.sum() >= 8
    f_src = np.array(
        [
            _aperture_flux(stars.exposure.image, x, y)
            for x, y in zip(stars.truth["x"], stars.truth["y"])
        ]
    )
    f_out = np.array([_aperture_flux(img, x, y) for x, y in zip(px, py)])
    # measured max |Δ| 0.06 % over 25 stars (the 19×19 apertures hold ~all the light)
    np.testing.assert_allclose(f_out[inside], f_src[inside], rtol=5e-3)


def test_warped_psf_is_rotated():
    psf = GaussianPsf(sigma=2.2, sigma_y=1.4, size=21)
    sim = simulate_exposure(128, seed=1, n_stars=0, psf=psf)
    exp = sim.exposure
    out = warp_exposure(exp, rotated_wcs(exp.wcs, np.pi / 2), exp.bbox)
    ixx, iyy, ixy = out.psf.moments()
    _, _, sxx, syy, sxy = adaptive_moments(exp.psf.kernel_image())  # pixelized source PSF
    assert ixx == pytest.approx(syy, rel=1e-3) and iyy == pytest.approx(sxx, rel=1e-3)
    assert abs(ixy) < 1e-3
    # a 30° rotation: the moments rotate (trace and determinant kept)
    out = warp_exposure(exp, rotated_wcs(exp.wcs, np.deg2rad(30.0)), exp.bbox)
    rxx, ryy, rxy = out.psf.moments()
    assert rxx + ryy == pytest.approx(sxx + syy, rel=0.01)
    assert rxx * ryy - rxy**2 == pytest.approx(sxx * syy - sxy**2, rel=0.02)
    assert abs(rxy) > 0.3
    assert out.psf.kernel_image().sum() == pytest.approx(1.0)


def test_pure_noise_variance(backend):
    rng = np.random.default_rng(1)
    sim = simulate_exposure(64, seed=0, n_stars=0)  # for a WCS
    wcs = copy.deepcopy(sim.exposure.wcs)
    wcs.array_shape = (512, 512)
    noise = Exposure.from_arrays(
        rng.normal(0, 2.0, (512, 512)), np.full((512, 512), 4.0), wcs=wcs, backend=backend
    )
    for dx, dy in ((0.5, 0.5), (0.3, 0.0), (0.21, -0.37)):
        out = warp_exposure(noise, shifted_wcs(wcs, dx, dy), Box(0, 0, 512, 512))
        img, var = backend.asnumpy(out.image), backend.asnumpy(out.variance)
        ok = np.isfinite(img)
        reported = float(var[ok].mean())
        measured = float(img[ok].var())
        # Σw² ≤ 1: the reported variance never exceeds the input's; for white noise it
        # predicts each pixel's variance (measured/reported 0.997–0.998; reported/input
        # 0.617 at (0.5, 0.5), 0.861 at (0.3, 0), 0.755 at (0.21, −0.37)); the covariance
        # between output pixels is what the squared-weight convention ignores.
        assert reported <= 4.0 + 1e-4
        assert measured / reported == pytest.approx(1.0, abs=0.03)
        np.testing.assert_allclose(var[ok], reported, rtol=1e-5)  # uniform shift: uniform Σw²
    out = warp_exposure(noise, shifted_wcs(wcs, 0.5, 0.5), Box(0, 0, 512, 512))
    assert float(
        np.nanmean(backend.asnumpy(out.variance)[np.isfinite(backend.asnumpy(out.image))])
    ) == pytest.approx(4.0 * 0.618, rel=0.01)


def test_no_data_and_edge_handling(backend):
    sim = simulate_exposure(120, seed=3, n_stars=10, no_data=[(40, 50, 60, 70)])
    exp = sim.exposure.copy()
    exp.masked_image.mask[90, 30] |= exp.mask_planes.bitmask("EDGE")
    exp = exp.to_backend(backend)
    out = warp_exposure(exp, shifted_wcs(exp.wcs, 0.4, 0.4), exp.bbox)
    msk = backend.asnumpy(out.mask)
    mp = out.mask_planes
    nod = (msk & mp.bitmask("NO_DATA")) != 0
    # the hole grows by the kernel footprint: taps floor(u) − 2 … floor(u) + 3
    assert nod[50 - 3 : 70 - 2, 40 - 3 : 60 - 2].all()
    assert not nod[30, 30] and np.isnan(backend.asnumpy(out.image)[nod]).all()
    # EDGE is grown over the full 6×6 footprint, other bits over the bilinear 2×2 only
    edge = (msk & mp.bitmask("EDGE")) != 0
    assert edge[87:91, 27:31].all() and edge.sum() == 36
    # pixels outside the source image: NO_DATA only
    far = warp_exposure(exp, shifted_wcs(exp.wcs, 60.0, 0.0), exp.bbox)
    fm = backend.asnumpy(far.mask)
    assert (fm[:, 70:] == mp.bitmask("NO_DATA")).all()


def test_overlap_and_equality(stars):
    exp = stars.exposure
    w, box = exp.wcs, exp.bbox
    assert wcs_equal(w, box, w, box)
    assert wcs_equal(w, box, copy.deepcopy(w), box)
    assert not wcs_equal(w, box, shifted_wcs(w, 0.01, 0.0), box)
    assert wcs_equal(w, box, shifted_wcs(w, 1e-5, 0.0), box)
    assert not wcs_equal(w, box, w, Box(0, 0, 100, 100))
    assert wcs_overlap(w, box, shifted_wcs(w, 100.0, 50.0), box) == Box(100, 50, 256, 256)
    assert wcs_overlap(w, box, w, box) == box
    far = shifted_wcs(w, 1000.0, 0.0)
    assert wcs_overlap(w, box, far, box) is None
    with pytest.raises(NoOverlapError, match="template.*science|science.*template"):
        check_overlap(w, box, far, box, name_a="science", name_b="template")
    with pytest.raises(NoOverlapError, match="calexp.*warp target|warp target.*calexp"):
        warp_exposure(exp, far, box, name="calexp", dest_name="warp target")
    with pytest.raises(InvalidInputError):
        warp_exposure(Exposure(exp.masked_image), w, box)
    xs, ys, u, v = pixel_mapping(w, shifted_wcs(w, 2.0, 3.0), Box(0, 0, 25, 21), interp_length=10)
    np.testing.assert_array_equal(xs, [0, 10, 20, 24])
    np.testing.assert_array_equal(ys, [0, 10, 20])
    np.testing.assert_allclose(u, np.broadcast_to(xs[None, :] + 2.0, u.shape), atol=1e-8)
    np.testing.assert_allclose(v, np.broadcast_to(ys[:, None] + 3.0, v.shape), atol=1e-8)


def test_interp_length_is_accurate(stars):
    exp = stars.exposure
    dest = rotated_wcs(exp.wcs, np.deg2rad(20.0), 0.3, 0.2)
    a = warp_exposure(exp, dest, exp.bbox, interp_length=10)
    b = warp_exposure(exp, dest, exp.bbox, interp_length=0)  # exact mapping everywhere
    ok = np.isfinite(a.image) & np.isfinite(b.image)
    assert np.abs(a.image[ok] - b.image[ok]).max() < 1e-4 * exp.image.max()


def _scaled_wcs(wcs, scale, dx, dy):
    """Axis-aligned affine: pixel scale × ``scale`` about CRPIX, then a shift."""
    w = shifted_wcs(wcs, dx, dy)
    w.wcs.cd = np.asarray(wcs.wcs.cd) * scale
    return w


def test_separable_path_matches_general_path_on_affine(backend, stars, monkeypatch):
    import gpudiff.ops.warp as W

    exp = stars.exposure.copy()
    exp.masked_image.mask[100, 50] |= exp.mask_planes.bitmask("EDGE")
    exp.masked_image.image[200, 180] = np.nan  # a bad pixel: NO_DATA grows the same way
    exp = exp.to_backend(backend)
    dest = _scaled_wcs(exp.wcs, 1.004, 0.37, -0.61)  # shift + 0.4 % scale: axis-aligned
    calls = []
    real = W._warp_separable
    monkeypatch.setattr(W, "_warp_separable", lambda *a, **k: calls.append(1) or real(*a, **k))
    sep = warp_exposure(exp, dest, exp.bbox)
    assert calls, "an axis-aligned affine map must take the separable path"
    monkeypatch.setattr(W, "_SEPARABLE_TOL", -1.0)  # forces the general (36-gather) path
    gen = warp_exposure(exp, dest, exp.bbox)
    assert len(calls) == 1
    si, gi = backend.asnumpy(sep.image), backend.asnumpy(gen.image)
    np.testing.assert_array_equal(np.isfinite(si), np.isfinite(gi))
    np.testing.assert_array_equal(backend.asnumpy(sep.mask), backend.asnumpy(gen.mask))
    ok = np.isfinite(gi)
    assert (~ok).sum() > 0 and ok.sum() > 0.8 * ok.size
    # Same taps, weights and summation order; the per-pixel source position differs by at
    # most 1e-7 px (per-column/per-row versus per-pixel interpolation of the nodes), which
    # moves a weight by ≲ 1e-7: float32 round-off of the 36-term sums, ~1e-6 of the peak.
    scale = np.abs(gi[ok]).max()
    assert np.abs(si[ok] - gi[ok]).max() <= 2e-6 * scale
    sv, gv = backend.asnumpy(sep.variance)[ok], backend.asnumpy(gen.variance)[ok]
    np.testing.assert_allclose(sv, gv, rtol=2e-6, atol=2e-6 * float(np.abs(gv).max()))


@pytest.mark.parametrize(
    "dx, dy, skipped",
    [
        (0.0007, 0.0007, True),  # |offset| = 0.99e-3 px: the grids agree
        (3.0007, -2.0007, True),  # whole pixels plus the same: still a copy
        (0.0008, 0.0008, False),  # |offset| = 1.13e-3 px: resampled
        (0.0011, 0.0, False),
    ],
)
def test_warp_skipped_exactly_when_grids_agree_to_1e3_px(stars, caplog, dx, dy, skipped):
    exp = stars.exposure
    with caplog.at_level("INFO", logger="gpudiff.ops.warp"):
        out = warp_exposure(exp, shifted_wcs(exp.wcs, dx, dy), exp.bbox)
    logged = any("skipped" in r.getMessage() for r in caplog.records)
    assert logged == skipped
    ox, oy = int(round(dx)), int(round(dy))
    # out[r, c] = src[r + oy, c + ox] away from the border
    copy_ = exp.image[8 + oy : 248 + oy, 8 + ox : 248 + ox]
    got = out.image[8:248, 8:248]
    if skipped:
        np.testing.assert_array_equal(got, copy_)
        np.testing.assert_array_equal(
            out.variance[8:248, 8:248], exp.variance[8 + oy : 248 + oy, 8 + ox : 248 + ox]
        )
    else:
        # interpolated: a 1e-3 px shift of σ = 2 px stars moves pixel values by ~1e-4 of the peak
        d = np.abs(got - copy_).max()
        assert 1e-5 * exp.image.max() < d < 2e-3 * exp.image.max()


def test_subpixel_shift_conserves_star_flux_and_moves_centroid(backend):
    from gpudiff.sim import simulate_exposure as sim_exp

    one = sim_exp(
        64, seed=5, n_stars=1, psf=2.0 * 2.3548, noise="none", sky=0.0, read_noise=0.0, margin=-20
    )
    exp = one.exposure.to_backend(backend)
    x0, y0 = float(one.truth["x"][0]), float(one.truth["y"][0])
    dx, dy = 0.37, -0.61
    out = warp_exposure(exp, shifted_wcs(exp.wcs, dx, dy), exp.bbox)
    img = backend.asnumpy(out.image)
    src = one.exposure.image
    ix, iy = int(round(x0 - dx)), int(round(y0 - dy))
    st = img[iy - 12 : iy + 13, ix - 12 : ix + 13]
    assert np.isfinite(st).all()
    jx, jy = int(round(x0)), int(round(y0))
    f_in = src[jy - 12 : jy + 13, jx - 12 : jx + 13].sum()
    # normalized Lanczos-3 weights sum to 1 per pixel; on a well-sampled star the stamp's
    # flux is kept to ~1e-6 (measured 3e-7); 1e-4 leaves room for the truncated wings.
    assert st.sum() / f_in == pytest.approx(1.0, abs=1e-4)
    yy, xx = np.mgrid[-12:13, -12:13]
    cx, cy = (st * xx).sum() / st.sum() + ix, (st * yy).sum() / st.sum() + iy
    sx = src[int(round(y0)) - 12 : int(round(y0)) + 13, int(round(x0)) - 12 : int(round(x0)) + 13]
    # destination pixel (c, r) sees the source at (c + dx, r + dy): the star moves by −(dx, dy)
    sxc = (sx * xx).sum() / sx.sum() + int(round(x0))
    syc = (sx * yy).sum() / sx.sum() + int(round(y0))
    # Lanczos-3's sampled first moment Σ (n + f) L(n + f) is not 0 at fractional f, so the
    # centroid moves by the shift up to ~0.01 px (measured 0.013 / 0.012 px here; afw's
    # Lanczos warping shares it); a wrong tap order or sign would be off by ≥ 0.2 px.
    assert cx == pytest.approx(sxc - dx, abs=0.02) and cy == pytest.approx(syc - dy, abs=0.02)
