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

from gpudiff.backend import Backend, get_backend
from gpudiff.image import MaskPlanes
from gpudiff.tasks import AssembleCoaddConfig
from gpudiff.tasks.coadd_fused import or_reduce, packed_input_map
from gpudiff.tasks.coadd_stack import CoaddBits, WarpBand, stack_band


class _StackedNumpy(Backend):
    """The NumPy backend (its name dispatches the kernels to their NumPy twins), claiming to
    be a device so that stack_band takes its stacked form."""

    @property
    def is_gpu(self) -> bool:
        return True


def _stacked_numpy() -> Backend:
    be = get_backend("numpy")
    return _StackedNumpy(**{f.name: getattr(be, f.name) for f in dataclasses.fields(be)})


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
    fused = stack_band(_stacked_numpy(), cfg, CoaddBits(planes.copy(), cfg), bands, w)
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
    batched = weigh_inputs(cfg, _stacked_numpy(), warps)
    np.testing.assert_allclose(batched.weights, [w.weight for w in one], rtol=1e-6)
    assert batched.weights[3] == 0 and one[3].reason == "every pixel is NaN"
    assert batched.skipped == {"input 3": "every pixel is NaN"}
    assert np.all(batched.weights[:3] > 0)
