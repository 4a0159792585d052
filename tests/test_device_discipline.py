"""Device discipline of every public task, checked on the CPU with a strict fake CuPy.

CI has no GPU, so the CuPy paths of the tasks never run there.  Here each task runs on the
``"cupy"`` backend of :mod:`strict_device` (device arrays that compute with NumPy but
refuse whatever CuPy refuses) and must finish with no refusal recorded.  As a bonus its
results are compared with the NumPy backend's, to the tolerances of ``test_parity.py``:
the fake device computes with NumPy, so they agree far closer than a real GPU would.

The fake backend is installed by patching gpudiff's backend factory, which cannot be
undone, so the cases run in subprocesses (two batches, one per core); each reports per
case its refusals, its error or its comparison failure as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# ----------------------------------------------------------------------------------------
# inputs (small: the whole file must run in well under a minute on two cores)
# ----------------------------------------------------------------------------------------


def _pair():
    from gpudiff.sim import simulate_pair

    return simulate_pair(
        size=256,
        n_stars=150,
        flux_min=2e3,
        flux_max=5e5,
        template_border=20,
        seed=12,
        science=dict(sky_subtracted=True),
        template=dict(sky_subtracted=True),
    )


def _coadd_warps(n=6, shape=(96, 112), xy0=(-23, 17), seed=3):
    """(direct, PSF-matched) warps as in test_assemble_coadd's mock: Gaussian sources on a
    constant background, per-visit PSF σ ~ U(1.5, 3) (matched: 3), a cosmic ray in one."""
    from astropy.io import fits

    from gpudiff.image import Exposure, GaussianPsf, MaskPlanes, PhotoCalib

    rng = np.random.default_rng(seed)
    H, W = shape
    xs, ys = rng.uniform(8, W - 8, 15) + xy0[0], rng.uniform(8, H - 8, 15) + xy0[1]
    fluxes = rng.uniform(1e3, 5e4, 15)
    yy = np.arange(H)[:, None] + xy0[1]
    xx = np.arange(W)[None, :] + xy0[0]
    planes = MaskPlanes()
    det = planes.bitmask("DETECTED")
    direct, matched = [], []
    for k in range(n):
        noise = rng.normal(0.0, 5.0, shape)
        out = []
        for s in (rng.uniform(1.5, 3.0), 3.0):
            img = (
                100.0
                + noise
                + sum(
                    f / (2 * np.pi * s * s) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s))
                    for x, y, f in zip(xs, ys, fluxes)
                )
            )
            if k == 2:
                img[40:43, 50:53] += 3000.0  # an artifact in one epoch
            mask = np.where(img > 125.0, det, 0).astype(np.int32)
            hdr = fits.Header()
            hdr["VISIT"] = 100 + k
            out.append(
                Exposure.from_arrays(
                    img,
                    np.full(shape, 25.0),
                    mask,
                    xy0=xy0,
                    mask_planes=planes,
                    psf=GaussianPsf(sigma=s, size=15),
                    metadata=hdr,
                    photo_calib=PhotoCalib(1.0),
                )
            )
        direct.append(out[0])
        matched.append(out[1])
    return direct, matched


def _tract_warps():
    """A 256² tract (2 × 2 patches of 128 px + 16 px overlap), three visits with planar
    backgrounds, one missing a patch (test_match_backgrounds at a smaller scale)."""
    from astropy.io import fits

    from gpudiff.image import Exposure
    from gpudiff.image.tract import TractGrid

    tract = TractGrid.from_size(256, patch_inner=128, patch_overlap=16)
    visits = {
        1: (0.0, 0.0, 0.0, (0, 1, 2, 3)),
        2: (200.0, 60.0, -30.0, (0, 1, 2, 3)),
        3: (-150.0, -40.0, 80.0, (0, 1, 3)),
    }
    rng = np.random.default_rng(9)
    warps = []
    for visit, (off, gx, gy, patches) in visits.items():
        for p in patches:
            b = tract.outer_box(p)
            xx = np.arange(b.x0, b.x1)[None, :] / 256.0
            yy = np.arange(b.y0, b.y1)[:, None] / 256.0
            img = off + gx * xx + gy * yy + rng.normal(0, 10.0, b.shape)
            hdr = fits.Header()
            hdr["VISIT"] = visit
            warps.append(
                Exposure.from_arrays(
                    img.astype(np.float32),
                    np.full(b.shape, 100.0),
                    xy0=(b.x0, b.y0),
                    metadata=hdr,
                    backend="numpy",
                )
            )
    return warps, tract


# ----------------------------------------------------------------------------------------
# cases: name → run(backend, inputs) returning {label: result}; the results of the two
# backends are compared label by label
# ----------------------------------------------------------------------------------------


def _subtract(mode):
    def run(be, inp):
        from gpudiff.tasks import AlardLuptonSubtractConfig, AlardLuptonSubtractTask

        p = inp["pair"]
        r = AlardLuptonSubtractTask(AlardLuptonSubtractConfig(mode=mode), backend=be).run(
            template=p.template.to_backend(be), science=p.science.to_backend(be)
        )
        return {"difference": r.difference, "matched_template": r.matched_template}

    return run


def _preconvolve(be, inp):
    from gpudiff.tasks import AlardLuptonPreconvolveSubtractTask

    p = inp["pair"]
    r = AlardLuptonPreconvolveSubtractTask(backend=be).run(
        template=p.template.to_backend(be), science=p.science.to_backend(be)
    )
    return {"score": r.score_exposure}


def _image_psf_match(be, inp):
    from gpudiff.tasks import ImagePsfMatchTask

    p = inp["pair"]
    r = ImagePsfMatchTask(backend=be).subtract_exposures(
        p.template.to_backend(be), p.science.to_backend(be)
    )
    return {"subtracted": r.subtracted_exposure}


def _model_psf_match(be, inp):
    from gpudiff import GaussianPsf
    from gpudiff.tasks import ModelPsfMatchTask

    r = ModelPsfMatchTask(backend=be).run(inp["pair"].science.to_backend(be), GaussianPsf(fwhm=4.5))
    return {"matched": r.psf_matched_exposure}


def _detect_and_measure(be, inp):
    from gpudiff.tasks import DetectAndMeasureTask

    r = DetectAndMeasureTask(backend=be).run(inp["difference"].to_backend(be))
    return {"dia_sources": r.dia_sources, "measured": r.subtracted_measured_exposure}


def _scale_variance(be, inp):
    from gpudiff.tasks import ScaleVarianceTask

    return {"factor": float(ScaleVarianceTask(backend=be).run(inp["pair"].science.to_backend(be)))}


def _assemble(statistic, on_device):
    def run(be, inp):
        from gpudiff.tasks import AssembleCoaddConfig, AssembleCoaddTask

        direct, _ = inp["coadd"]
        warps = [w.to_backend(be) for w in direct] if on_device else direct
        r = AssembleCoaddTask(
            AssembleCoaddConfig(statistic=statistic, do_n_image=True, do_input_map=True), backend=be
        ).run(warps)
        return {"coadd": r.coadd_exposure, "n_image": r.n_image, "input_map": r.input_map}

    return run


def _compare_warp(be, inp):
    from gpudiff.tasks import CompareWarpAssembleCoaddTask

    direct, matched = inp["coadd"]
    r = CompareWarpAssembleCoaddTask(backend=be).run(
        [w.to_backend(be) for w in direct], [w.to_backend(be) for w in matched]
    )
    return {
        "coadd": r.coadd_exposure,
        "epoch_count": r.epoch_count_image,
        "clipped": [None if m is None else m.get("CLIPPED") for m in r.alt_mask_list],
    }


def _match_backgrounds(be, inp):
    from gpudiff.tasks import MatchBackgroundsConfig, MatchBackgroundsTask
    from gpudiff.tasks.tract_background import TractBackgroundConfig

    warps, tract = inp["tract"]
    cfg = MatchBackgroundsConfig(tract_bg_model=TractBackgroundConfig(x_bin=32, y_bin=32))
    r = MatchBackgroundsTask(cfg, backend=be).run([w.to_backend(be) for w in warps], tract)
    return {
        "reference_visit": r.reference_visit,
        "matched": r.matched_image_list,
        "models": [b.model for b in r.background_info_list],
    }


def _match_background_pair(use_polynomial):
    def run(be, inp):
        from gpudiff.image import MaskedImage
        from gpudiff.tasks import BackgroundMatchPairConfig, match_background_pair

        rng = np.random.default_rng(4)
        yy, xx = np.mgrid[0:256, 0:256] / 256.0
        ref = rng.normal(0.0, 1.0, (256, 256)) + 50.0
        sci = rng.normal(0.0, 1.0, (256, 256)) + 20.0 + 5.0 * xx - 3.0 * yy * xx
        sci[:, 100:130] = np.nan
        mask = np.zeros((256, 256), np.int32)
        mask[:, 100:130] = 1 << 8  # NO_DATA
        cfg = BackgroundMatchPairConfig(use_polynomial=use_polynomial, bin_size=32, order=4)
        r = match_background_pair(
            MaskedImage(ref, np.ones_like(ref), backend=be),
            MaskedImage(sci, np.ones_like(sci), mask, backend=be),
            cfg,
        )
        return {
            "model": r.background_model,
            "matched": r.matched,
            "fit_rms": r.fit_rms,
            "matched_mse": r.matched_mse,
        }

    return run


CASES = {
    "AlardLuptonSubtract[convolveTemplate]": (_subtract("convolveTemplate"), ("pair",)),
    "AlardLuptonSubtract[convolveScience]": (_subtract("convolveScience"), ("pair",)),
    "AlardLuptonPreconvolveSubtract": (_preconvolve, ("pair",)),
    "ImagePsfMatch.subtract_exposures": (_image_psf_match, ("pair",)),
    "ModelPsfMatch": (_model_psf_match, ("pair",)),
    "DetectAndMeasure": (_detect_and_measure, ("difference",)),
    "ScaleVariance": (_scale_variance, ("pair",)),
    "AssembleCoadd[MEANCLIP]": (_assemble("MEANCLIP", True), ("coadd",)),
    "AssembleCoadd[MEDIAN,host warps]": (_assemble("MEDIAN", False), ("coadd",)),
    "CompareWarpAssembleCoadd": (_compare_warp, ("coadd",)),
    "MatchBackgrounds": (_match_backgrounds, ("tract",)),
    "match_background_pair[spline]": (_match_background_pair(False), ()),
    "match_background_pair[polynomial]": (_match_background_pair(True), ()),
}

#: Two batches of about equal cost, run side by side (one per core).
BATCHES = (
    (
        "AlardLuptonSubtract[convolveTemplate]",
        "AlardLuptonSubtract[convolveScience]",
        "AlardLuptonPreconvolveSubtract",
        "ImagePsfMatch.subtract_exposures",
        "DetectAndMeasure",
    ),
    (
        "ModelPsfMatch",
        "ScaleVariance",
        "AssembleCoadd[MEANCLIP]",
        "AssembleCoadd[MEDIAN,host warps]",
        "CompareWarpAssembleCoadd",
        "MatchBackgrounds",
        "match_background_pair[spline]",
        "match_background_pair[polynomial]",
    ),
)

# ----------------------------------------------------------------------------------------
# comparison (test_parity's tolerances)
# ----------------------------------------------------------------------------------------


def _host(be, v):
    """A result of backend ``be`` on the host, through the library's own transfers."""
    from gpudiff.image import Exposure, MaskedImage

    if isinstance(v, (Exposure, MaskedImage)):
        return v.to_backend("numpy")
    if isinstance(v, (list, tuple)):
        return [_host(be, x) for x in v]
    if v is None or isinstance(v, (int, float, str)) or type(v).__name__ == "Table":
        return v
    return be.asnumpy(v)


