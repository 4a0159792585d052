"""The kernel registry, the NumPy twins, the CUDA sources and (on a GPU) CuPy parity.

Layers of evidence for ``clipped_stack``:

1. the vectorized NumPy twin against an independent per-pixel transcription of afw's
   ``Statistics::doStatistics`` clipping loop (pure Python floats);
2. known cases (a 50-sigma outlier, weights, all-masked and single-sample pixels);
3. every ``cuda/*.cu`` compiled standalone with ``nvcc -arch=sm_90 -cubin`` (when nvcc is
   installed), and the very same per-pixel CUDA code compiled for the *host* and run
   against the twin (so the kernel logic is checked without a GPU);
4. ``@pytest.mark.gpu``: CuPy launchers against the twins on a device.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpudiff.backend import get_backend
from gpudiff.backend import kernels as K
from gpudiff.backend import reference as R
from gpudiff.backend.nvcc import compile_all_with_nvcc
from gpudiff.backend.nvcc import main as nvcc_main
from gpudiff.errors import InvalidInputError, KernelRegistryError, ShapeMismatchError

REPO = Path(__file__).resolve().parents[1]
IQ = 0.741301109252802
NAN = float("nan")


# ----------------------------------------------------------------------------------------
# independent brute-force oracle: afw Statistics.cc, one pixel at a time
# ----------------------------------------------------------------------------------------


def _afw_percentile(sorted_vals, frac):
    n = len(sorted_vals)
    if n > 1:
        idx = frac * (n - 1)
        q1 = int(idx)
        q2 = q1 + 1
        return (q2 - idx) * float(sorted_vals[q1]) + (idx - q1) * float(sorted_vals[q2])
    if n == 1:
        return float(sorted_vals[0])
    return NAN


def afw_meanclip_pixel(values, bad, weights, nsigma, niter):
    """(meanclip, varianceclip, n_clip, survivors) for one pixel, transcribed from afw.

    ``weights`` None = unweighted.  Deviation from afw (documented in the twin): the
    variance is NaN when sum(w)^2 <= sum(w^2) (a single weighted survivor) instead of
    afw's 0*inf.
    """
    samples = [
        (k, float(v), 1.0 if weights is None else float(weights[k]))
        for k, (v, b) in enumerate(zip(values, bad))
        if not b and math.isfinite(float(v))
    ]
    n = len(samples)
    if n == 0:
        return NAN, NAN, 0, []
    srt = sorted(v for _, v, _ in samples)
    median = _afw_percentile(srt, 0.50)
    iqrange = _afw_percentile(srt, 0.75) - _afw_percentile(srt, 0.25)
    meanclip = varclip = NAN
    survivors: list[int] = []
    for i in range(niter):
        center = meanclip if i > 0 else median
        if i > 0 and n > 1:
            hwidth = nsigma * math.sqrt(varclip) if varclip >= 0 else NAN
        else:
            hwidth = nsigma * IQ * iqrange
        sumw = sumw2 = sumx = sumx2 = 0.0
        survivors = []
        for k, v, w in samples:
            delta = v - center
            if abs(delta) <= hwidth:
                sumw += w
                sumw2 += w * w
                sumx += w * delta
                sumx2 += w * delta * delta
                survivors.append(k)
        if sumw > 0:
            mean = sumx / sumw
            denom = sumw * sumw - sumw2
            varclip = (sumx2 / sumw - mean**2) * (sumw * sumw / denom) if denom > 0 else NAN
            meanclip = mean + center
        else:
            meanclip = varclip = NAN
    return meanclip, varclip, len(survivors), survivors


def brute_force(data, bad, weights=None, nsigma=3.0, niter=3):
    nep = data.shape[0]
    shp = data.shape[1:]
    d2 = data.reshape(nep, -1)
    b2 = bad.reshape(nep, -1)
    m = np.empty(d2.shape[1])
    v = np.empty(d2.shape[1])
    n = np.empty(d2.shape[1], dtype=np.int64)
    used = np.zeros(d2.shape, dtype=bool)
    for p in range(d2.shape[1]):
        m[p], v[p], n[p], surv = afw_meanclip_pixel(d2[:, p], b2[:, p], weights, nsigma, niter)
        used[surv, p] = True
    return m.reshape(shp), v.reshape(shp), n.reshape(shp), used.reshape(data.shape)


def make_stack(
    rng, nep=12, shape=(6, 7), outlier_frac=0.08, bad_frac=0.1, nonfinite=True, ties=False
):
    data = rng.normal(100.0, 5.0, size=(nep,) + shape)
    if ties:
        data = np.round(data / 5.0) * 5.0
    out = rng.random(data.shape) < outlier_frac
    data[out] += (
        rng.choice([-1.0, 1.0], size=out.sum()) * rng.uniform(20, 200, size=out.sum()) * 5.0
    )
    bad = rng.random(data.shape) < bad_frac
    if nonfinite:
        nf = rng.random(data.shape) < 0.03
        data[nf] = rng.choice([np.nan, np.inf, -np.inf], size=nf.sum())
    data = data.astype(np.float32)
    # special pixels: 0 all masked, 1 one valid, 2 two valid, 3 all equal
    flat_bad = bad.reshape(nep, -1)
    flat_data = data.reshape(nep, -1)
    k1, ks = min(3, nep - 1), sorted({0, nep - 1})
    flat_bad[:, :3] = True
    flat_bad[k1, 1] = False
    flat_bad[ks, 2] = False
    flat_data[:, :3] = np.float32(42.5)
    flat_data[ks[-1], 2] = np.float32(44.0)
    flat_data[:, 3] = np.float32(7.25)
    return data, bad


def assert_same(actual, expected, rtol=1e-6):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------------------
# 1. NumPy twin against the brute-force oracle
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("nsigma,niter", [(3.0, 3), (2.5, 3), (3.0, 2), (3.0, 1), (1.5, 5)])
def test_twin_matches_bruteforce(seed, weighted, nsigma, niter):
    rng = np.random.default_rng(1000 + seed)
    data, bad = make_stack(rng, nep=5 + 3 * seed, ties=(seed == 3))
    weights = rng.uniform(0.2, 3.0, size=data.shape[0]).astype(np.float32) if weighted else None
    if weighted and seed == 2:
        weights[1] = 0.0  # zero weights are legal
    mean, var, n, used = R.clipped_stack(data, bad, weights, nsigma, niter, return_used=True)
    bm, bv, bn, bused = brute_force(data, bad, weights, nsigma, niter)
    np.testing.assert_array_equal(n, bn)
    np.testing.assert_array_equal(used, bused)
    assert_same(mean, bm)
    assert_same(var, bv)
    assert mean.dtype == np.float32 and var.dtype == np.float32 and n.dtype == np.int32


def test_twin_default_call_returns_three_arrays(rng):
    data, bad = make_stack(rng)
    out = R.clipped_stack(data, bad)
    assert len(out) == 3
    for a in out:
        assert a.shape == data.shape[1:]


def test_quartiles_are_numpy_linear_percentiles(rng):
    # afw medianAndQuartiles == numpy's default 'linear' percentile
    for n in range(1, 40):
        x = rng.normal(size=n).astype(np.float32)
        srt = np.sort(x)[:, None]
        cnt = np.array([n])
        for frac in (0.25, 0.5, 0.75):
            got = R._quantile_sorted(np, srt, cnt, frac)[0]
            assert got == pytest.approx(
                np.percentile(x.astype(np.float64), 100 * frac), rel=1e-12, abs=1e-12
            )


# ----------------------------------------------------------------------------------------
# 2. known cases
# ----------------------------------------------------------------------------------------


def test_single_50_sigma_outlier_is_clipped(rng):
    good = rng.normal(10.0, 1.0, size=10).astype(np.float32)
    col = np.concatenate([good, [np.float32(10.0 + 50.0)]])
    data = np.repeat(col[:, None, None], 3, axis=2).astype(np.float32)
    bad = np.zeros(data.shape, dtype=bool)
    mean, var, n, used = R.clipped_stack(data, bad, return_used=True)
    assert np.all(n == 10)
    assert not used[-1].any() and used[:-1].all()
    np.testing.assert_allclose(mean, np.mean(good.astype(np.float64)), rtol=1e-6)
    np.testing.assert_allclose(var, np.var(good.astype(np.float64), ddof=1), rtol=1e-5)


def test_clean_gaussian_keeps_everything_and_matches_numpy(rng):
    # evenly spread samples (shuffled per pixel): IQR width 2.2 and 3 sigma 1.8 both
    # exceed the largest deviation 1, so nothing is clipped
    base = np.linspace(-1.0, 1.0, 15)
    x = np.stack([rng.permutation(base) for _ in range(16)], axis=1).reshape(15, 4, 4)
    x = (x + rng.normal(0, 10, size=(1, 4, 4))).astype(np.float32)
    mean, var, n = R.clipped_stack(x, np.zeros(x.shape, bool))
    assert np.all(n == 15)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(var, x.astype(np.float64).var(0, ddof=1), rtol=1e-6)


def test_weights(rng):
    data, bad = make_stack(rng, nep=14, nonfinite=False)
    w = rng.uniform(0.5, 2.0, size=14).astype(np.float32)
    mean, var, n, used = R.clipped_stack(data, bad, w, return_used=True)
    d = data.astype(np.float64)
    ww = np.where(used, w[:, None, None].astype(np.float64), 0.0)
    with np.errstate(invalid="ignore"):
        expect = (ww * d).sum(0) / ww.sum(0)
    assert_same(mean, expect, rtol=1e-6)
    # unit weights are the unweighted statistic, bit for bit
    a = R.clipped_stack(data, bad, np.ones(14, np.float32))
    b = R.clipped_stack(data, bad, None)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # scaling all weights changes nothing (up to rounding)
    c = R.clipped_stack(data, bad, 7.0 * np.ones(14, np.float32))
    assert_same(c[0], b[0], rtol=1e-6)
    assert_same(c[1], b[1], rtol=1e-5)


def test_weighted_variance_is_reliability_weighted():
    x = np.array([1.0, 2.0, 4.0], np.float32)[:, None]
    w = np.array([1.0, 2.0, 3.0], np.float32)
    mean, var, n = R.clipped_stack(x, np.zeros_like(x, bool), w, nsigma=10.0, niter=2)
    m = (w * x[:, 0]).sum() / w.sum()
    v = (w * (x[:, 0] - m) ** 2).sum() / w.sum() * w.sum() ** 2 / (w.sum() ** 2 - (w**2).sum())
    assert mean[0] == pytest.approx(m, rel=1e-6)
    assert var[0] == pytest.approx(v, rel=1e-6)
    assert n[0] == 3


def test_all_masked_single_and_nonfinite_pixels():
    data = np.array([[1.0, 5.0, np.nan], [2.0, np.inf, 3.0], [3.0, 7.0, -np.inf]], np.float32)
    bad = np.array([[True, False, False], [True, True, False], [True, True, True]])
    mean, var, n = R.clipped_stack(data, bad)
    assert np.isnan(mean[0]) and np.isnan(var[0]) and n[0] == 0
    assert mean[1] == 5.0 and np.isnan(var[1]) and n[1] == 1  # one valid sample
    assert mean[2] == 3.0 and np.isnan(var[2]) and n[2] == 1  # NaN and -inf are excluded


def test_two_samples_and_ties():
    data = np.array([[1.0, 4.0, 4.0], [3.0, 4.0, 4.0], [0.0, 4.0, 9.0]], np.float32)
    bad = np.array([[False, False, False], [False, False, False], [True, False, False]])
    mean, var, n = R.clipped_stack(data, bad)
    assert mean[0] == 2.0 and var[0] == 2.0 and n[0] == 2
    assert mean[1] == 4.0 and var[1] == 0.0 and n[1] == 3  # all equal: IQR 0, all kept
    # [4, 4, 9]: q1 = 4, q3 = 6.5, median 4, width 3*0.7413*2.5 = 5.56 -> all kept
    assert n[2] == 3 and mean[2] == pytest.approx(17.0 / 3.0)


def test_niter_counts_the_median_pass():
    # niter=1: only the median/IQR clip.  Samples 0..9 and 30: median 5, IQR 5,
    # width 3*0.7413*5 = 11.1 -> 30 is dropped in pass 0 already.
    x = np.array(list(range(10)) + [30], np.float32)[:, None]
    bad = np.zeros_like(x, bool)
    m1, v1, n1 = R.clipped_stack(x, bad, niter=1)
    assert n1[0] == 10 and m1[0] == pytest.approx(4.5)
    # a sample inside the IQR width but beyond 1.2 sigma of the survivors is removed by
    # pass 1 only
    x = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14], np.float32)[:, None]
    kw = dict(nsigma=1.2)
    n_by_iter = [int(R.clipped_stack(x, bad, niter=k, **kw)[2][0]) for k in (1, 2, 3)]
    expect = [brute_force(x, bad, None, 1.2, k)[2][0] for k in (1, 2, 3)]
    assert n_by_iter == expect
    assert n_by_iter[0] != n_by_iter[-1]


def test_nd_shapes(rng):
    x = rng.normal(size=(9,)).astype(np.float32)
    mean, var, n = R.clipped_stack(x, np.zeros(9, bool))
    assert mean.shape == () and n.shape == ()
    y = rng.normal(size=(9, 2, 3, 4)).astype(np.float32)
    mean, var, n, used = R.clipped_stack(y, np.zeros(y.shape, np.uint8), return_used=True)
    assert mean.shape == (2, 3, 4) and used.shape == y.shape and used.dtype == bool
    flat = R.clipped_stack(y.reshape(9, -1), np.zeros((9, 24), bool))
    np.testing.assert_array_equal(mean.ravel(), flat[0])


def test_bands_do_not_change_the_result(rng, monkeypatch):
    data, bad = make_stack(rng, nep=11, shape=(13, 17))
    ref = R.clipped_stack(data, bad)
    monkeypatch.setattr(R, "_BAND_ELEMENTS", 11 * 5)  # 5-pixel bands
    small = R.clipped_stack(data, bad)
    for a, b in zip(ref, small):
        np.testing.assert_array_equal(a, b)


def test_inputs_unchanged(rng):
    data, bad = make_stack(rng)
    w = rng.uniform(0.5, 2.0, size=data.shape[0]).astype(np.float32)
    badu8 = bad.astype(np.uint8)
    copies = [data.copy(), bad.copy(), w.copy(), badu8.copy()]
    R.clipped_stack(data, bad, w, return_used=True)
    R.clipped_stack(data, badu8, w)
    K.clipped_stack(data, bad, w, backend="numpy")
    for a, b in zip((data, bad, w, badu8), copies):
        np.testing.assert_array_equal(a, b)


def test_float64_input_is_read_as_float32(rng):
    x = rng.normal(size=(7, 3, 3))
    bad = np.zeros(x.shape, bool)
    a = R.clipped_stack(x, bad)
    b = R.clipped_stack(x.astype(np.float32), bad)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize(
    "kwargs,exc",
    [
        (dict(bad=np.zeros((5, 3, 3), bool)), ShapeMismatchError),
        (
            dict(data=np.zeros((0, 3, 4), np.float32), bad=np.zeros((0, 3, 4), bool)),
            InvalidInputError,
        ),
        (dict(weights=np.ones(4, np.float32)), InvalidInputError),
        (dict(weights=np.ones((5, 1), np.float32)), InvalidInputError),
        (dict(weights=np.array([1, 1, -1, 1, 1], np.float32)), InvalidInputError),
        (dict(weights=np.array([1, 1, np.nan, 1, 1], np.float32)), InvalidInputError),
        (dict(nsigma=0.0), InvalidInputError),
        (dict(nsigma=-1.0), InvalidInputError),
        (dict(nsigma=np.inf), InvalidInputError),
        (dict(niter=0), InvalidInputError),
        (dict(niter=1.5), InvalidInputError),
        (dict(data=np.zeros((5, 3, 4), complex)), InvalidInputError),
        (dict(data=np.float32(1.0), bad=np.bool_(False)), InvalidInputError),
        (dict(bad=None), InvalidInputError),
    ],
)
def test_validation_errors(kwargs, exc):
    args = dict(
        data=np.zeros((5, 3, 4), np.float32),
        bad=np.zeros((5, 3, 4), bool),
        weights=None,
        nsigma=3.0,
        niter=3,
    )
    args.update(kwargs)
    with pytest.raises(exc):
        R.clipped_stack(**args)
    with pytest.raises(exc):
        K.clipped_stack(**args, backend="numpy")


def test_shape_mismatch_is_an_invalid_input_error():
    assert issubclass(ShapeMismatchError, InvalidInputError)


# ----------------------------------------------------------------------------------------
# mask_dilate_or
# ----------------------------------------------------------------------------------------


def brute_dilate(mask, fp):
    H, W = mask.shape
    kh, kw = fp.shape
    cy, cx = (kh - 1) // 2, (kw - 1) // 2
    out = np.zeros((H, W), np.int64)
    for r in range(H):
        for c in range(W):
            acc = 0
            for i in range(kh):
                for j in range(kw):
                    rr, cc = r - cy + i, c - cx + j
                    if fp[i, j] and 0 <= rr < H and 0 <= cc < W:
                        acc |= int(mask[rr, cc]) & 0xFFFFFFFF
            out[r, c] = acc
    return out.astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("fpshape", [(1, 1), (3, 3), (2, 4), (5, 3), (4, 4)])
def test_mask_dilate_or_matches_bruteforce(rng, fpshape):
    mask = np.zeros((9, 11), np.int32)
    idx = rng.random(mask.shape) < 0.08
    mask[idx] = (1 << rng.integers(0, 31, size=idx.sum())).astype(np.int32)
    mask[4, 5] |= np.int32(-(2**31))  # the sign bit is a bit like any other
    fp = rng.random(fpshape) < 0.6
    fp[(fpshape[0] - 1) // 2, (fpshape[1] - 1) // 2] = True
    got = R.mask_dilate_or(mask, fp)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, brute_dilate(mask, fp))
    np.testing.assert_array_equal(R.mask_dilate_or(mask.view(np.uint32), fp), got)
    np.testing.assert_array_equal(
        K.mask_dilate_or(mask, fp.astype(np.float32), backend="numpy"), got
    )


@pytest.mark.parametrize("fpshape", [(1, 1), (5, 5), (4, 6), (9, 9)])
def test_sparse_mask_dilate_or_matches_bruteforce(rng, fpshape):
    """A sparse host mask (set pixels × taps < a quarter of the image) takes the scatter
    path: the same bits as the brute-force OR, edges and the sign bit included."""
    mask = np.zeros((80, 93), np.int32)
    idx = rng.random(mask.shape) < 0.002
    idx[0, 0] = idx[79, 92] = idx[40, 0] = True  # corners and an edge
    mask[idx] = (1 << rng.integers(0, 31, size=idx.sum())).astype(np.int32)
    mask[0, 0] |= np.int32(-(2**31))
    fp = rng.random(fpshape) < 0.6
    fp[(fpshape[0] - 1) // 2, (fpshape[1] - 1) // 2] = True
    assert np.count_nonzero(mask) * fp.sum() < mask.size // 4
    got = R.mask_dilate_or(mask, fp)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, brute_dilate(mask, fp))
    np.testing.assert_array_equal(R.mask_dilate_or(mask.view(np.uint32), fp), got)


def test_mask_dilate_or_correlation_convention():
    mask = np.zeros((5, 5), np.int32)
    mask[2, 2] = 4
    fp = np.zeros((3, 3), bool)
    fp[0, 2] = True  # i=0, j=2: out[r, c] reads mask[r-1, c+1]
    out = R.mask_dilate_or(mask, fp)
    assert out[3, 1] == 4 and out.sum() == 4


def test_mask_dilate_or_errors():
    with pytest.raises(InvalidInputError):
        R.mask_dilate_or(np.zeros((3, 3), np.float32), np.ones((3, 3), bool))
    with pytest.raises(InvalidInputError):
        R.mask_dilate_or(np.zeros((3, 3, 3), np.int32), np.ones((3, 3), bool))
    with pytest.raises(InvalidInputError):
        R.mask_dilate_or(np.zeros((3, 3), np.int32), np.ones((0, 3), bool))
    with pytest.raises(InvalidInputError):
        R.mask_dilate_or(np.full((3, 3), 2**40, np.int64), np.ones((3, 3), bool))


# ----------------------------------------------------------------------------------------
# registry and source lookup
# ----------------------------------------------------------------------------------------


def test_registry_pairs_every_kernel():
    names = K.list_kernels()
    assert {"clipped_stack", "mask_dilate_or"} <= set(names)
    for name in names:
        spec = K.get_spec(name)
        assert K.get_kernel(name, "numpy") is spec.numpy_impl
        if spec.cuda_launcher is not None:
            assert (K.cuda_source_dir() / spec.source).is_file()
            src = K.read_cuda_source(spec.source)
            for sym in spec.symbols:
                base = sym.rsplit("_n", 1)[0] if name == "clipped_stack" else sym
                assert base in src


def test_unknown_kernel_and_duplicate_registration():
    with pytest.raises(KernelRegistryError):
        K.get_kernel("no_such_kernel", "numpy")
    with pytest.raises(KernelRegistryError):
        K.register_kernel(K.get_spec("clipped_stack"))
    with pytest.raises(KernelRegistryError):
        K.KernelSpec("x", R.clipped_stack, cuda_launcher=lambda *a: None)


def test_cuda_source_dir_finds_the_source_tree(monkeypatch):
    monkeypatch.delenv(K.CUDA_DIR_ENV, raising=False)
    d = K.cuda_source_dir()
    assert (d / "clipped_stack.cu").is_file()
    assert [p.name for p in K.cuda_sources()] == sorted(p.name for p in d.glob("*.cu"))


def test_cuda_source_dir_env_override(monkeypatch, tmp_path):
    (tmp_path / "x.cu").write_text("// empty\n")
    monkeypatch.setenv(K.CUDA_DIR_ENV, str(tmp_path))
    assert K.cuda_source_dir() == tmp_path.resolve()
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(K.CUDA_DIR_ENV, str(empty))
    with pytest.raises(KernelRegistryError, match="GPUDIFF_CUDA_DIR"):
        K.cuda_source_dir()


def test_cuda_source_dir_error_lists_places(monkeypatch, tmp_path):
    monkeypatch.delenv(K.CUDA_DIR_ENV, raising=False)
    fake = tmp_path / "gpudiff" / "backend" / "kernels.py"
    fake.parent.mkdir(parents=True)
    monkeypatch.setattr(K, "__file__", str(fake))

    class _NoRes:
        def __truediv__(self, other):
            return tmp_path / "nowhere"

    import importlib.resources as ir

    monkeypatch.setattr(ir, "files", lambda pkg: _NoRes())
    with pytest.raises(KernelRegistryError) as ei:
        K.cuda_source_dir()
    msg = str(ei.value)
    assert "nowhere" in msg and str(tmp_path / "cuda") in msg


def test_importing_gpudiff_does_not_import_cupy():
    code = (
        "import sys, gpudiff, gpudiff.backend.kernels, gpudiff.backend.reference; "
        "print('cupy' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    )
    assert out.stdout.strip() == "False"


def test_backend_dispatch(backend, rng):
    data, bad = make_stack(rng, nep=9)
    w = rng.uniform(0.5, 2.0, size=9).astype(np.float32)
    ref = R.clipped_stack(data, bad, w, return_used=True)
    got = K.clipped_stack(data, bad, w, return_used=True, backend=backend)
    got = [backend.asnumpy(g) for g in got]
    np.testing.assert_array_equal(got[2], ref[2])
    np.testing.assert_array_equal(got[3], ref[3])
    assert_same(got[0], ref[0], rtol=1e-6)
    assert_same(got[1], ref[1], rtol=1e-5)


# ----------------------------------------------------------------------------------------
# 3. CUDA sources: nvcc, and the kernel code run on the host
# ----------------------------------------------------------------------------------------

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")


@needs_nvcc
@pytest.mark.slow
def test_every_cuda_source_compiles_with_nvcc(tmp_path):
    results = compile_all_with_nvcc("sm_90", out_dir=tmp_path)
    assert results, "no .cu files found"
    for r in results:
        assert r.ok, f"{r.path.name}: {' '.join(r.command)}\n{r.output}"
    # the CI entry point
    rc = nvcc_main(["--check", "--arch", "sm_90"])
    assert rc == 0


_HOST_HARNESS = r"""
#include "{clip}"
#include "{mask}"
#include <cstdio>
#include <cstdlib>
#include <vector>

