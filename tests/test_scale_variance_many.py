"""ScaleVarianceTask on many images at once (gpudiff/tasks/scale_variance_many.py) equals the
per-image method, and costs two host syncs for the whole batch on a device.

The batched form runs on NumPy with a backend that claims to be a device (as
tests/test_coadd_fused.py does): the registered kernels then run their NumPy twins, and
the per-image method on the same backend takes its device path, so both must agree bit
for bit.  Against the plain CPU path (float64 selection instead of the float32 order
statistics of the ``quantile_columns`` kernel) they agree to float32 rounding.  The sync
count is measured on the strict fake device of tests/strict_device.py, in a subprocess.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from device_harness import numpy_claiming_device, run_child

import numpy as np
import pytest

from gpudiff.errors import ExceedsMaxVarianceScaleError
from gpudiff.image import MaskedImage, MaskPlanes
from gpudiff.tasks.scale_variance import (
    ScaleVarianceBackgroundConfig,
    ScaleVarianceConfig,
    ScaleVarianceTask,
)
from gpudiff.tasks.scale_variance_many import compute_scale_factors_many, run_many


def _images(shape=(96, 80), seed=0, backend="numpy"):
    """Images with a sloped sky, sources, NaNs, masked and bad-variance pixels; image 2 has
    its planes in another order (another bitmask), image 3 no usable background bin, image
    4 fewer than two good pixels."""
    rng = np.random.default_rng(seed)
    H, W = shape
    yy, xx = np.mgrid[:H, :W]
    out = []
    for k in range(5):
        planes = MaskPlanes()
        names = ["BAD", "SAT", "DETECTED", "NO_DATA", "INTRP", "DETECTED_NEGATIVE", "EDGE"]
        for p in names[::-1] if k == 2 else names:
            planes.add(p)
        sigma = 3.0 + k
        img = rng.normal(0.0, sigma, shape) + 20.0 + 0.05 * xx - 0.03 * yy
        img[rng.random(shape) < 0.003] += 300.0  # sources for the clipping
        var = np.full(shape, (sigma * (0.8 + 0.1 * k)) ** 2)
        mask = np.zeros(shape, np.int32)
        mask[rng.random(shape) < 0.05] |= planes.bitmask("DETECTED")
        mask[rng.random(shape) < 0.02] |= planes.bitmask("BAD")
        img[rng.random(shape) < 0.01] = np.nan
        var[rng.random(shape) < 0.01] = 0.0
        if k == 3:  # every bin below the usable fraction: a constant background
            mask[rng.random(shape) < 0.95] |= planes.bitmask("SAT")
        if k == 4:
            mask[:] |= planes.bitmask("NO_DATA")
            mask[4, 4], img[4, 4], var[4, 4] = 0, 20.0, sigma**2  # kept by the decimation
        out.append(
            MaskedImage(
                img.astype(np.float32),
                var.astype(np.float32),
                mask,
                mask_planes=planes,
                backend=backend,
            )
        )
    return out


def _config(max_samples=None):
    return ScaleVarianceConfig(
        background=ScaleVarianceBackgroundConfig(bin_size=16), max_samples=max_samples
    )


@pytest.mark.parametrize("max_samples", [None, 2048])
@pytest.mark.parametrize("algorithm", ["AKIMA_SPLINE", "LINEAR"])
def test_batched_factors_equal_the_per_image_device_path(max_samples, algorithm):
    be = numpy_claiming_device()
    cfg = dataclasses.replace(
        _config(max_samples),
        background=ScaleVarianceBackgroundConfig(bin_size=16, algorithm=algorithm),
    )
    task = ScaleVarianceTask(cfg, backend=be)
    images = _images(backend=be)
    got = compute_scale_factors_many(task, images)
    want = [task.compute_scale_factors(mi) for mi in images]
    assert len(got) == len(images)
    for g, w in zip(got, want):
        assert g.n_good == w.n_good
        np.testing.assert_array_equal(
            [g.pixel_factor, g.image_factor], [w.pixel_factor, w.image_factor]
        )
    assert got[4].n_good == 1 and np.isnan(got[4].pixel_factor)
    assert all(np.isfinite(g.pixel_factor) for g in got[:4])


def test_batched_factors_match_the_cpu_path_to_float32_rounding():
    """The CPU per-image path selects the quartiles of the float64 values; the device
    kernels those of their float32 roundings: the factors agree to ~1e-6."""
    task_cpu = ScaleVarianceTask(_config(), backend="numpy")
    be = numpy_claiming_device()
    got = compute_scale_factors_many(ScaleVarianceTask(_config(), backend=be), _images(backend=be))
    want = [task_cpu.compute_scale_factors(mi) for mi in _images()]
    for g, w in zip(got[:4], want[:4]):
        assert g.n_good == w.n_good
        np.testing.assert_allclose(
            [g.pixel_factor, g.image_factor], [w.pixel_factor, w.image_factor], rtol=1e-5
        )
    # on the CPU the batched function is the per-image method itself
    cpu = compute_scale_factors_many(task_cpu, _images())
    for g, w in zip(cpu, want):
        np.testing.assert_array_equal(
            [g.pixel_factor, g.image_factor, g.n_good], [w.pixel_factor, w.image_factor, w.n_good]
        )


def test_run_many_returns_the_factor_or_the_error_of_each_image():
    be = numpy_claiming_device()
    task = ScaleVarianceTask(_config(), backend=be)
    images = _images(backend=be)
    # a variance plane 100x too small: both factors far above the limit
    images[1] = MaskedImage(
        images[1].image,
        images[1].variance / np.float32(100.0),
        images[1].mask,
        mask_planes=images[1].mask_planes,
        backend=be,
    )
    got = run_many(task, images)
    assert isinstance(got[1], ExceedsMaxVarianceScaleError)
    with pytest.raises(ExceedsMaxVarianceScaleError):
        task.run(images[1])
    assert got[4] == 1.0  # fewer than two good pixels
    for k in (0, 2, 3):
        assert got[k] == task.run(images[k])


def _child(out_path: str) -> None:
    """In a fresh interpreter: the syncs and calls of the batched and per-image forms on the
    strict fake device, and their results."""
    import strict_device as sd

    be = sd.install()
    task = ScaleVarianceTask(_config(max_samples=2048), backend=be)
    images = _images(backend=be)
    res = {}
    for name, fn in (
        ("many", lambda: compute_scale_factors_many(task, images)),
        ("each", lambda: [task.compute_scale_factors(mi) for mi in images]),
    ):
        with sd.counting():
            with sd.stage("x"):
                f = fn()
            st = sd.report()["stages"]["x"]
        res[name] = {
            "calls": st["calls"],
            "syncs": st["syncs"],
            "factors": [[x.pixel_factor, x.image_factor, x.n_good] for x in f],
        }
    res["violations"] = len(sd.VIOLATIONS)
    Path(out_path).write_text(json.dumps(res))


#: Host syncs of compute_scale_factors_many for one batch: the bins, then the quartiles
#: with the good-pixel counts.
BATCH_SYNCS = 2


def test_batched_factors_cost_two_host_syncs_on_a_device(tmp_path):
    res = run_child("test_scale_variance_many", "_child", tmp_path / "counts.json")
    assert res["violations"] == 0
    assert res["many"]["syncs"] == BATCH_SYNCS
    assert res["each"]["syncs"] == 2 * 5  # two per image: what the batch saves
    assert res["many"]["calls"] < res["each"]["calls"]
    np.testing.assert_array_equal(
        np.array(res["many"]["factors"], dtype=float), np.array(res["each"]["factors"], dtype=float)
    )