def _compare(a, b, what):
    from astropy.table import Table
    from test_parity import _assert_close, _assert_exposure_close

    from gpudiff.image import Exposure, MaskedImage

    if isinstance(a, MaskedImage):
        a, b = Exposure(a), Exposure(b)
    if isinstance(a, Exposure):
        _assert_exposure_close(a, b, what)
    elif isinstance(a, list):
        assert len(a) == len(b), f"{what}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            _compare(x, y, f"{what}[{i}]")
    elif isinstance(a, Table):
        assert len(a) == len(b), f"{what}: {len(a)} vs {len(b)} rows"
        for col in ("x", "y"):
            if col in a.colnames:
                np.testing.assert_allclose(
                    np.sort(a[col]), np.sort(b[col]), atol=1e-3, err_msg=f"{what}.{col}"
                )
    elif isinstance(a, float):
        assert abs(a - b) <= 1e-5 * abs(a), f"{what}: {a} vs {b}"
    elif isinstance(a, np.ndarray):
        _assert_close(a, b, what)
    else:
        assert a == b, f"{what}: {a!r} vs {b!r}"


# ----------------------------------------------------------------------------------------
# the subprocess side
# ----------------------------------------------------------------------------------------


def _self_check(be):
    """Patterns the fake must refuse (as CuPy does) and must accept; returns the misjudged."""
    import strict_device

    xp, host = be.xp, np.arange(6.0).reshape(2, 3)
    dev = be.asarray(host)
    refused = {
        "np.asarray(device)": lambda: np.asarray(dev),
        "device + host array": lambda: dev + host,
        "xp.maximum(device, host)": lambda: xp.maximum(dev, host),
        "host[device index]": lambda: host[be.asarray(np.array([0, 1]))],
        "device[basic slice] = host array": lambda: dev.__setitem__(slice(0, 1), host[:1]),
        "fft with workers=": lambda: be.fft.rfft2(dev, workers=-1),
        "binary_dilation(structure=host)": lambda: be.ndimage.binary_dilation(
            dev > 2, structure=np.ones((3, 3))
        ),
        # CuPy's ufuncs take out/dtype/casting only, its reductions no where=/initial=,
        # and only some ufuncs have reduce/accumulate/at (cupy/_core/_kernel.pyx)
        "xp.add(..., where=)": lambda: xp.add(dev, 1.0, out=dev, where=dev > 2),
        "ufunc(device, where=)": lambda: np.add(dev, dev, where=dev > 2),
        "device.sum(where=)": lambda: dev.sum(where=dev > 2),
        "xp.max(initial=)": lambda: xp.max(dev, initial=0.0),
        "xp.maximum.reduce": lambda: xp.maximum.reduce(dev),
        "np.bitwise_or.reduce(device)": lambda: np.bitwise_or.reduce(dev > 2),
        "xp.logical_or.at": lambda: xp.logical_or.at(dev > 2, be.asarray(np.array([0])), True),
        # CuPy 13: v must be a cupy.ndarray (cupy/_sorting/search.py)
        "xp.searchsorted(device, scalar)": lambda: xp.searchsorted(dev[0], 1.5),
    }
    accepted = {
        "device[host index]": lambda: dev[np.array([1, 0])],
        "device[host mask] = host values": lambda: dev.__setitem__(host > 2, host[host > 2]),
        "device * numpy scalar": lambda: dev * np.float32(2),
        "xp.asarray(host)": lambda: xp.asarray(host),
        "label(structure=host)": lambda: be.ndimage.label(dev > 2, structure=np.ones((3, 3))),
        "float(device reduction)": lambda: float(dev.sum()),
        "xp.add(..., out=, dtype=)": lambda: xp.add(dev, 1.0, out=dev, dtype=np.float64),
        "xp.add.reduce": lambda: xp.add.reduce(dev, axis=0),
        "xp.add.at": lambda: xp.add.at(dev[0], be.asarray(np.array([0, 0])), 1.0),
        "xp.searchsorted(device, device)": lambda: xp.searchsorted(dev[0], dev[1]),
    }
    wrong = []
    for what, f in refused.items():
        try:
            f()
            wrong.append(f"not refused: {what}")
        except TypeError:
            pass
    for what, f in accepted.items():
        try:
            f()
        except TypeError as exc:
            wrong.append(f"refused: {what} ({exc})")
    del strict_device.VIOLATIONS[:]
    return wrong


