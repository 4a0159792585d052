"""The stacked (device) forms of the coadd band reductions equal the per-warp loop.

``stack_band`` walks the warps one at a time on the CPU and reduces the stacked
(N, h, W) band on a device (gpudiff/tasks/coadd_fused.py).  Both run here on NumPy, with
a backend that says it is a GPU for the stacked form, on bands with NaN pixels, infinite
variances, excluded and propagated mask bits and unequal weights: image, variance, mask,
n_image and the contributing inputs must agree bit for bit (the sums along the epoch axis
add the warps in the same order), for every statistic.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from device_harness import numpy_claiming_device

from gpudiff.backend import get_backend
from gpudiff.image import MaskPlanes
from gpudiff.tasks import AssembleCoaddConfig
from gpudiff.tasks.coadd_fused import or_reduce, packed_input_map
from gpudiff.tasks.coadd_stack import CoaddBits, WarpBand, stack_band


def _bands(n, shape=(23, 31), seed=0):
    rng = np.random.default_rng(seed)
    planes = MaskPlanes()
    for p in ("BAD", "SAT", "CR", "NO_DATA", "EDGE", "DETECTED"):
        planes.add(p)
    bands = []
    for k in range(n):
        img = rng.normal(100.0, 5.0, shape).astype(np.float32)
        img[rng.random(shape) < 0.02] += 400.0  # outliers for the clipping
        var = rng.uniform(20.0, 30.0, shape).astype(np.float32)
        mask = np.zeros(shape, np.int32)
        for p, frac in (
            ("BAD", 0.03),
            ("SAT", 0.2),
            ("CR", 0.02),
            ("EDGE", 0.05),
            ("DETECTED", 0.3),
        ):
            mask[rng.random(shape) < frac] |= np.int32(planes.bitmask(p))
        img[rng.random(shape) < 0.02] = np.nan
        var[rng.random(shape) < 0.01] = np.inf
        if k == 1:  # a warp that does not reach half the band
            img[:, : shape[1] // 2] = np.nan
            mask[:, : shape[1] // 2] |= np.int32(planes.bitmask("NO_DATA"))
        bands.append(WarpBand(img, var, mask))
    return planes, bands


@pytest.mark.parametrize("n", [1, 2, 3, 7, 20])
def test_or_reduce_is_the_bitwise_or_of_the_stack(n):
    a = np.random.default_rng(n).integers(0, 2**31 - 1, (n, 5, 6), dtype=np.int32)
    want = np.bitwise_or.reduce(a, axis=0)
    np.testing.assert_array_equal(or_reduce(np, a.copy()), want)


@pytest.mark.parametrize(
    "statistic,online,calc_err",
    [
        ("MEANCLIP", False, False),
        ("MEANCLIP", False, True),
        ("MEAN", False, False),
        ("MEAN", True, True),
        ("MEDIAN", False, False),
    ],
)
def test_stacked_band_equals_the_per_warp_loop(statistic, online, calc_err):
    n = 9
    cfg = AssembleCoaddConfig(
        statistic=statistic,
        do_online_for_mean=online,
        calc_error_from_input_variance=calc_err,
        mask_propagation_thresholds={"SAT": 0.3, "CR": 0.05},
    )
    planes, bands = _bands(n)
    w = np.random.default_rng(5).uniform(0.5, 2.0, n).astype(np.float32)
    loop = stack_band(get_backend("numpy"), cfg, CoaddBits(planes.copy(), cfg), bands, w)
    fused = stack_band(numpy_claiming_device(), cfg, CoaddBits(planes.copy(), cfg), bands, w)
    for f in dataclasses.fields(loop):
        np.testing.assert_array_equal(getattr(fused, f.name), getattr(loop, f.name), f.name)
    # the test exercises what it claims: propagated bits, clipping and empty pixels occur
    bits = CoaddBits(planes.copy(), cfg)
    assert (loop.mask & bits.planes.bitmask("SAT")).any()
    assert (loop.mask & bits.rejected).any()
    assert np.isnan(loop.image).sum() < loop.image.size


def test_packed_input_map_sets_one_bit_per_contributing_input():
    rng = np.random.default_rng(2)
    active = (0, 2, 3, 8, 9, 12, 17)
    valid = rng.random((len(active), 6, 5)) < 0.5
    got = packed_input_map(get_backend("numpy"), valid, active, 18)
    assert got.shape == (3, 6, 5) and got.dtype == np.uint8
    for j, i in enumerate(active):
        np.testing.assert_array_equal((got[i // 8] >> (i % 8)) & 1, valid[j].astype(np.uint8))
    absent = [i for i in range(18) if i not in active]
    for i in absent:
        assert not ((got[i // 8] >> (i % 8)) & 1).any()


def test_batched_warp_weights_equal_the_one_warp_weights():
    """weigh_inputs on a device clips all warps' variance samples as the columns of one
    stack; the weights equal warp_weight's to float32 rounding, for warps of different
    sizes (padded columns), a sampled warp, and an all-NaN warp (weight 0, same reason)."""
    from gpudiff.image import Exposure
    from gpudiff.tasks.coadd_inputs import warp_sources, warp_weight, weigh_inputs

    rng = np.random.default_rng(4)
    planes, _ = _bands(1)
    warps = []
    for k, shape in enumerate([(40, 50), (30, 50), (40, 50), (25, 20)]):
        var = rng.gamma(20.0, 1.0 + k, shape).astype(np.float32)
        var[rng.random(shape) < 0.02] *= 50.0  # outliers the clipping must drop
        img = rng.normal(0.0, 1.0, shape).astype(np.float32)
        if k == 3:
            img[:] = np.nan
        mask = np.where(rng.random(shape) < 0.1, planes.bitmask("BAD"), 0).astype(np.int32)
        warps.append(Exposure.from_arrays(img, var, mask, mask_planes=planes.copy()))
    cfg = AssembleCoaddConfig(max_weight_samples=1000)  # the 40 x 50 warps are sampled
    one = [warp_weight(cfg, get_backend("numpy"), s) for s in warp_sources(warps)]
    batched = weigh_inputs(cfg, numpy_claiming_device(), warps)
    np.testing.assert_allclose(batched.weights, [w.weight for w in one], rtol=1e-6)
    assert batched.weights[3] == 0 and one[3].reason == "every pixel is NaN"
    assert batched.skipped == {"input 3": "every pixel is NaN"}
    assert np.all(batched.weights[:3] > 0)


def _artifact_warps(n=6, shape=(64, 72), seed=8):
    """PSF-matched warps with a static source, transients in single epochs at the top and
    bottom edges (in the stacked layout, warp 0's top row and warp 1's bottom row face
    each other across the empty rows), a satellite-like bar and a no-data corner."""
    from gpudiff.image import Exposure, GaussianPsf

    rng = np.random.default_rng(seed)
    H, W = shape
    yy, xx = np.mgrid[:H, :W]
    planes, _ = _bands(1)

    def blob(x, y, f, s=2.0):
        return f / (2 * np.pi * s * s) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s))

    warps = []
    for k in range(n):
        img = 50.0 + rng.normal(0.0, 3.0, shape) + blob(30, 30, 2e4)
        mask = np.zeros(shape, np.int32)
        if k == 0:  # on the top row, above warp 1's first one across the empty rows
            img += blob(10, H - 1, 3e3)
        if k == 1:
            img += blob(10, 1, 3e3) + blob(20, 1, 3e3)  # two transients on the bottom row
        if k == 2:
            img += blob(60, H - 2, 4e3)  # on the top row
            img[40:42, 5:60] += 80.0  # a trail
        if k == 3:
            img -= blob(50, 12, 3e3)  # a negative one
            img[:8, :8] = np.nan
            mask[:8, :8] = planes.bitmask("NO_DATA")
        warps.append(
            Exposure.from_arrays(
                img.astype(np.float32),
                np.full(shape, 9.0, np.float32),
                mask,
                mask_planes=planes.copy(),
                psf=GaussianPsf(sigma=2.0, size=15),
            )
        )
    return warps


@pytest.mark.parametrize("per_batch", [None, 2, 4])
def test_stacked_artifact_pass_equals_the_per_warp_pass(per_batch, monkeypatch):
    """CompareWarp pass 1 over all warps in one tall layout (or in batches of warps) finds,
    per warp, the same candidate pixels grouped into the same footprints, the same no-data
    pixels and the same count images and statistics as the per-warp pass."""
    from gpudiff.tasks import AssembleCoaddConfig, AssembleCoaddTask, CompareWarpAssembleCoaddTask
    from gpudiff.tasks import compare_warp_stacked
    from gpudiff.tasks.coadd_warps import as_warp
    from gpudiff.tasks.compare_warp_stacked import stacked_warp_artifacts

    if per_batch is not None:
        monkeypatch.setattr(compare_warp_stacked, "MAX_STACK_PIXELS", per_batch * 64 * 72)

    warps = _artifact_warps()
    matched = [as_warp(w, name=f"m{i}") for i, w in enumerate(warps)] + [None]
    model = AssembleCoaddTask(AssembleCoaddConfig(statistic="MEDIAN")).run(matched).coadd_exposure
    task = CompareWarpAssembleCoaddTask(backend="numpy")
    got = stacked_warp_artifacts(task, model, None, matched)
    want = [task._warp_artifacts(model, None, s) if s is not None else None for s in matched]
    assert got.records[-1] is None and want[-1] is None
    n_cand = 0
    for rec, w in zip(got.records[:-1], want[:-1]):
        np.testing.assert_array_equal(rec.indices, w.candidates.indices)
        np.testing.assert_array_equal(rec.no_data, w.candidates.no_data)
        # the same partition of the pixels into footprints (label numbers differ)
        _, a = np.unique(rec.labels, return_inverse=True)
        _, b = np.unique(w.candidates.labels, return_inverse=True)
        np.testing.assert_array_equal(a, b)
        n_cand += w.n_candidates
    assert got.n_candidates == n_cand > 4  # the transients and the trail were found
    assert got.n_prefiltered == sum(w.n_prefiltered for w in want[:-1])
    np.testing.assert_array_equal(got.n_image, sum(w.counted for w in want[:-1]))
    epoch = sum(w.footprints.astype(np.int32) for w in want[:-1] if w.footprints is not None)
    np.testing.assert_array_equal(got.epoch, epoch)
    assert got.records[1].indices.size and got.records[2].indices.size


def test_stacked_artifact_pass_with_variance_scaling_equals_the_per_warp_pass():
    """With ScaleVariance on (the batched factors of scale_variance_many in the stacked
    pass, ScaleVarianceTask.run per warp otherwise), on a backend taking the device paths
    of both: the same candidates, no-data pixels and count images."""
    from gpudiff.tasks import AssembleCoaddConfig, AssembleCoaddTask, CompareWarpAssembleCoaddTask
    from gpudiff.tasks.coadd_warps import as_warp
    from gpudiff.tasks.compare_warp_stacked import stacked_warp_artifacts
    from gpudiff.tasks.scale_variance import ScaleVarianceConfig, ScaleVarianceTask

    be = numpy_claiming_device()
    warps = _artifact_warps()
    for k, w in enumerate(warps):  # variance planes off by different factors
        w.masked_image.variance = w.variance * np.float32(0.5 + 0.4 * k)
    matched = [as_warp(w, name=f"m{i}") for i, w in enumerate(warps)] + [None]
    model = AssembleCoaddTask(AssembleCoaddConfig(statistic="MEDIAN")).run(matched).coadd_exposure
    task = CompareWarpAssembleCoaddTask(backend=be)
    scaler = ScaleVarianceTask(ScaleVarianceConfig(max_samples=1 << 20), backend=be)
    got = stacked_warp_artifacts(task, model, scaler, matched)
    want = [task._warp_artifacts(model, scaler, s) if s is not None else None for s in matched]
    unscaled = stacked_warp_artifacts(task, model, None, matched)
    assert got.records[-1] is None
    for rec, w in zip(got.records[:-1], want[:-1]):
        np.testing.assert_array_equal(rec.indices, w.candidates.indices)
        np.testing.assert_array_equal(rec.no_data, w.candidates.no_data)
        _, a = np.unique(rec.labels, return_inverse=True)
        _, b = np.unique(w.candidates.labels, return_inverse=True)
        np.testing.assert_array_equal(a, b)
    assert got.n_candidates == sum(w.n_candidates for w in want[:-1]) > 4
    np.testing.assert_array_equal(got.n_image, sum(w.counted for w in want[:-1]))
    epoch = sum(w.footprints.astype(np.int32) for w in want[:-1] if w.footprints is not None)
    np.testing.assert_array_equal(got.epoch, epoch)
    # the rescaling changed what was detected (the test would not see a dropped factor)
    assert any(
        r.indices.size != u.indices.size or not np.array_equal(r.indices, u.indices)
        for r, u in zip(got.records[:-1], unscaled.records[:-1])
    )
