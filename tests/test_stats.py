"""ops.stats: afw MEANCLIP/STDEVCLIP of samples and masked images, robust sigma, stamp moments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpudiff.errors import AllMaskedError, InvalidInputError, ShapeMismatchError
from gpudiff.image import GaussianPsf, MaskedImage, MaskPlanes, adaptive_moments
from gpudiff.ops.stats import (
    adaptive_moments_batch,
    clipped_mean_std,
    gather_stamps,
    image_statistics,
    robust_sigma,
    weighted_centroid,
)


def afw_meanclip(x, nsigma=3.0, niter=3):
    """docs/algorithms.md §0.5 literally: pass 0 median ± nσ·0.7413·IQR, later passes re-clip
    the full sample around the clipped mean with the clipped (ddof=1) stdev."""
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    centre, width = med, nsigma * 0.741301109252802 * (q3 - q1)
    for _ in range(niter):
        kept = x[np.abs(x - centre) <= width]
        centre, sd = kept.mean(), kept.std(ddof=1)
        width = nsigma * sd
    return centre, sd, kept.size


def test_clipped_mean_std_matches_afw_definition(backend, rng):
    x = rng.normal(10.0, 2.0, 5000)
    x[:200] += rng.uniform(20, 200, 200)  # outliers (cosmic rays, stars)
    x[200:210] = np.nan
    m, s, n = clipped_mean_std(x, backend=backend)
    rm, rs, rn = afw_meanclip(x)
    assert m == pytest.approx(rm, rel=1e-5)
    assert s == pytest.approx(rs, rel=1e-4)
    assert n == rn
    assert m == pytest.approx(10.0, abs=0.1) and s == pytest.approx(2.0, rel=0.05)


def test_clipped_mean_std_bad_mask_and_shapes(backend, rng):
    x = rng.normal(0.0, 1.0, (40, 50))
    bad = np.zeros(x.shape, bool)
    bad[:5] = True
    x[:5] = 1e6  # excluded by the and-mask, not by clipping
    m, s, n = clipped_mean_std(x, bad=bad, nsigma=5.0, niter=1, backend=backend)
    rm, rs, rn = afw_meanclip(x[5:], nsigma=5.0, niter=1)
    assert (m, n) == (pytest.approx(rm, rel=1e-5, abs=1e-6), rn)
    assert s == pytest.approx(rs, rel=1e-4)
    with pytest.raises(ShapeMismatchError):
        clipped_mean_std(x, bad=bad[:3], backend=backend)
    with pytest.raises(InvalidInputError):
        clipped_mean_std([], backend=backend)
    # all NaN: NaN results, no exception
    m, s, n = clipped_mean_std(np.full(10, np.nan), backend=backend)
    assert math.isnan(m) and math.isnan(s) and n == 0


def test_robust_sigma(backend, rng):
    x = rng.normal(5.0, 3.0, 20000)
    assert robust_sigma(x, backend=backend) == pytest.approx(3.0, rel=0.03)
    y = x.copy()
    y[:2000] = 1e5  # 10 % outliers barely move the MAD
    assert robust_sigma(y, backend=backend) == pytest.approx(3.0, rel=0.2)
    assert robust_sigma(y, bad=np.arange(y.size) < 2000, backend=backend) == pytest.approx(
        robust_sigma(x[2000:], backend=backend), rel=1e-6
    )
    assert math.isnan(robust_sigma([np.nan, np.inf], backend=backend))


def test_image_statistics_masked_image(backend, rng):
    img = rng.normal(100.0, 5.0, (128, 128)).astype(np.float32)
    mp = MaskPlanes()
    mask = np.zeros(img.shape, np.int32)
    img[10:30, 10:30] += 1000.0  # a bright blob, flagged DETECTED
    mask[10:30, 10:30] = mp.bitmask("DETECTED")
    img[50, :] = np.nan
    var = np.full(img.shape, 25.0, np.float32)
    mi = MaskedImage(img, var, mask, mask_planes=mp, backend=backend)
    st = image_statistics(mi, median=True)  # the median is opt-in: no pipeline caller uses it
    assert "median" not in image_statistics(mi)
    usable = (mask == 0) & np.isfinite(img)
    assert st["n"] == int(usable.sum())
    rm, rs, rn = afw_meanclip(img[usable])
    assert st["mean"] == pytest.approx(rm, rel=1e-5)
    assert st["std"] == pytest.approx(rs, rel=1e-4)
    assert st["n_used"] == rn
    assert st["median"] == pytest.approx(np.median(img[usable]), rel=1e-6)
    assert st["variance"] == pytest.approx(rs**2, rel=2e-4)
    # without the and-mask the blob drags the median up
    st_all = image_statistics(mi, bad_planes=(), median=True)
    assert st_all["n"] == int(np.isfinite(img).sum())
    assert st_all["median"] > st["median"]
    # variance-plane statistics (ScaleVariance)
    assert image_statistics(mi, use_variance=True)["mean"] == pytest.approx(25.0)


def test_image_statistics_array_with_mask(backend, rng):
    img = rng.normal(0.0, 1.0, (64, 64))
    mp = MaskPlanes({"FOO": 3, "BAD": 0})
    mask = np.zeros(img.shape, np.int64)
    mask[:32] = 1 << 3
    img[:32] = 50.0
    st = image_statistics(
        img, mask=mask, mask_planes=mp, bad_planes=("FOO", "NOT_A_PLANE"), backend=backend
    )
    assert st["n"] == 32 * 64
    assert abs(st["mean"]) < 0.1
    with pytest.raises(AllMaskedError):
        image_statistics(np.full((4, 4), np.nan), backend=backend)
    with pytest.raises(ShapeMismatchError):
        image_statistics(img, mask=mask[:3], backend=backend)
    mi = MaskedImage(img, backend=backend)
    with pytest.raises(InvalidInputError):
        image_statistics(mi, mask=mask)


def test_gather_stamps_edges(backend):
    img = np.arange(30, dtype=np.float32).reshape(5, 6)
    st, inside = gather_stamps(
        backend, backend.asarray(img), np.array([0, 2]), np.array([0, 5]), 1, fill=-1
    )
    st, inside = backend.asnumpy(st), backend.asnumpy(inside)
    assert st.shape == (2, 3, 3)
    np.testing.assert_array_equal(st[0], [[-1, -1, -1], [-1, 0, 1], [-1, 6, 7]])
    np.testing.assert_array_equal(st[1], [[10, 11, -1], [16, 17, -1], [22, 23, -1]])
    assert inside.sum() == 4 + 6


def test_weighted_centroid_and_adaptive_moments(backend):
    offsets = [(0.0, 0.0), (0.3, -0.2), (-0.45, 0.41)]
    psf = GaussianPsf(sigma=2.0, sigma_y=1.4, theta=0.5, size=25, oversample=5)
    stamps = np.array([psf.compute_image(100 + dx, 200 + dy) for dx, dy in offsets]) * 1e4
    d = backend.asarray(stamps)
    x, y, ok = weighted_centroid(
        backend, d, backend.asarray(np.zeros(3)), backend.asarray(np.zeros(3)), 1.7
    )
    np.testing.assert_allclose(backend.asnumpy(x), [o[0] for o in offsets], atol=2e-3)
    np.testing.assert_allclose(backend.asnumpy(y), [o[1] for o in offsets], atol=2e-3)
    assert backend.asnumpy(ok).all()
    valid = backend.asarray(np.ones(stamps.shape, bool))
    out = [backend.asnumpy(a) for a in adaptive_moments_batch(backend, d, valid, 4.0)]
    for k, st in enumerate(stamps):
        xc, yc, ixx, iyy, ixy = adaptive_moments(st)
        assert out[0][k] == pytest.approx(xc - 12, abs=1e-4)
        assert out[1][k] == pytest.approx(yc - 12, abs=1e-4)
        np.testing.assert_allclose(
            [out[2][k], out[3][k], out[4][k]], [ixx, iyy, ixy], rtol=1e-4, atol=1e-5
        )
    assert out[5].all()
    # an empty (all-zero) stamp fails instead of returning garbage
    z = backend.asarray(np.zeros((1, 9, 9)))
    assert not backend.asnumpy(adaptive_moments_batch(backend, z, z == 0, 2.0)[5])[0]
    assert not backend.asnumpy(weighted_centroid(backend, z, z[:, 0, 0], z[:, 0, 0], 1.0)[2])[0]


@pytest.mark.parametrize("n", [-5, 1, 2, 3, 7, 100, 4097, 200_000])  # -5: 5, all excluded
def test_sort_free_clip_matches_the_stack_twin(rng, n):
    """The 1-D clip (selection, never a sort) against ``clipped_stack``'s NumPy twin on the
    same sample as a stack of depth n over one pixel; both selection paths (the CPU's
    partition and the device's radix select, run here on NumPy)."""
    from gpudiff.backend import get_backend
    from gpudiff.backend.reference import clipped_stack
    from gpudiff.ops.stats import _clip_sample, _radix_select

    be = get_backend("numpy")
    all_bad, n = n < 0, abs(n)
    x = rng.normal(10.0, 2.0, n).astype(np.float32)
    if n > 10:  # outliers on both sides, ties, ±0, a NaN and an excluded block
        x[: n // 20] = 1e4
        x[n // 20 : n // 10] = -3e3
        x[n // 10 : n // 10 + 5] = 10.0
        x[n // 10 + 5] = -0.0
        x[n // 10 + 6] = 0.0
        x[-1] = np.nan
    bad = np.zeros(n, bool)
    bad[n // 3 : n // 3 + n // 50] = True
    bad |= all_bad
    excl = bad | ~np.isfinite(x)
    ref = clipped_stack(x[:, None], bad[:, None], None, 3.0, 3)
    ref_m, ref_v, ref_n = (float(a[0]) for a in ref)
    for select in (None, lambda be_, v, valid, nn, ranks: _radix_select(be_.xp, v, valid, ranks)):
        m, v, nu, nv = _clip_sample(be, x, excl, 3.0, 3, _select=select)
        assert nv == int((~excl).sum()) and nu == int(ref_n)
        # same survivors, same float64 sums up to their order (pairwise vs sequential):
        # the float32 results agree to an ulp or two
        for got, ref in ((m, ref_m), (v, ref_v)):
            if math.isnan(ref):
                assert math.isnan(got)
            else:
                assert got == pytest.approx(ref, rel=3e-7, abs=1e-30)


def test_radix_select_is_exact_order_statistics(rng):
    from gpudiff.ops.stats import _radix_select

    v = np.concatenate(
        [
            rng.normal(0, 1, 5000),
            rng.uniform(-1e30, 1e30, 100),
            [0.0, -0.0, 1e-40, -1e-40],
            np.full(50, 3.25),
        ]
    ).astype(np.float32)
    valid = rng.uniform(size=v.size) > 0.1
    good = np.sort(v[valid])
    ranks = np.array([0, 1, good.size // 4, good.size // 2, good.size - 1], np.int64)
    got = _radix_select(np, v, valid, ranks)
    np.testing.assert_array_equal(got, good[ranks].astype(np.float64))


def test_psf_moments_measured_once_per_rounded_position(monkeypatch):
    """Spatially varying PSF moments are cached per PSF instance (issue 16: the moment
    lattice of a GridPsf was re-fitted on every detection pass)."""
    import gpudiff.image.psf as P
    from gpudiff.image import GaussianPsf, GridPsf, adaptive_moments

    imgs = np.array(
        [
            [GaussianPsf(sigma=s, size=21).kernel_image() for s in (1.5, 2.5)],
            [GaussianPsf(sigma=s, size=21).kernel_image() for s in (2.0, 3.0)],
        ]
    )
    psf = GridPsf(imgs, [0.0, 1000.0], [0.0, 1000.0])
    calls = []
    real = P.adaptive_moments
    monkeypatch.setattr(P, "adaptive_moments", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = psf.moments(300.4, 700.6)
    assert psf.moments(299.6, 701.2) == a and len(calls) == 1  # same rounded pixel: cached
    # exactly what a fresh measurement gives (the kernel depends on the rounded position only)
    assert a == pytest.approx(tuple(adaptive_moments(psf.kernel_image(300, 701))[2:]), rel=0, abs=0)
    b = psf.moments(800.0, 200.0)
    assert len(calls) == 2 and b[0] > a[0] * 1.05  # a varying PSF: another node, another value
    other = GridPsf(imgs, [0.0, 1000.0], [0.0, 1000.0])
    other.moments(300.4, 700.6)
    assert len(calls) == 3  # per instance, never shared between PSFs


# ----------------------------------------------------------------------------------------
# batched stamp moments against a straightforward per-source loop
# ----------------------------------------------------------------------------------------


def _ref_adaptive(stamp, valid, w_init, max_iter=60, tol=1e-6):
    """One source at a time, the fixed point W ← 2·Q written out with central moments; a
    source stops at its first failure (Σw·I ≤ 0 or centroid beyond 2 px) keeping its last
    state, or when its moments move by < tol·(wxx + wyy)."""
    s = stamp.shape[0]
    c = np.arange(s) - s // 2
    X, Y = np.meshgrid(c, c)
    img = np.where(valid, stamp, 0).astype(np.float64)
    xc = yc = wxy = 0.0
    wxx = wyy = float(w_init)
    ok, change = True, np.inf
    for _ in range(max_iter):
        det = wxx * wyy - wxy * wxy
        dx, dy = X - xc, Y - yc
        wd = np.exp(-0.5 * (wyy * dx * dx - 2 * wxy * dx * dy + wxx * dy * dy) / det) * img
        s0 = wd.sum()
        if not s0 > 0:
            ok = False
            break
        nx, ny = (wd * X).sum() / s0, (wd * Y).sum() / s0
        if abs(nx) > 2 or abs(ny) > 2:
            ok = False
            break
        dx, dy = X - nx, Y - ny
        nxx = np.clip(2 * (wd * dx * dx).sum() / s0, 0.04, s * s)
        nyy = np.clip(2 * (wd * dy * dy).sum() / s0, 0.04, s * s)
        lim = 0.99 * math.sqrt(nxx * nyy)
        nxy = np.clip(2 * (wd * dx * dy).sum() / s0, -lim, lim)
        change = abs(nxx - wxx) + abs(nyy - wyy) + abs(nxy - wxy)
        xc, yc, wxx, wyy, wxy = nx, ny, nxx, nyy, nxy
        if change < tol * (wxx + wyy):
            break
    return xc, yc, wxx, wyy, wxy, ok and change < tol * (wxx + wyy) * 10


def _ref_centroid(stamp, x, y, sigma, niter=20, max_shift=2.0):
    s = stamp.shape[0]
    c = np.arange(s) - s // 2
    X, Y = np.meshgrid(c, c)
    ok, step = True, 0.0
    for _ in range(niter):
        w = np.exp(-((X - x) ** 2 + (Y - y) ** 2) / (2 * sigma * sigma)) * stamp
        s0 = w.sum()
        if not s0 > 0:
            return x, y, False
        nx, ny = (w * X).sum() / s0, (w * Y).sum() / s0
        if abs(nx) > max_shift or abs(ny) > max_shift:
            return x, y, False
        step = abs(nx - x) + abs(ny - y)
        x, y = nx, ny
    return x, y, ok and step < 1e-3


def _stamp_zoo(rng, n=60, s=19):
    """Elliptical Gaussians of random size, orientation, offset and S/N (0 to 1000 in
    peak units of the unit noise), plus the failure cases: an empty stamp, a negative
    source, a source 4 px off centre; ~8 % of pixels and one 4×4 block masked."""
    c = np.arange(s) - s // 2
    X, Y = np.meshgrid(c, c)
    st = np.empty((n, s, s), np.float32)
    for i in range(n):
        sx, sy, th = rng.uniform(0.9, 3.0), rng.uniform(0.9, 3.0), rng.uniform(0, np.pi)
        x0, y0 = rng.uniform(-1.2, 1.2, 2)
        u = (X - x0) * np.cos(th) + (Y - y0) * np.sin(th)
        v = -(X - x0) * np.sin(th) + (Y - y0) * np.cos(th)
        amp = [0.0, 2.0, 10.0, 100.0, 1000.0][i % 5]
        st[i] = amp * np.exp(-0.5 * (u * u / sx**2 + v * v / sy**2)) + rng.normal(0, 1, (s, s))
    st[0] = 0.0  # empty: Σw·I = 0
    st[1] = -100.0 * np.exp(-0.5 * (X**2 + Y**2) / 4)  # negative: Σw·I < 0
    st[2] = 100.0 * np.exp(-0.5 * ((X - 4) ** 2 + Y**2) / 2)  # centroid beyond 2 px
    valid = rng.random(st.shape) > 0.08
    valid[3:9, 2:6, 2:6] = False
    return st, valid


# (60, 1e-6): the defaults; (6, 1e-3): a budget too short for ~2/3 of the stamps, so
# rows stop unconverged with the others frozen mid-batch
@pytest.mark.parametrize("max_iter,tol", [(60, 1e-6), (6, 1e-3)])
def test_adaptive_moments_batch_matches_per_source_loop(backend, rng, max_iter, tol):
    st, valid = _stamp_zoo(rng)
    ref = np.array([_ref_adaptive(a, v, 3.0, max_iter, tol) for a, v in zip(st, valid)])
    ref_ok = ref[:, 5].astype(bool)
    # the zoo exercises every outcome: converged, failed, unconverged
    assert ref_ok.sum() >= 10 and (~ref_ok).sum() >= 3
    d, vd = backend.asarray(st), backend.asarray(valid)
    for k in (None, 1, 3, 100):
        got = adaptive_moments_batch(backend, d, vd, 3.0, max_iter=max_iter, tol=tol, check_every=k)
        out = [backend.asnumpy(a) for a in got]
        np.testing.assert_array_equal(out[5], ref_ok)
        # Same arithmetic up to rounding: the batch takes central moments as raw moments
        # minus x̄² (float64, relative cancellation ≤ s²·1e-16 ≈ 4e-14); 1e-9 px² leaves
        # room for that and for nothing else (a wrong step or freeze moves them ≥ 1e-6).
        for j in range(5):
            np.testing.assert_allclose(out[j], ref[:, j], rtol=1e-9, atol=1e-9)
    with pytest.raises(InvalidInputError):
        adaptive_moments_batch(backend, d, vd, 3.0, check_every=-1)


def test_weighted_centroid_matches_per_source_loop(backend, rng):
    st, valid = _stamp_zoo(rng)
    st = np.where(valid, st, 0).astype(np.float32)
    x0, y0 = rng.uniform(-0.5, 0.5, len(st)), rng.uniform(-0.5, 0.5, len(st))
    ref = np.array([_ref_centroid(a.astype(np.float64), x, y, 1.6) for a, x, y in zip(st, x0, y0)])
    ref_ok = ref[:, 2].astype(bool)
    assert ref_ok.sum() >= 10 and (~ref_ok).sum() >= 3
    got = weighted_centroid(
        backend, backend.asarray(st), backend.asarray(x0), backend.asarray(y0), 1.6
    )
    x, y, ok = (backend.asnumpy(a) for a in got)
    np.testing.assert_array_equal(ok, ref_ok)
    # separable weights and matrix products: the same sums in another order (≤ 1e-12 px)
    np.testing.assert_allclose(x[ok], ref[ok, 0], atol=1e-9)
    np.testing.assert_allclose(y[ok], ref[ok, 1], atol=1e-9)


def test_batched_radix_quantiles_match_percentile(rng):
    """The device path of ``_quantiles`` (several samples in one radix select over float32
    keys, one shared mask), run on NumPy, against np.percentile of the kept values."""
    from gpudiff.backend import get_backend
    from gpudiff.ops.stats import _quantiles, _radix_select_rows

    be = get_backend("numpy")
    n = 20_000
    a = rng.normal(0, 1, n).astype(np.float32)
    b = (rng.standard_cauchy(n) * 1e3).astype(np.float32)  # wide range, both signs
    c = rng.integers(-3, 4, n).astype(np.float32)  # heavy ties
    keep = rng.random(n) > 0.3
    fr = [(0.25, 0.75), (0.0, 0.5, 1.0), (0.1, 0.5)]
    rows = np.repeat(np.arange(3), [2, 3, 2])
    m = int(keep.sum())
    for samples in ([a, b, c], [a.astype(np.float64), b.astype(np.float64), c.astype(np.float64)]):
        want = np.concatenate(
            [
                np.percentile(s[keep].astype(np.float64), 100 * np.asarray(f))
                for s, f in zip(samples, fr)
            ]
        )
        got = _quantiles(be, samples, keep, fr)  # CPU: partition
        np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)
        # device path: exact order statistics of the float32 values
        ranks = np.concatenate([np.floor(np.concatenate(fr) * (m - 1)).astype(np.int64)])
        V = np.stack([np.asarray(s, np.float32) for s in samples])
        sel = _radix_select_rows(np, V, keep, rows, ranks)
        exact = [np.sort(np.asarray(samples[r], np.float32)[keep])[k] for r, k in zip(rows, ranks)]
        np.testing.assert_array_equal(sel, exact)
    assert np.isnan(_quantiles(be, [a], np.zeros(n, bool), [(0.5,)])).all()


def test_compacted_host_quantiles_equal_masked(rng):
    """``_quantiles`` of host samples already compacted (``valid`` None, selected in place)
    gives the bits of the masked whole-array call, empty samples NaN as there."""
    from gpudiff.backend import get_backend
    from gpudiff.errors import InvalidInputError
    from gpudiff.ops.stats import _quantiles

    be = get_backend("numpy")
    n = 20_000
    a = rng.normal(0, 1, n)
    b = rng.integers(-3, 4, n).astype(np.float64)  # heavy ties
    keep = rng.random(n) > 0.3
    fr = [(0.25, 0.75), (0.0, 0.5, 1.0)]
    want = _quantiles(be, [a, b], keep, fr)
    got = _quantiles(be, [a[keep], b[keep]], None, fr)
    np.testing.assert_array_equal(got, want)
    assert np.isnan(_quantiles(be, [a[:0]], None, [(0.5,)])).all()
    with pytest.raises(InvalidInputError):
        _quantiles(be, [a[keep], b], None, fr)


def test_host_gather_stamps_many_equals_the_flat_index_gather():
    """The CPU path (sliding-window rows for stamps inside, the flat index at the edges)
    gives the values, dtypes and ``inside`` of the flat-index gather everywhere."""
    from gpudiff.backend import get_backend
    from gpudiff.ops.stats import _stamp_index, gather_stamps_many

    be = get_backend("numpy")
    rng = np.random.default_rng(1)
    for H, W, half in ((64, 80, 3), (30, 25, 10), (15, 40, 10), (7, 7, 5), (200, 150, 12)):
        ims = [
            rng.normal(size=(H, W)).astype(np.float32),
            rng.random((H, W)) > 0.5,
            rng.integers(0, 99, (H, W)).astype(np.int32),
            np.asfortranarray(rng.normal(size=(H, W))),
        ]
        fills = [np.nan, True, 7, -1.0]
        rows, cols = rng.integers(-5, H + 5, 300), rng.integers(-5, W + 5, 300)
        got, inside = gather_stamps_many(be, ims, rows, cols, half, fills)
        flat, ref_inside = _stamp_index(be, rows, cols, half, (H, W))
        assert np.array_equal(inside, ref_inside)
        for g, im, f in zip(got, ims, fills):
            ref = np.where(ref_inside, im.reshape(-1)[flat], np.asarray(f, dtype=im.dtype))
            assert g.dtype == ref.dtype and g.shape == ref.shape
            assert np.array_equal(g, ref, equal_nan=g.dtype.kind == "f")