def _child(names, out_path):
    """Run ``names`` on NumPy and on the strict fake CuPy; write a JSON report."""
    import strict_device

    from gpudiff.backend import get_backend

    fake = strict_device.install()
    numpy_be = get_backend("numpy")
    assert get_backend("cupy") is fake
    inputs = {}

    def need(key):
        if key not in inputs:
            if key == "pair":
                inputs[key] = _pair()
            elif key == "difference":
                from gpudiff.tasks import AlardLuptonSubtractTask

                p = need("pair")
                inputs[key] = (
                    AlardLuptonSubtractTask(backend="numpy")
                    .run(template=p.template, science=p.science)
                    .difference
                )
            elif key == "coadd":
                inputs[key] = _coadd_warps()
            elif key == "tract":
                inputs[key] = _tract_warps()
        return inputs[key]

    report = {"_self_check": _self_check(fake)}
    for name in names:
        run, keys = CASES[name]
        for k in keys:
            need(k)
        entry = {"violations": [], "error": None, "mismatch": None}
        t0 = time.perf_counter()
        try:
            ref = {k: _host(numpy_be, v) for k, v in run(numpy_be, inputs).items()}
        except Exception:  # the inputs, not the device: report it as the case's error
            entry["error"] = "the NumPy reference run failed:\n" + traceback.format_exc(limit=12)
            report[name] = entry
            continue
        n0 = len(strict_device.VIOLATIONS)
        try:
            got = {k: _host(fake, v) for k, v in run(fake, inputs).items()}
        except Exception:
            entry["error"] = traceback.format_exc(limit=12)
            got = None
        entry["violations"] = [f"{msg}\n{stack}" for msg, stack in strict_device.VIOLATIONS[n0:]]
        if got is not None:
            try:
                for k in ref:
                    _compare(ref[k], got[k], f"{name}.{k}")
            except AssertionError as exc:
                entry["mismatch"] = str(exc)
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        report[name] = entry
    report["_all_violations"] = len(strict_device.VIOLATIONS)
    Path(out_path).write_text(json.dumps(report))


