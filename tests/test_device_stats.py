"""The few-launch device paths of the statistics equal the registered kernels bit for bit.

:func:`gpudiff.ops.stats._clip_columns` (the binned background's MEANCLIP on a device)
re-derives the vectorized twin of ``clipped_stack`` with fewer launches; the twin is the
reference, on the awkward columns too: nothing usable, one sample, two, equal values,
non-finite samples, outliers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import device_harness
from gpudiff.backend import get_backend
from gpudiff.backend.reference import clipped_stack
from gpudiff.errors import InvalidInputError
from gpudiff.ops.stats import _clip_columns


def _awkward_stack(seed: int, n: int = 300, b: int = 40):
    rng = np.random.default_rng(seed)
    data = rng.normal(10.0, 2.0, (n, b)).astype(np.float32)
    data[rng.random((n, b)) < 0.02] += 200.0  # outliers the clip must drop
    good = rng.random((n, b)) > 0.3
    good[:, 0] = False  # nothing usable
    good[:, 1] = False
    good[5, 1] = True  # a single sample
    good[:, 2] = False
    good[[3, 9], 2] = True  # two samples
    data[:, 3] = 7.25  # all equal: zero width
    data[::17, 4] = np.nan  # non-finite samples marked good: dropped all the same
    data[::23, 5] = np.inf
    data[:, 6] = np.round(data[:, 6])  # ties at the quartiles
    return data, good


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("nsigma, niter", [(3.0, 3), (2.5, 1), (3.0, 5)])
def test_clip_columns_equals_clipped_stack(seed, nsigma, niter):
    data, good = _awkward_stack(seed)
    be = get_backend("numpy")
    m, v, nu, ng = _clip_columns(be, data, good, nsigma, niter)  # no warning either
    rm, rv, rnu = clipped_stack(data, ~good, None, nsigma, niter)
    assert m.dtype == rm.dtype and v.dtype == rv.dtype and nu.dtype == rnu.dtype
    np.testing.assert_array_equal(m, rm)  # NaN where NaN, the same bits elsewhere
    np.testing.assert_array_equal(v, rv)
    np.testing.assert_array_equal(nu, rnu)
    np.testing.assert_array_equal(ng, good.sum(axis=0))
    assert np.isnan(m[0]) and nu[0] == 0 and m[1] == data[5, 1] and np.isnan(v[1])
    assert np.isfinite(m[3:]).all() and (v[3] == 0)
    m2, v2, nu2, _ = _clip_columns(be, data, good, nsigma, niter, want_var=False)
    assert v2 is None
    np.testing.assert_array_equal(m2, rm)
    np.testing.assert_array_equal(nu2, rnu)
    # with the non-finite samples already out of ``good`` (as good_pixels does)
    fin = good & np.isfinite(data)
    m3, v3, nu3, ng3 = _clip_columns(be, data, fin, nsigma, niter, good_is_finite=True)
    for got, want in zip((m3, v3, nu3, ng3), (rm, rv, rnu, fin.sum(axis=0))):
        np.testing.assert_array_equal(got, want)


def test_clip_columns_checks_parameters_as_clipped_stack():
    be = get_backend("numpy")
    data, good = _awkward_stack(0, 20)
    for kw in (dict(nsigma=0.0), dict(nsigma=np.inf), dict(niter=0)):
        with pytest.raises(InvalidInputError):
            _clip_columns(be, data, good, **{"nsigma": 3.0, "niter": 3, **kw})


def _select_sample(seed: int, n: int):
    """n values with ties, ±0, subnormals, ±inf and huge values; NaNs marked invalid."""
    rng = np.random.default_rng(seed)
    special = np.array(
        [np.inf, -np.inf, np.nan, 3.0e38, 1e-42, -1e-42, 0.0, -0.0], dtype=np.float32
    )
    v = rng.normal(0.0, 3.0, max(n, 16)).astype(np.float32)
    v[::7] = np.round(v[::7])  # ties
    v[: special.size] = special
    v = rng.permutation(v)[:n]
    valid = (rng.random(n) > 0.1) & ~np.isnan(v)
    return v, valid


@pytest.mark.parametrize("seed, n", [(0, 1), (1, 2), (2, 37), (3, 5000)])
def test_radix_select_equals_sorting(seed, n):
    """The device order statistics (run here with NumPy as the array module) pick exactly
    the sorted values, at every rank, for every float class the keys must order."""
    from gpudiff.ops.stats import _radix_select, _radix_select_rows

    v, ok = _select_sample(seed, n)
    ok[0] = True if not np.isnan(v[0]) else ok[0]
    good = np.sort(v[ok]).astype(np.float64)
    if good.size == 0:
        pytest.skip("no valid sample drawn")
    ranks = np.unique(np.r_[0, good.size - 1, np.arange(0, good.size, max(1, good.size // 23))])
    np.testing.assert_array_equal(_radix_select(np, v, ok, ranks), good[ranks])
    # several rows (the row-major histogram), one validity mask
    V = np.stack([v, -v, v * np.float32(0.5)])
    rows = np.repeat(np.arange(3), ranks.size)
    got = _radix_select_rows(np, V, ok, rows, np.tile(ranks, 3))
    want = np.concatenate([np.sort(V[r][ok]).astype(np.float64)[ranks] for r in range(3)])
    np.testing.assert_array_equal(got, want)


def test_clip_columns_layout_does_not_change_the_bits():
    """A transposed view (the device layout of the background bins) gives the C-ordered
    stack's bits: the twin sums in sample order whatever the strides."""
    data, good = _awkward_stack(4)
    be = get_backend("numpy")
    ref = _clip_columns(be, data, good, 3.0, 3)
    got = _clip_columns(be, np.ascontiguousarray(data.T).T, np.ascontiguousarray(good.T).T)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)


