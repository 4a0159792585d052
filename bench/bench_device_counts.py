#!/usr/bin/env python3
"""Count what the GPU path would do, without a GPU: device calls, host syncs, bytes.

Examples::

    python bench/bench_device_counts.py                       # 2048² and 4096² + CompareWarp
    python bench/bench_device_counts.py --sizes 2048 --no-coadd
    python bench/bench_device_counts.py --json counts.json

Runs the library on the strict fake CuPy of ``tests/strict_device.py`` (NumPy underneath)
with its counters on, and prints, per stage and per library function:

- **device calls**: operations that launch device work (ufuncs, ``xp``/``fft``/``ndimage``
  functions, computing array methods, advanced indexing, item assignment, registered
  kernels); views and bare allocations are free; a cuFFT transform counts once;
- **host syncs**: explicit (``get``, ``asnumpy``, ``synchronize``) and implicit (``float``
  / ``bool`` / ``int`` / ``item`` of a device value, boolean-mask indexing, ``nonzero``,
  ``unique``, ``label`` … whose output size the host must learn);
- **bytes**: host→device and device→host transfers, and *touched* (sum of operand and result
  sizes of every device call).

Scenarios: (1) the subtraction + DIA detection of a simulated ``--sizes`` N² pair
(``--stars-per-mpx`` stars, as ``bench_subtract.py``): upload, AlardLuptonSubtractTask.run
(sub-stages: its methods), DetectAndMeasureTask.run, download of the difference; (2) the
CompareWarp coadd of ``--nwarp`` × ``--coadd-size``² warps (``bench_coadd.py``'s warps).

Estimated H200 time (model, stated with every number; additive, no overlap assumed, so an
upper bound when launches hide behind device work): 8 µs per device call (CuPy's Python
launch cost), 10 µs per host sync, touched bytes at 4 TB/s (HBM3e), transfers at 25 GB/s
(PCIe 5, pinned).  Targets (issue 16): 4096² subtraction + DIA ≤ 1,500 calls, ≤ 40 syncs,
≤ 300 MB host↔device after the input upload; 20 × 2048² CompareWarp ≤ 3,000 calls, ≤ 60
syncs.  The counts do not depend on the machine; the wall time of this script (NumPy under
the fake) does.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # strict_device lives with the tests
try:
    import gpudiff  # noqa: F401
except ImportError:  # running from a source checkout without installation
    sys.path.insert(0, str(ROOT))


import strict_device as sd  # noqa: E402

#: (module, class, methods) labelled as stages when present (names may move: missing ones
#: are skipped, their work then counts in the enclosing stage).
STAGE_METHODS = (
    (
        "gpudiff.tasks.subtract",
        "AlardLuptonSubtractTask",
        (
            "_prepare",
            "select_sources",
            "_fit",
            "run_convolve_template",
            "run_convolve_science",
            "finalize",
        ),
    ),
    # Module functions (class None): the input preparation steps, called by name in
    # their module, so the module attribute is what is wrapped.
    (
        "gpudiff.tasks.subtract_inputs",
        None,
        ("interpolate_defects", "mask_cosmic_rays", "scale_variance"),
    ),
    ("gpudiff.tasks.decorrelate", "DecorrelateALKernelTask", ("run",)),
    (
        "gpudiff.tasks.detect_and_measure",
        "DetectAndMeasureTask",
        ("_clean", "_detect", "_mark_cosmic_rays", "_finish"),
    ),
    (
        "gpudiff.tasks.compare_warp",
        "CompareWarpAssembleCoaddTask",
        ("_template_footprints", "find_artifacts", "_filter"),
    ),
    ("gpudiff.tasks.assemble_coadd", "AssembleCoaddTask", ("run",)),
)

#: Short class names in the stage labels.
_SHORT = {
    "AlardLuptonSubtractTask": "AL",
    "DecorrelateALKernelTask": "Decorrelate",
    "DetectAndMeasureTask": "DM",
    "CompareWarpAssembleCoaddTask": "CW",
    "AssembleCoaddTask": "Assemble",
}


def _label_stages():
    import importlib

    for mod_name, cls_name, methods in STAGE_METHODS:
        try:
            mod = importlib.import_module(mod_name)
            cls = mod if cls_name is None else getattr(mod, cls_name)
        except (ImportError, AttributeError):
            continue
        prefix = "AL" if cls_name is None else _SHORT.get(cls_name, cls_name)
        for m in methods:
            f = cls.__dict__.get(m)
            if f is None or getattr(f, "_stage_labelled", False):
                continue

            def wrap(f=f, label=f"{prefix}.{m}"):
                @functools.wraps(f)
                def g(*a, **k):
                    with sd.stage(label):
                        return f(*a, **k)

                g._stage_labelled = True
                return g

            setattr(cls, m, wrap())


#: Issue 16's targets, after the input upload: (calls, syncs, host<->device MB or None).
TARGETS = {"subtraction_4096": (1500, 40, 300.0), "compare_warp_20x2048": (3000, 60, None)}


def _print_targets(key: str, out: dict) -> None:
    """One line: the scenario's totals against issue 16's targets, when it has some."""
    if key not in TARGETS:
        return
    tot, (calls, syncs, mb) = out["total_after_upload"], TARGETS[key]
    got = [("calls", tot["calls"], calls), ("syncs", tot["syncs"], syncs)]
    if mb is not None:
        got.append(("MB", (tot["h2d"] + tot["d2h"]) / 1e6, mb))
    out["targets"] = {k: {"got": v, "target": t, "met": v <= t} for k, v, t in got}
    print(
        f"issue-16 targets ({key}): "
        + ", ".join(f"{k} {v:.0f} <= {t:g} {'met' if v <= t else 'NOT met'}" for k, v, t in got)
    )


def _print_report(title: str, rep: dict, exclude_upload: bool = True) -> dict:
    stages = rep["stages"]
    print(f"\n## {title}")
    print(
        f"{'stage':56s} {'calls':>7s} {'syncs':>6s} {'H2D MB':>8s} {'D2H MB':>8s} "
        f"{'touched GB':>10s} {'est ms':>7s}"
    )
    tot = collections.Counter()
    for lab, c in stages.items():
        est, _ = sd.estimate_seconds(c["calls"], c["syncs"], c["touched"], c["h2d"] + c["d2h"])
        print(
            f"{lab[-56:]:56s} {c['calls']:7d} {c['syncs']:6d} {c['h2d'] / 1e6:8.1f} "
            f"{c['d2h'] / 1e6:8.1f} "
            f"{c['touched'] / 1e9:10.2f} {est * 1e3:7.1f}"
        )
        if not (exclude_upload and lab.startswith("upload")):
            for k in ("calls", "syncs", "h2d", "d2h", "touched"):
                tot[k] += c[k]
    est, parts = sd.estimate_seconds(
        tot["calls"], tot["syncs"], tot["touched"], tot["h2d"] + tot["d2h"]
    )
    print(
        f"{'TOTAL after the input upload':56s} {tot['calls']:7d} {tot['syncs']:6d} "
        f"{tot['h2d'] / 1e6:8.1f} "
        f"{tot['d2h'] / 1e6:8.1f} {tot['touched'] / 1e9:10.2f} {est * 1e3:7.1f}"
    )
    print(
        "estimated H200 ms: "
        + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in parts.items())
        + f"; total {est * 1e3:.1f}"
    )
    by_fn = collections.Counter()
    for (lab, fn), n in sd.COUNTS.func_calls.items():
        by_fn[fn] += n
    sy_fn = collections.Counter()
    for (lab, fn), n in sd.COUNTS.func_syncs.items():
        sy_fn[fn] += n
    kinds = collections.Counter()
    for (lab, kind), n in sd.COUNTS.sync_kinds.items():
        kinds[kind] += n
    print(
        "top functions by device calls: "
        + "; ".join(f"{fn} {n}" for fn, n in by_fn.most_common(15))
    )
    print(
        "top functions by host syncs:   "
        + "; ".join(f"{fn} {n}" for fn, n in sy_fn.most_common(12))
    )
    print("host syncs by kind:            " + "; ".join(f"{k} {n}" for k, n in kinds.most_common()))
    by_stage = collections.defaultdict(dict)
    for (lab, fn), n in sd.COUNTS.func_calls.most_common():
        by_stage[lab][fn] = {"calls": n, "syncs": sd.COUNTS.func_syncs.get((lab, fn), 0)}
    for (lab, fn), n in sd.COUNTS.func_syncs.items():
        by_stage[lab].setdefault(fn, {"calls": 0, "syncs": n})
    return {
        "stages": stages,
        "by_stage_function": by_stage,
        "total_after_upload": dict(tot),
        "estimate_s": est,
        "estimate_parts_s": parts,
        "top_calls": by_fn.most_common(30),
        "top_syncs": sy_fn.most_common(30),
        "sync_kinds": kinds.most_common(),
    }


def subtraction(be, size: int, stars_per_mpx: float, seed: int) -> dict:
    from gpudiff.sim import simulate_pair
    from gpudiff.tasks import (
        AlardLuptonSubtractConfig,
        AlardLuptonSubtractTask,
        DetectAndMeasureTask,
    )

    n_stars = max(10, int(round(stars_per_mpx * size * size / 1e6)))
    t0 = time.perf_counter()
    pair = simulate_pair(
        size=size,
        n_stars=n_stars,
        flux_min=2e3,
        flux_max=5e5,
        science=dict(sky_subtracted=True),
        template=dict(sky_subtracted=True),
        seed=seed,
    )
    t_sim = time.perf_counter() - t0
    t0 = time.perf_counter()
    with sd.counting():
        with sd.stage("upload"):
            sci, tmpl = pair.science.to_backend(be), pair.template.to_backend(be)
        with sd.stage("subtract"):
            res = AlardLuptonSubtractTask(AlardLuptonSubtractConfig(), backend=be).run(tmpl, sci)
        with sd.stage("dia"):
            # As the command line: the science sources flag bright stars' halos and
            # the science image its faint cosmic-ray tracks.
            dm = DetectAndMeasureTask(backend=be).run(
                res.difference, bright_sources=res.science_sources, science=sci, template=tmpl
            )
        with sd.stage("download"):
            dm.subtracted_measured_exposure.to_backend("numpy")
        rep = sd.report()
    out = _print_report(
        f"subtraction + DIA, {size}² ({n_stars} stars; simulated in {t_sim:.0f} s, "
        f"counted run {time.perf_counter() - t0:.0f} s; {len(dm.dia_sources)} DIA sources)",
        rep,
    )
    return out


def compare_warp(be, size: int, nwarp: int, seed: int) -> dict:
    from bench_coadd import make_warps

    from gpudiff.image import Exposure, GaussianPsf
    from gpudiff.tasks.compare_warp import (
        CompareWarpAssembleCoaddConfig,
        CompareWarpAssembleCoaddTask,
    )

    host = make_warps(size, nwarp, seed)
    t0 = time.perf_counter()
    with sd.counting():
        with sd.stage("upload"):
            direct = [
                Exposure.from_arrays(i, v, m, psf=GaussianPsf(sigma=s), backend=be)
                for i, v, m, s in host
            ]
            common = GaussianPsf(sigma=2.2)
            matched = [Exposure(d.masked_image, psf=common) for d in direct]
        with sd.stage("compare_warp"):
            r = CompareWarpAssembleCoaddTask(CompareWarpAssembleCoaddConfig(), backend=be).run(
                direct, matched
            )
        with sd.stage("download"):
            r.coadd_exposure.to_backend("numpy")
        rep = sd.report()
    return _print_report(
        f"CompareWarp, {nwarp} × {size}² (counted run {time.perf_counter() - t0:.0f} s)", rep
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[2048, 4096])
    ap.add_argument("--stars-per-mpx", type=float, default=480.0)
    ap.add_argument("--coadd-size", type=int, default=2048)
    ap.add_argument("--nwarp", type=int, default=20)
    ap.add_argument("--no-coadd", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the counts here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_coadd's warps
    be = sd.install()
    _label_stages()
    print("model: " + ", ".join(f"{k}={v:g}" for k, v in sd.H200_MODEL.items()))
    results = {"model": sd.H200_MODEL}
    for n in args.sizes:
        results[f"subtraction_{n}"] = subtraction(be, n, args.stars_per_mpx, args.seed)
        _print_targets(f"subtraction_{n}", results[f"subtraction_{n}"])
    if not args.no_coadd:
        key = f"compare_warp_{args.nwarp}x{args.coadd_size}"
        results[key] = compare_warp(be, args.coadd_size, args.nwarp, args.seed)
        _print_targets(key, results[key])
    if sd.VIOLATIONS:
        print(
            f"\nWARNING: {len(sd.VIOLATIONS)} device-discipline violations; "
            f"first: {sd.VIOLATIONS[0][0]}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