# ----------------------------------------------------------------------------------------
# the pytest side
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reports():
    """Run the batches side by side, each in a fresh interpreter; merge their reports."""
    env = dict(os.environ)
    extra = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS)] + extra)
    env.pop("GPUDIFF_BACKEND", None)
    env.setdefault("OMP_NUM_THREADS", "1")  # two processes on two cores: no oversubscription
    merged = {"_all_violations": 0, "_self_check": []}
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        try:
            for i, names in enumerate(BATCHES):
                out = Path(tmp) / f"batch{i}.json"
                code = (
                    f"import test_device_discipline as t; t._child({list(names)!r}, {str(out)!r})"
                )
                procs.append(
                    (
                        out,
                        subprocess.Popen(
                            [sys.executable, "-c", code],
                            cwd=str(ROOT),
                            env=env,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            text=True,
                        ),
                    )
                )
            for out, proc in procs:
                log, _ = proc.communicate(timeout=300)
                assert proc.returncode == 0, (
                    f"device-discipline subprocess failed (exit {proc.returncode}):\n{log[-6000:]}"
                )
                batch = json.loads(out.read_text())
                merged["_all_violations"] += batch.pop("_all_violations")
                merged["_self_check"] += batch.pop("_self_check")
                merged.update(batch)
        finally:
            for _, proc in procs:  # only on a failure above: never leave a batch running
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return merged