def _fake_device_child(out_path: str) -> None:
    """On the strict fake device (a fresh interpreter): the device paths of the deep-column
    statistics, their device calls and syncs, and their results beside the CPU's."""
    import json

    import strict_device as sd

    from gpudiff.ops.stats import _clip_sample, _quantiles

    be = sd.install()
    cpu = get_backend("numpy")
    res: dict = {}

    def count(fn):  # (result, counts), the order the cases below unpack
        c, out = device_harness.count(fn)
        return out, c

    data, good = _awkward_stack(7, 2000, 12)
    d_dev, g_dev = be.asarray(data), be.asarray(good)
    out, res["clip_columns"] = count(lambda: _clip_columns(be, d_dev, g_dev, 3.0, 3))
    ref = _clip_columns(cpu, data, good, 3.0, 3)
    res["clip_columns_same"] = all(
        np.array_equal(be.asnumpy(a), b, equal_nan=a.dtype.kind == "f") for a, b in zip(out, ref)
    )
    rng = np.random.default_rng(3)
    x = rng.normal(5.0, 1.0, 50_000).astype(np.float32)
    x[::97] = 300.0
    excl = rng.random(x.size) < 0.1
    out, res["clip_sample"] = count(
        lambda: _clip_sample(be, be.asarray(x), be.asarray(excl), 3.0, 3)
    )
    ref = _clip_sample(cpu, x, excl, 3.0, 3)
    res["clip_sample"].update(got=list(out), ref=list(ref))
    samples = [x.astype(np.float64), -x, x * 2]
    keep = ~excl
    fr = [(0.25, 0.75), (0.5,), (0.1, 0.5, 0.9)]
    q, res["quantiles"] = count(
        lambda: _quantiles(be, [be.asarray(s) for s in samples], be.asarray(keep), fr)
    )
    res["quantiles"].update(
        got=be.asnumpy(q).tolist(), ref=_quantiles(cpu, samples, keep, fr).tolist()
    )
    res["violations"] = len(sd.VIOLATIONS)
    Path(out_path).write_text(json.dumps(res))


def test_deep_column_statistics_on_the_fake_device(tmp_path):
    """On a (fake) device the deep-column statistics are one registered kernel each plus a
    few calls, one sync at most, with the CPU's numbers (the clip of columns bit for bit;
    the 1-D clip and the quantiles to float32 rounding: float32 order statistics)."""
    res = device_harness.run_child(
        "test_device_stats", "_fake_device_child", tmp_path / "res.json", 300
    )
    assert res["violations"] == 0
    assert res["clip_columns"] == {"calls": 1, "syncs": 0} and res["clip_columns_same"]  # was 88
    cs = res["clip_sample"]
    assert cs["calls"] <= 7 and cs["syncs"] == 1  # was 116 calls
    assert cs["got"][2:] == cs["ref"][2:]  # survivors and valid samples
    np.testing.assert_allclose(cs["got"][:2], cs["ref"][:2], rtol=1e-6)
    qs = res["quantiles"]
    assert qs["calls"] <= 3 and qs["syncs"] == 0  # was 57 calls
    np.testing.assert_allclose(qs["got"], qs["ref"], rtol=1e-6)