template <typename T> static std::vector<T> slurp(const char* path, size_t n) {{
    std::vector<T> v(n);
    FILE* f = std::fopen(path, "rb");
    if (!f || std::fread(v.data(), sizeof(T), n, f) != n) {{ std::fprintf(stderr, "read %s\n", path); std::exit(2); }}
    std::fclose(f);
    return v;
}}
template <typename T> static void spit(const char* path, const std::vector<T>& v) {{
    FILE* f = std::fopen(path, "wb");
    std::fwrite(v.data(), sizeof(T), v.size(), f);
    std::fclose(f);
}}

int main(int argc, char** argv) {{
    if (argc < 2) return 2;
    if (argv[1][0] == 'c') {{  // clip DIR NEPOCH NPIX NSIGMA NITER
        const char* d = argv[2];
        int nep = std::atoi(argv[3]);
        long long npix = std::atoll(argv[4]);
        double nsigma = std::atof(argv[5]);
        int niter = std::atoi(argv[6]);
        char path[4096];
        std::snprintf(path, sizeof path, "%s/data.bin", d); auto data = slurp<float>(path, nep * npix);
        std::snprintf(path, sizeof path, "%s/bad.bin", d); auto bad = slurp<unsigned char>(path, nep * npix);
        std::snprintf(path, sizeof path, "%s/w.bin", d); auto w = slurp<float>(path, nep);
        std::vector<float> mean(npix), var(npix), scratch(nep > 0 ? nep : 1);
        std::vector<int> n(npix);
        std::vector<unsigned char> used(nep * npix);
        for (long long p = 0; p < npix; ++p)
            gd_clip::clip_pixel(data.data(), bad.data(), w.data(), nep, npix, p, nsigma, niter,
                                scratch.data(), mean.data(), var.data(), n.data(), used.data(), 1);
        std::snprintf(path, sizeof path, "%s/mean.bin", d); spit(path, mean);
        std::snprintf(path, sizeof path, "%s/var.bin", d); spit(path, var);
        std::snprintf(path, sizeof path, "%s/n.bin", d); spit(path, n);
        std::snprintf(path, sizeof path, "%s/used.bin", d); spit(path, used);
    }} else {{  // dilate DIR H W NOFF
        const char* d = argv[2];
        int H = std::atoi(argv[3]), W = std::atoi(argv[4]), noff = std::atoi(argv[5]);
        char path[4096];
        std::snprintf(path, sizeof path, "%s/mask.bin", d); auto mask = slurp<int>(path, (size_t)H * W);
        std::snprintf(path, sizeof path, "%s/dy.bin", d); auto dy = slurp<int>(path, noff);
        std::snprintf(path, sizeof path, "%s/dx.bin", d); auto dx = slurp<int>(path, noff);
        std::vector<int> out((size_t)H * W);
        for (int r = 0; r < H; ++r)
            for (int c = 0; c < W; ++c)
                out[(size_t)r * W + c] = gd_mask::dilate_pixel(mask.data(), H, W, dy.data(), dx.data(), noff, r, c);
        std::snprintf(path, sizeof path, "%s/out.bin", d); spit(path, out);
    }}
    return 0;
}}
"""


@pytest.fixture(scope="module")
def host_harness(tmp_path_factory):
    """The CUDA sources' per-pixel functions compiled for the CPU with nvcc."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    d = tmp_path_factory.mktemp("host_harness")
    src = d / "harness.cu"
    cdir = K.cuda_source_dir()
    src.write_text(_HOST_HARNESS.format(clip=cdir / "clipped_stack.cu", mask=cdir / "mask_ops.cu"))
    exe = d / "harness"
    proc = subprocess.run(
        ["nvcc", "-std=c++17", "-O2", "-o", str(exe), str(src)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    if proc.returncode != 0:
        pytest.fail("host build of the CUDA sources failed:\n" + proc.stdout + proc.stderr)
    return exe


@pytest.mark.slow
@pytest.mark.parametrize(
    "seed,weighted,nsigma,niter",
    [
        (0, False, 3.0, 3),
        (1, True, 3.0, 3),
        (2, True, 2.5, 3),
        (3, False, 1.5, 5),
        (4, True, 3.0, 1),
    ],
)
def test_cuda_code_on_host_matches_twin(host_harness, tmp_path, seed, weighted, nsigma, niter):
    rng = np.random.default_rng(seed)
    data, bad = make_stack(rng, nep=[7, 20, 33, 2, 1][seed], shape=(17, 19), ties=(seed == 2))
    nep, npix = data.shape[0], 17 * 19
    w = (rng.uniform(0.1, 4.0, nep) if weighted else np.ones(nep)).astype(np.float32)
    data.tofile(tmp_path / "data.bin")
    bad.astype(np.uint8).tofile(tmp_path / "bad.bin")
    w.tofile(tmp_path / "w.bin")
    subprocess.run(
        [str(host_harness), "clip", str(tmp_path), str(nep), str(npix), repr(nsigma), str(niter)],
        check=True,
        timeout=60,
    )
    mean = np.fromfile(tmp_path / "mean.bin", np.float32)
    var = np.fromfile(tmp_path / "var.bin", np.float32)
    n = np.fromfile(tmp_path / "n.bin", np.int32)
    used = np.fromfile(tmp_path / "used.bin", np.uint8).reshape(nep, npix).astype(bool)
    rm, rv, rn, ru = R.clipped_stack(
        data, bad, w if weighted else None, nsigma, niter, return_used=True
    )
    np.testing.assert_array_equal(n, rn.ravel())
    np.testing.assert_array_equal(used, ru.reshape(nep, npix))
    # same float64 arithmetic in the same order: identical bits
    np.testing.assert_array_equal(mean, rm.ravel())
    np.testing.assert_array_equal(var, rv.ravel())


@pytest.mark.slow
def test_cuda_mask_code_on_host_matches_twin(host_harness, tmp_path, rng):
    mask = np.where(rng.random((23, 29)) < 0.1, 1 << rng.integers(0, 32, (23, 29)), 0).astype(
        np.int64
    )
    mask = mask.astype(np.uint32).view(np.int32)
    fp = rng.random((5, 4)) < 0.5
    dy, dx = R.footprint_offsets(fp)
    mask.tofile(tmp_path / "mask.bin")
    dy.tofile(tmp_path / "dy.bin")
    dx.tofile(tmp_path / "dx.bin")
    subprocess.run(
        [str(host_harness), "dilate", str(tmp_path), "23", "29", str(dy.size)],
        check=True,
        timeout=60,
    )
    out = np.fromfile(tmp_path / "out.bin", np.int32).reshape(23, 29)
    np.testing.assert_array_equal(out, R.mask_dilate_or(mask, fp))


# ----------------------------------------------------------------------------------------
# 4. GPU parity (skipped without CuPy and a device)
# ----------------------------------------------------------------------------------------


def _gpu_case(rng, nep, shape=(64, 96), ties=False, weighted=False):
    data, bad = make_stack(rng, nep=nep, shape=shape, ties=ties)
    w = rng.uniform(0.1, 4.0, nep).astype(np.float32) if weighted else None
    return data, bad, w


@pytest.mark.gpu
@pytest.mark.parametrize("nep", [1, 2, 3, 5, 20, 32, 33, 64, 100, 256, 257, 300])
@pytest.mark.parametrize("weighted", [False, True])
def test_gpu_clipped_stack_parity(rng, nep, weighted):
    import cupy

    data, bad, w = _gpu_case(rng, nep, weighted=weighted, ties=(nep % 2 == 1))
    be = get_backend("cupy")
    got = K.clipped_stack(data, bad, w, nsigma=3.0, niter=3, return_used=True, backend=be)
    assert all(isinstance(g, cupy.ndarray) for g in got)
    gm, gv, gn, gu = (cupy.asnumpy(g) for g in got)
    rm, rv, rn, ru = R.clipped_stack(data, bad, w, 3.0, 3, return_used=True)
    # rare borderline samples could flip if the device rounded differently; demand (near)
    # identity: the kernel disables FMA and sums in the same order as the twin
    assert np.mean(gn != rn) < 1e-3
    same = gn == rn
    np.testing.assert_array_equal(gu[:, same], ru[:, same])
    np.testing.assert_allclose(gm[same], rm[same], rtol=1e-5, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(gv[same], rv[same], rtol=1e-4, atol=1e-6, equal_nan=True)
    assert (
        gm.dtype == np.float32
        and gv.dtype == np.float32
        and gn.dtype == np.int32
        and gu.dtype == bool
    )


@pytest.mark.gpu
def test_gpu_clipped_stack_special_pixels():
    import cupy

    data = np.array(
        [[1.0, 5.0, np.nan, 4.0], [2.0, np.inf, 3.0, 4.0], [3.0, 7.0, -np.inf, 4.0]], np.float32
    )
    bad = np.array(
        [[True, False, False, False], [True, True, False, False], [True, True, True, False]]
    )
    m, v, n = (cupy.asnumpy(a) for a in K.clipped_stack(data, bad, backend="cupy"))
    assert np.isnan(m[0]) and np.isnan(v[0]) and n[0] == 0
    assert m[1] == 5.0 and np.isnan(v[1]) and n[1] == 1
    assert m[2] == 3.0 and np.isnan(v[2]) and n[2] == 1
    assert m[3] == 4.0 and v[3] == 0.0 and n[3] == 3


@pytest.mark.gpu
def test_gpu_inputs_unchanged_and_device_inputs(rng):
    import cupy

    data, bad, w = _gpu_case(rng, 12, weighted=True)
    d_dev, b_dev, w_dev = cupy.asarray(data), cupy.asarray(bad), cupy.asarray(w)
    f = K.get_kernel("clipped_stack", "cupy")
    out = f(d_dev, b_dev, w_dev)
    cupy.cuda.get_current_stream().synchronize()
    np.testing.assert_array_equal(cupy.asnumpy(d_dev), data)
    np.testing.assert_array_equal(cupy.asnumpy(b_dev), bad)
    np.testing.assert_array_equal(cupy.asnumpy(w_dev), w)
    ref = R.clipped_stack(data, bad, w)
    np.testing.assert_array_equal(cupy.asnumpy(out[2]), ref[2])


@pytest.mark.gpu
@pytest.mark.parametrize("fpshape", [(1, 1), (3, 3), (4, 6), (17, 17)])
def test_gpu_mask_dilate_or_parity(rng, fpshape):
    import cupy

    mask = np.where(rng.random((301, 257)) < 0.02, 1 << rng.integers(0, 32, (301, 257)), 0)
    mask = mask.astype(np.int64).astype(np.uint32).view(np.int32)
    fp = rng.random(fpshape) < 0.7
    got = cupy.asnumpy(K.mask_dilate_or(mask, fp, backend="cupy"))
    np.testing.assert_array_equal(got, R.mask_dilate_or(mask, fp))


@pytest.mark.gpu
def test_gpu_modules_are_cached():
    m1 = K.load_module("clipped_stack.cu")
    m2 = K.load_module("clipped_stack.cu")
    assert m1 is m2


def _moment_stamps(rng, n=300, s=21):
    """Elliptical Gaussians (S/N 0-1000 at the peak over unit noise, random shape, offset
    up to 1.5 px), an empty, a negative and an off-centre stamp; ~8 % of pixels masked."""
    c = np.arange(s) - s // 2
    X, Y = np.meshgrid(c, c)
    st = np.empty((n, s, s), np.float32)
    for i in range(n):
        sx, sy, th = rng.uniform(0.9, 3.0), rng.uniform(0.9, 3.0), rng.uniform(0, np.pi)
        x0, y0 = rng.uniform(-1.5, 1.5, 2)
        u = (X - x0) * np.cos(th) + (Y - y0) * np.sin(th)
        v = -(X - x0) * np.sin(th) + (Y - y0) * np.cos(th)
        amp = [0.0, 3.0, 10.0, 100.0, 1000.0][i % 5]
        st[i] = amp * np.exp(-0.5 * (u * u / sx**2 + v * v / sy**2)) + rng.normal(0, 1, (s, s))
    st[0], st[1] = 0.0, -100.0 * np.exp(-0.5 * (X**2 + Y**2) / 4)
    st[2] = 100.0 * np.exp(-0.5 * ((X - 4) ** 2 + Y**2) / 2)
    return st, rng.random(st.shape) > 0.08


@pytest.mark.gpu
@pytest.mark.parametrize("max_iter,tol", [(60, 1e-6), (6, 1e-3)])
def test_gpu_adaptive_moments_parity(rng, max_iter, tol):
    import cupy

    st, valid = _moment_stamps(rng)
    ref = K.adaptive_moments_twin(st, valid, 3.0, max_iter, tol)
    got = K.get_kernel("adaptive_moments", "cupy")(
        cupy.asarray(st), cupy.asarray(valid), 3.0, max_iter, tol
    )
    assert all(isinstance(g, cupy.ndarray) for g in got)
    got = [cupy.asnumpy(g) for g in got]
    # The block sums add in a tree, the twin in NumPy's order: rounding (~1e-13) can move a
    # row across a convergence threshold only when it lies within that of it; allow 1 %.
    same = got[5] == ref[5]
    assert same.mean() > 0.99 and ref[5].sum() >= 50
    for j in range(5):
        # a threshold flip changes the step count by one: ≤ tol·(wxx + wyy) ≈ 1e-5 px²
        np.testing.assert_allclose(got[j][same], ref[j][same], rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_gpu_weighted_centroid_parity(rng):
    import cupy

    st, valid = _moment_stamps(rng)
    st = np.where(valid, st, 0).astype(np.float32)
    x0, y0 = rng.uniform(-0.5, 0.5, len(st)), rng.uniform(-0.5, 0.5, len(st))
    ref = K.weighted_centroid_twin(st, x0, y0, 1.6)
    got = [
        cupy.asnumpy(g)
        for g in K.get_kernel("weighted_centroid", "cupy")(
            cupy.asarray(st), cupy.asarray(x0), cupy.asarray(y0), 1.6
        )
    ]
    same = got[2] == ref[2]
    assert same.mean() > 0.99 and ref[2].sum() >= 50
    np.testing.assert_allclose(got[0][same], ref[0][same], atol=1e-9)  # 20 fixed steps: rounding
    np.testing.assert_allclose(got[1][same], ref[1][same], atol=1e-9)


def test_stamp_kernels_registered_and_validated(rng):
    """Both stamp kernels are in the registry with a launcher and their .cu symbols, and
    the twins reject stamps that are not (n, s, s)."""
    for name, sym in (
        ("adaptive_moments", "adaptive_moments_f64"),
        ("weighted_centroid", "weighted_centroid_f64"),
    ):
        spec = K.get_spec(name)
        assert spec.cuda_launcher is not None and spec.symbols == (sym,)
        assert sym in K.read_cuda_source(spec.source)
    with pytest.raises(ShapeMismatchError):
        K.adaptive_moments_twin(np.zeros((3, 5, 6)), np.ones((3, 5, 6), bool), 2.0)
    with pytest.raises(ShapeMismatchError):
        K.weighted_centroid_twin(np.zeros((3, 5, 5)), np.zeros(2), np.zeros(3), 1.0)


# ----------------------------------------------------------------------------------------
# clipped_columns: deep columns (background bins, the whole-image clip), sort-free
# ----------------------------------------------------------------------------------------


def _deep_columns(seed: int, n: int = 3000, b: int = 12):
    """Columns of sky noise with outliers, ties, ±0, non-finite samples marked good, and
    the awkward columns: nothing usable, one sample, two, all equal."""
    rng = np.random.default_rng(seed)
    data = rng.normal(10.0, 2.0, (n, b)).astype(np.float32)
    data[rng.random((n, b)) < 0.03] += 300.0
    data[rng.random((n, b)) < 0.01] -= 80.0
    good = rng.random((n, b)) > 0.25
    good[:, 0] = False  # nothing usable
    good[:, 1] = False
    good[7, 1] = True  # a single sample
    good[:, 2] = False
    good[[3, n - 1], 2] = True  # two samples
    data[:, 3] = 7.25  # all equal: zero width
    data[::17, 4] = np.nan  # non-finite samples marked good: dropped all the same
    data[::23, 5] = np.inf
    data[:, 6] = np.round(data[:, 6])  # ties at the quartiles
    data[::5, 7] = 0.0
    data[1::5, 7] = -0.0
    return data, good


def _sorted_reference(data, good, nsigma, niter):
    """afw MEANCLIP per column from the sorted valid samples, plain float64 loops."""
    out = []
    for c in range(data.shape[1]):
        col = data[:, c]
        ok = good[:, c] & np.isfinite(col)
        m, v, nu, _ = afw_meanclip_pixel(col, ~ok, None, nsigma, niter)
        out.append((m, v, nu, int(good[:, c].sum())))
    return [np.array(x) for x in zip(*out)]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("nsigma,niter", [(3.0, 3), (2.5, 1), (3.0, 5)])
def test_clipped_columns_twin_is_clipped_stack_and_afw(seed, nsigma, niter):
    """The twin gives clipped_stack's bits (today's CPU path) and afw's numbers from the
    sorted samples; the kernel is registered with it."""
    data, good = _deep_columns(seed)
    m, v, nu, ng = K.get_kernel("clipped_columns", "numpy")(data, good, nsigma, niter)
    rm, rv, rnu = R.clipped_stack(data, ~good, None, nsigma, niter)
    np.testing.assert_array_equal(m, rm)
    np.testing.assert_array_equal(v, rv)
    np.testing.assert_array_equal(nu, rnu)
    np.testing.assert_array_equal(ng, good.sum(axis=0))
    sm, sv, snu, sng = _sorted_reference(data, good, nsigma, niter)
    np.testing.assert_array_equal(nu, snu)
    np.testing.assert_array_equal(ng, sng)
    assert_same(m, sm, rtol=1e-6)
    assert_same(v, sv, rtol=1e-5)
    assert np.isnan(m[0]) and nu[0] == 0 and m[1] == data[7, 1] and np.isnan(v[1])
    assert v[3] == 0 and m[3] == np.float32(7.25)


def test_clipped_columns_registered_and_validated():
    spec = K.get_spec("clipped_columns")
    assert spec.numpy_impl is R.clipped_columns and spec.symbols == ("clipped_columns_f32",)
    assert "clipped_columns_f32" in K.read_cuda_source(spec.source)
    data, good = _deep_columns(0, 40)
    with pytest.raises(ShapeMismatchError):
        R.clipped_columns(data, good[:, :2])
    with pytest.raises(InvalidInputError):
        R.clipped_columns(data[:, 0], good[:, 0])
    for kw in (dict(nsigma=0.0), dict(nsigma=np.inf), dict(niter=0)):
        with pytest.raises(InvalidInputError):
            R.clipped_columns(data, good, **{"nsigma": 3.0, "niter": 3, **kw})


_COLS_HARNESS = r"""
#include "{src}"
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <vector>

template <typename T> static std::vector<T> slurp(const char* path, size_t n) {{
    std::vector<T> v(n);
    FILE* f = std::fopen(path, "rb");
    if (!f || std::fread(v.data(), sizeof(T), n, f) != n) {{ std::fprintf(stderr, "read %s\n", path); std::exit(2); }}
    std::fclose(f);
    return v;
}}
template <typename T> static void spit(const char* path, const std::vector<T>& v) {{
    FILE* f = std::fopen(path, "wb");
    std::fwrite(v.data(), sizeof(T), v.size(), f);
    std::fclose(f);
}}

// DIR N B NSPLIT NSIGMA NITER GOOD_IS_FINITE COLUMN_MAJOR QUANTILES SHARED_MASK NY NX:
// every phase, every column, the blocks of a column in order, one thread per block (gd_cc's
// host build).  QUANTILES: the selection phases only, fractions from fr.bin, out to q.bin.
// NY > 0: bin mode, data.bin / good.bin an N x B image, bin edges from ye.bin / xe.bin.
int main(int argc, char** argv) {{
    if (argc < 13) return 2;
    const char* d = argv[1];
    const long long n_in = std::atoll(argv[2]);
    const int B_in = std::atoi(argv[3]), nsplit = std::atoi(argv[4]);
    const int ny = std::atoi(argv[11]), nx = std::atoi(argv[12]);
    std::vector<long long> ye(ny + 1), xe(nx + 1);
    long long hmax = 0, wmax = 0;
    char path[4096];
    if (ny > 0) {{
        std::snprintf(path, sizeof path, "%s/ye.bin", d); ye = slurp<long long>(path, ny + 1);
        std::snprintf(path, sizeof path, "%s/xe.bin", d); xe = slurp<long long>(path, nx + 1);
        for (int i = 0; i < ny; ++i) hmax = std::max(hmax, ye[i + 1] - ye[i]);
        for (int j = 0; j < nx; ++j) wmax = std::max(wmax, xe[j + 1] - xe[j]);
    }}
    const long long n = ny > 0 ? hmax * wmax : n_in;
    const int B = ny > 0 ? ny * nx : B_in;
    const double nsigma = std::atof(argv[5]);
    const int niter = std::atoi(argv[6]), gif = std::atoi(argv[7]), cmaj = std::atoi(argv[8]);
    const int qmode = std::atoi(argv[9]), shared = std::atoi(argv[10]);
    std::snprintf(path, sizeof path, "%s/data.bin", d); auto data = slurp<float>(path, n_in * B_in);
    std::snprintf(path, sizeof path, "%s/good.bin", d);
    auto good = slurp<unsigned char>(path, shared ? n_in : n_in * B_in);
    // bin mode: pixel stride 1, row stride W (= B_in)
    const long long ss = ny > 0 ? 1 : (cmaj ? 1 : B), sc = ny > 0 ? B_in : (cmaj ? n : 1);
    const long long gs = shared ? 1 : ss, gc = shared ? 0 : sc;
    std::vector<double> fr(3 * (size_t)B, -1.0), q(3 * (size_t)B);
    if (qmode) {{ std::snprintf(path, sizeof path, "%s/fr.bin", d); fr = slurp<double>(path, 3 * (size_t)B); }}
    std::vector<unsigned int> ghist((size_t)B * gd_cc::kRanks * gd_cc::kBins, 0u);
    std::vector<long long> st_i((size_t)B * gd_cc::kSI, 0);
    std::vector<double> st_d((size_t)B * gd_cc::kSD, 0.0), part((size_t)B * nsplit * 2);
    std::vector<float> mean(B), var(B);
    std::vector<int> nu(B);
    std::vector<long long> ng(B);
    const gd_cc::Args a{{data.data(), good.data(), n, ss, sc, gs, gc, nsplit, nsigma, niter, gif,
                         ghist.data(), st_i.data(), st_d.data(), part.data(), mean.data(),
                         var.data(), nu.data(), ng.data(), qmode ? fr.data() : nullptr,
                         qmode ? q.data() : nullptr, ny > 0 ? ye.data() : nullptr,
                         ny > 0 ? xe.data() : nullptr, nx > 0 ? nx : 1, wmax > 0 ? wmax : 1}};
    std::vector<unsigned int> sh_hist(gd_cc::kRanks * gd_cc::kBins);
    long long sh_i[32];
    double sh_d[32];
    int flag = 0;
    const gd_cc::Block blk{{0, 1, sh_hist.data(), sh_i, sh_d, &flag}};
    for (int ph = 0; ph < gd_cc::kSelectPhases + (qmode ? 0 : niter); ++ph)
        for (int c = 0; c < B; ++c)
            for (int g = 0; g < nsplit; ++g) gd_cc::run_phase(blk, a, c, g, ph);
    std::snprintf(path, sizeof path, "%s/mean.bin", d); spit(path, mean);
    std::snprintf(path, sizeof path, "%s/var.bin", d); spit(path, var);
    std::snprintf(path, sizeof path, "%s/n.bin", d); spit(path, nu);
    std::snprintf(path, sizeof path, "%s/ng.bin", d); spit(path, ng);
    std::snprintf(path, sizeof path, "%s/q.bin", d); spit(path, q);
    return 0;
}}
"""


@pytest.fixture(scope="module")
def cols_harness(tmp_path_factory):
    """cuda/clipped_columns.cu's block code compiled for the CPU with nvcc."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    d = tmp_path_factory.mktemp("cols_harness")
    src = d / "harness.cu"
    src.write_text(_COLS_HARNESS.format(src=K.cuda_source_dir() / "clipped_columns.cu"))
    exe = d / "harness"
    proc = subprocess.run(
        ["nvcc", "-std=c++17", "-O2", "-o", str(exe), str(src)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    if proc.returncode != 0:
        pytest.fail("host build of clipped_columns.cu failed:\n" + proc.stdout + proc.stderr)
    return exe


def _run_cols_harness(
    exe, tmp_path, data, good, nsplit, nsigma, niter, gif, column_major, fractions=None, edges=None
):
    """Run the host build; ``fractions`` (B, 3, -1 = unused): the selection-only mode,
    returning the (B, 3) quantiles; a 1-d ``good`` is one mask shared by every column;
    ``edges`` = (y_edges, x_edges): bin mode, ``data`` the (H, W) image."""
    n, b = data.shape
    ny = nx = 0
    if edges is not None:
        ye, xe = (np.asarray(e, np.int64) for e in edges)
        ye.tofile(tmp_path / "ye.bin")
        xe.tofile(tmp_path / "xe.bin")
        ny, nx = ye.size - 1, xe.size - 1
    (np.ascontiguousarray(data.T) if column_major else data).tofile(tmp_path / "data.bin")
    g8 = good.astype(np.uint8)
    (np.ascontiguousarray(g8.T) if column_major else g8).tofile(tmp_path / "good.bin")
    if fractions is not None:
        np.ascontiguousarray(fractions, np.float64).tofile(tmp_path / "fr.bin")
    args = [n, b, nsplit, repr(nsigma), niter, int(gif), int(column_major)]
    args += [int(fractions is not None), int(good.ndim == 1), ny, nx]
    subprocess.run([str(exe), str(tmp_path), *map(str, args)], check=True, timeout=120)
    if fractions is not None:
        return np.fromfile(tmp_path / "q.bin", np.float64).reshape(-1, 3)
    return (
        np.fromfile(tmp_path / "mean.bin", np.float32),
        np.fromfile(tmp_path / "var.bin", np.float32),
        np.fromfile(tmp_path / "n.bin", np.int32),
        np.fromfile(tmp_path / "ng.bin", np.int64),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "seed,nsplit,nsigma,niter,gif,column_major",
    [
        (0, 1, 3.0, 3, False, False),
        (1, 1, 2.5, 1, False, True),
        (2, 1, 3.0, 5, True, False),
        (3, 4, 3.0, 3, False, True),
        (4, 7, 2.0, 4, True, True),
    ],
)
def test_clipped_columns_cuda_code_on_host(
    cols_harness, tmp_path, seed, nsplit, nsigma, niter, gif, column_major
):
    """The kernel's radix select, phases and arrival-counter folds (one thread per block on
    the host) against the twin: with one block per column the sums run in sample order, so
    the bits are the twin's; split columns add per-chunk partials, float32-close."""
    data, good = _deep_columns(seed, n=2001 + 37 * seed)
    if gif:
        good &= np.isfinite(data)
    got = _run_cols_harness(
        cols_harness, tmp_path, data, good, nsplit, nsigma, niter, gif, column_major
    )
    ref = R.clipped_columns(data, good, nsigma, niter, good_is_finite=gif)
    np.testing.assert_array_equal(got[2], ref[2])
    np.testing.assert_array_equal(got[3], ref[3])
    if nsplit == 1:
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
    else:
        assert_same(got[0], ref[0], rtol=1e-6)
        assert_same(got[1], ref[1], rtol=1e-5)


@pytest.mark.slow
def test_clipped_columns_cuda_code_on_host_one_deep_column(cols_harness, tmp_path, rng):
    """The whole-image case: one column of 2²⁰ samples split over 16 blocks, against a
    sorted reference (numpy.percentile quartiles and the afw passes in float64)."""
    n = 1 << 20
    x = rng.normal(100.0, 7.0, n).astype(np.float32)
    x[rng.random(n) < 0.02] = 1e5
    good = rng.random(n) > 0.1
    got = _run_cols_harness(
        cols_harness, tmp_path, x[:, None], good[:, None], 16, 3.0, 3, True, True
    )
    ref = R.clipped_columns(x[:, None], good[:, None], 3.0, 3, good_is_finite=True)
    assert got[2][0] == ref[2][0] and got[3][0] == good.sum()
    assert got[0][0] == pytest.approx(float(ref[0][0]), rel=1e-6)
    assert got[1][0] == pytest.approx(float(ref[1][0]), rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("n,b", [(1, 9), (37, 10), (16384, 64), (3000, 300), (1 << 21, 1)])
@pytest.mark.parametrize("gif", [False, True])
def test_gpu_clipped_columns_parity(n, b, gif):
    """The CUDA kernel (one block per column, or a deep column split over blocks) against
    the twin to float32 rounding, C-ordered and as a transposed view."""
    import cupy

    data, good = _deep_columns(n + b, max(n, 8), max(b, 8))
    data, good = data[:n, :b], good[:n, :b]
    if gif:
        good = good & np.isfinite(data)
    ref = R.clipped_columns(data, good, 3.0, 3, good_is_finite=gif)
    f = K.get_kernel("clipped_columns", "cupy")
    for d, g in (
        (cupy.asarray(data), cupy.asarray(good)),
        (cupy.asarray(data.T.copy()).T, cupy.asarray(good.T.copy()).T),
    ):
        got = [cupy.asnumpy(a) for a in f(d, g, 3.0, 3, good_is_finite=gif)]
        assert [a.dtype for a in got] == [np.float32, np.float32, np.int32, np.int64]
        np.testing.assert_array_equal(got[3], ref[3])
        # a borderline sample may flip with the summation order: rare, and then ±1 survivor
        assert np.mean(got[2] != ref[2]) <= 0.02
        same = got[2] == ref[2]
        assert_same(got[0][same], ref[0][same], rtol=2e-6)
        assert_same(got[1][same], ref[1][same], rtol=2e-5)


@pytest.mark.gpu
def test_gpu_clipped_columns_deterministic_and_no_var():
    import cupy

    data, good = _deep_columns(5, 1 << 18, 2)
    f = K.get_kernel("clipped_columns", "cupy")
    d, g = cupy.asarray(data), cupy.asarray(good)
    a = [cupy.asnumpy(x) for x in f(d, g)]
    b = f(d, g, want_var=False)
    assert b[1] is None
    np.testing.assert_array_equal(a[0], cupy.asnumpy(b[0]))
    np.testing.assert_array_equal(a[2], cupy.asnumpy(b[2]))


def _quantile_case(seed: int, n: int = 4001):
    """Three samples under one mask: normal, wide Cauchy (both signs, ±0), heavy ties."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 1, n).astype(np.float32)
    b = (rng.standard_cauchy(n) * 1e3).astype(np.float32)
    b[::11] = 0.0
    b[1::11] = -0.0
    c = rng.integers(-3, 4, n).astype(np.float32)
    keep = rng.random(n) > 0.3
    fr = np.array([[0.25, 0.75, np.nan], [0.0, 0.5, 1.0], [0.1, np.nan, 0.9]])
    return np.stack([a, b, c], axis=1), keep, fr


def test_quantile_columns_twin_is_numpy_percentile():
    """The twin's quantiles are np.percentile of each column's kept float32 values; NaN for
    unused fractions and for empty columns; one mask or one per column."""
    data, keep, fr = _quantile_case(0)
    got = K.get_kernel("quantile_columns", "numpy")(data, keep, fr)
    assert got.shape == (3, 3) and got.dtype == np.float64
    for c in range(3):
        kept = data[keep, c].astype(np.float64)
        for j in range(3):
            if np.isnan(fr[c, j]):
                assert np.isnan(got[c, j])
            else:
                # float64 interpolation of float32 order statistics: numpy's own formula
                assert got[c, j] == pytest.approx(np.percentile(kept, 100 * fr[c, j]), rel=1e-15)
    per_col = np.repeat(keep[:, None], 3, axis=1)
    per_col[:, 2] = False
    got2 = R.quantile_columns(data, per_col, fr)
    np.testing.assert_array_equal(got2[:2], got[:2])
    assert np.isnan(got2[2]).all()
    with pytest.raises(InvalidInputError):
        R.quantile_columns(data, keep, np.full((3, 4), 0.5))
    with pytest.raises(InvalidInputError):
        R.quantile_columns(data, keep, np.full((3, 1), 1.5))
    with pytest.raises(ShapeMismatchError):
        R.quantile_columns(data, keep[:-1], fr)


@pytest.mark.slow
@pytest.mark.parametrize("nsplit,column_major", [(1, True), (1, False), (5, True)])
def test_quantile_columns_cuda_code_on_host(cols_harness, tmp_path, nsplit, column_major):
    """The selection-only phases of the kernel code (host build) pick the twin's exact
    order statistics: the same bits, one shared mask read with a zero column stride."""
    data, keep, fr = _quantile_case(1 + nsplit)
    got = _run_cols_harness(
        cols_harness,
        tmp_path,
        data,
        keep,
        nsplit,
        3.0,
        1,
        True,
        column_major,
        fractions=np.where(np.isnan(fr), -1.0, fr),
    )
    np.testing.assert_array_equal(got, R.quantile_columns(data, keep, fr))
    empty = _run_cols_harness(
        cols_harness,
        tmp_path,
        data,
        np.zeros(len(keep), bool),
        nsplit,
        3.0,
        1,
        True,
        column_major,
        fractions=np.full((3, 3), 0.5),
    )
    assert np.isnan(empty).all()


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 5000, 1 << 21])
def test_gpu_quantile_columns_parity(n):
    """The kernel's selection phases against the twin: exact order statistics, so equal
    (±0 may differ in sign: compare as floats)."""
    import cupy

    data, keep, fr = _quantile_case(7, max(n, 2))
    data, keep = data[:n], keep[:n]
    keep[0] = True
    ref = R.quantile_columns(data, keep, fr)
    f = K.get_kernel("quantile_columns", "cupy")
    dd = cupy.asarray(np.ascontiguousarray(data.T)).T  # columns contiguous, as _quantiles
    got = cupy.asnumpy(f(dd, cupy.asarray(keep), fr))
    np.testing.assert_array_equal(got, ref)
    got_c = cupy.asnumpy(f(cupy.asarray(data), cupy.asarray(keep), fr))
    np.testing.assert_array_equal(got_c, ref)


@pytest.mark.slow
@pytest.mark.parametrize("shape,bins", [((192, 256), (64, 64)), ((200, 251), (64, 48))])
def test_clipped_bins_cuda_code_on_host(cols_harness, tmp_path, shape, bins):
    """Bin mode (the background's bins read in place, uneven bins padded) of the kernel
    code on the host against the twin (the bins gathered into a stack): the same bits."""
    rng = np.random.default_rng(sum(shape))
    img = rng.normal(50.0, 3.0, shape).astype(np.float32)
    img[rng.random(shape) < 0.02] = 5e3
    good = rng.random(shape) > 0.2
    good[: bins[0], : bins[1]] = False  # an empty bin
    ye = (np.arange(-(-shape[0] // bins[0]) + 1) * shape[0]) // (-(-shape[0] // bins[0]))
    xe = (np.arange(-(-shape[1] // bins[1]) + 1) * shape[1]) // (-(-shape[1] // bins[1]))
    got = _run_cols_harness(
        cols_harness, tmp_path, img, good, 1, 3.0, 3, True, False, edges=(ye, xe)
    )
    ref = R.clipped_bins(img, good, ye, xe, 3.0, 3, good_is_finite=True)
    assert got[0].size == (ye.size - 1) * (xe.size - 1) and np.isnan(ref[0][0])
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)


def test_clipped_bins_twin_and_validation(rng):
    """The bins twin: the MEANCLIP of each bin's own pixels (uneven bins), and its checks."""
    img = rng.normal(0, 1, (50, 45)).astype(np.float32)
    good = rng.random(img.shape) > 0.1
    ye, xe = np.array([0, 17, 34, 50]), np.array([0, 22, 45])
    m, v, nu, ng = R.clipped_bins(img, good, ye, xe)
    for i in range(3):
        for j in range(2):
            sl = (slice(ye[i], ye[i + 1]), slice(xe[j], xe[j + 1]))
            rm, rv, rn = R.clipped_stack(img[sl].reshape(-1, 1), ~good[sl].reshape(-1, 1))
            k = i * 2 + j
            assert m[k] == rm[0] and v[k] == rv[0] and nu[k] == rn[0]
            assert ng[k] == good[sl].sum()
    for bad_edges in ([0, 17, 49], [1, 17, 50], [0, 30, 17, 50], [0.0, 50.0]):
        with pytest.raises(InvalidInputError):
            R.clipped_bins(img, good, np.array(bad_edges), xe)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,bins", [((512, 512), (128, 128)), ((1000, 777), (128, 100))])
def test_gpu_clipped_bins_parity(shape, bins):
    """Bin mode on the device (bins read in place) against the twin to float32 rounding."""
    import cupy

    rng = np.random.default_rng(shape[1])
    img = rng.normal(50.0, 3.0, shape).astype(np.float32)
    img[rng.random(shape) < 0.02] = 5e3
    good = rng.random(shape) > 0.2
    nyb, nxb = -(-shape[0] // bins[0]), -(-shape[1] // bins[1])
    ye = (np.arange(nyb + 1) * shape[0]) // nyb
    xe = (np.arange(nxb + 1) * shape[1]) // nxb
    ref = R.clipped_bins(img, good, ye, xe, 3.0, 3, good_is_finite=True)
    f = K.get_kernel("clipped_bins", "cupy")
    got = [cupy.asnumpy(a) for a in f(cupy.asarray(img), cupy.asarray(good), ye, xe, 3.0, 3)]
    np.testing.assert_array_equal(got[3], ref[3])
    assert np.mean(got[2] != ref[2]) <= 0.05
    same = got[2] == ref[2]
    assert_same(got[0][same], ref[0][same], rtol=2e-6)
    assert_same(got[1][same], ref[1][same], rtol=2e-5)