def test_batches_cover_every_case():
    assert sorted(n for b in BATCHES for n in b) == sorted(CASES)


def test_the_fake_refuses_what_cupy_refuses(reports):
    """The harness itself: a lenient fake would pass every task vacuously."""
    assert not reports["_self_check"], reports["_self_check"]


def test_no_violation_outside_the_cases(reports):
    """Every refusal is attributed to a case (none while building inputs or comparing)."""
    per_case = sum(len(r["violations"]) for k, r in reports.items() if not k.startswith("_"))
    assert reports["_all_violations"] == per_case


@pytest.mark.parametrize("name", list(CASES))
def test_device_discipline(reports, name):
    r = reports[name]
    assert not r["violations"], (
        f"{name}: {len(r['violations'])} device violation(s); first:\n{r['violations'][0]}"
    )
    assert r["error"] is None, f"{name} failed on the strict device:\n{r['error']}"
    assert r["mismatch"] is None, f"{name}: results differ from the NumPy backend: {r['mismatch']}"


# ----------------------------------------------------------------------------------------
# the counting device (bench/bench_device_counts.py measures GPU cost with it)
# ----------------------------------------------------------------------------------------


def test_counting_device_counts_calls_syncs_and_bytes():
    """Exact counts on a known sequence: a counter that misses launches or syncs would
    make every estimate in bench/NOTES.md optimistic."""
    import strict_device as sd

    be = sd.make_backend()  # no install(): nothing global is patched
    host = np.ones((64, 64), np.float32)  # 16384 bytes
    with sd.counting():
        with sd.stage("known"):
            x = be.asarray(host)  # host→device 16384 B, no launch
            y = x * 2 + 1  # 2 launches
            _ = y.reshape(-1)[:10], y.T  # views: free
            f = float(y.sum())  # 1 launch + 1 sync (4 B)
            m = y[y > 2]  # compare + masked gather: 2 launches, 1 sync (size)
            h = be.asnumpy(y)  # 1 sync, 16384 B back
            with sd.stage("inner"):
                y[0, 0] = 5.0  # an item assignment is a launch
        rep = sd.report()
    assert f == 3.0 * 4096 and m.shape == (4096,) and h.shape == (64, 64)
    known, inner = rep["stages"]["known"], rep["stages"]["known/inner"]
    assert (known["calls"], known["syncs"], known["h2d"]) == (5, 3, 16384)
    assert known["d2h"] == 16384 + 4 + 8  # asnumpy, the float, the mask's size
    assert known["touched"] >= 5 * 16384
    assert (inner["calls"], inner["syncs"]) == (1, 0)
    kinds = dict((k[1], n) for k, n in rep["sync_kinds"])
    assert kinds == {"scalar to host": 1, "boolean-mask index": 1, "get / asnumpy": 1}
    # counting is off outside the block
    _ = y + 1
    assert sd.report()["stages"]["known"]["calls"] == 5


def test_counting_device_attributes_calls_to_library_functions():
    import strict_device as sd

    from gpudiff.ops.stats import gather_stamps

    be = sd.make_backend()
    img = be.asarray(np.arange(100.0, dtype=np.float32).reshape(10, 10))
    with sd.counting():
        with sd.stage("stamps"):
            gather_stamps(be, img, np.array([2, 5]), np.array([3, 9]), 1)
        rep = sd.report()
    calls = dict(((lab, fn), n) for (lab, fn), n in rep["top_calls"])
    # every launch of the gather is attributed to the innermost library function: its
    # index helper and the shared gather (the host index upload is not a launch)
    assert set(calls) == {
        ("stamps", "gpudiff.ops.stats:_stamp_index"),
        ("stamps", "gpudiff.ops.stats:gather_stamps_many"),
    }
    n_calls = sum(calls.values())
    assert n_calls == rep["stages"]["stamps"]["calls"]
    # Counted, not merely attributed: the index of host centres is six launches (offsets,
    # clip, the inside test and its outer product, the flat index's scale and sum; the
    # centres' upload is free), the gather and the fill one each.  A counter that missed
    # the computing calls (or counted the free views) would not give these.
    assert calls[("stamps", "gpudiff.ops.stats:_stamp_index")] == 6
    assert calls[("stamps", "gpudiff.ops.stats:gather_stamps_many")] == 2
    assert rep["stages"]["stamps"]["syncs"] == 0  # no data-dependent size, no scalar read
    total, parts = sd.estimate_seconds(1000, 10, 4e9, 25e6)
    # the stated model: 8 ms of launches, 0.1 ms of syncs, 1 ms of HBM, 1 ms of PCIe
    assert parts == pytest.approx({"launch": 8e-3, "sync": 1e-4, "hbm": 1e-3, "pcie": 1e-3})
    assert total == pytest.approx(sum(parts.values()))
