#!/usr/bin/env python3
"""Benchmark the whole image subtraction, stage by stage, per backend and image size.

Examples::

    python bench/bench_subtract.py --backend numpy
    python bench/bench_subtract.py --backend all --sizes 2048 4096 --repeat 3

For each ``--sizes`` N a N² science/template pair is simulated with
:func:`gpudiff.sim.simulate_pair` (sky-subtracted; science Gaussian FWHM 3.5 px, template
2.5 px; ``--stars-per-mpx`` stars of 2e3–5e5 ADU; 5 transients) and written to FITS.  One
end-to-end run is what ``gpudiff subtract SCI TMPL -o DIFF --sources-out CAT`` does:

1. **read**: both FITS files (:func:`gpudiff.image.read_exposure`);
2. :class:`AlardLuptonSubtractTask` ``run(template, science)`` with the default config
   (convolveTemplate, decorrelation and variance scaling on, no kernel-source catalog, so
   the kernel sources are detected on the science image), whose ``time_*`` metadata give
   **source selection** (detection + selection), **kernel fit**, **convolution** (+
   subtraction) and **decorrelation**; the rest of ``time_total`` is **prepare**
   (coverage, ScaleVarianceTask on both images, mask updates);
3. **detection**: :class:`DetectAndMeasureTask` on the difference (timed here);
4. **write**: the difference (LSST layout with its PSF) and the DIA catalog (ECSV).

Every size and backend runs once untimed (warm-up: FFT plans, CUDA module compilation),
then ``--repeat`` timed runs bracketed by ``backend.synchronize()``; the table shows the
median of each stage and of the end-to-end time.  On CuPy the stage times inside the task
are read without synchronizing, so work still queued on the device may be counted in a
later stage; the end-to-end time is exact.

Target (2 CPU cores, NumPy): a 4096² pair end to end in ≤ 5 s.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _timing import time_call  # noqa: E402  (sibling module of the bench scripts)

try:
    import gpudiff  # noqa: F401
except ImportError:  # running from a source checkout without installation
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpudiff.backend import available_backends, get_backend
from gpudiff.backend.threads import blas_threads
from gpudiff.image import read_exposure
from gpudiff.sim import simulate_pair
from gpudiff.tasks import AlardLuptonSubtractConfig, AlardLuptonSubtractTask, DetectAndMeasureTask

#: End-to-end target on 2 CPU cores with NumPy (seconds) at the reference size.
TARGET_S, TARGET_SIZE = 5.0, 4096

STAGES = (
    "read",
    "source selection",
    "kernel fit",
    "convolution",
    "decorrelation",
    "prepare",
    "detection",
    "write",
)
_META = {
    "source selection": "time_source_selection",
    "kernel fit": "time_kernel_fit",
    "convolution": "time_convolution",
    "decorrelation": "time_decorrelation",
}


def make_files(size: int, stars_per_mpx: float, seed: int, folder: Path):
    """Simulate a size² pair, write it to FITS; return (science path, template path, info)."""
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
    sci, tmpl = folder / f"science_{size}.fits", folder / f"template_{size}.fits"
    pair.science.write(sci, overwrite=True)
    pair.template.write(tmpl, overwrite=True)
    return sci, tmpl, f"{size}² pair, {n_stars} stars, simulated in {t_sim:.1f} s"


def run_backend(name: str, size: int, sci: Path, tmpl: Path, folder: Path, repeat: int) -> dict:
    """Median stage times (s) of ``repeat`` end-to-end runs on backend ``name``."""
    be = get_backend(name)
    task = AlardLuptonSubtractTask(AlardLuptonSubtractConfig(), backend=be)
    detect = DetectAndMeasureTask(backend=be)
    out, cat = folder / f"diff_{size}_{name}.fits", folder / f"dia_{size}_{name}.ecsv"
    records: list[dict] = []
    info: dict = {}

    def once():
        rec = {}
        t = time.perf_counter()
        science = read_exposure(sci, backend=be)
        template = read_exposure(tmpl, backend=be)
        be.synchronize()
        rec["read"] = time.perf_counter() - t
        t = time.perf_counter()
        res = task.run(template, science)
        be.synchronize()
        rec["subtract"] = time.perf_counter() - t
        m = res.metadata
        for stage, key in _META.items():
            rec[stage] = float(m.get(key, 0.0))
        rec["prepare"] = max(0.0, float(m["time_total"]) - sum(rec[s] for s in _META))
        t = time.perf_counter()
        dm = detect.run(res.difference)
        be.synchronize()
        rec["detection"] = time.perf_counter() - t
        t = time.perf_counter()
        dm.subtracted_measured_exposure.to_backend("numpy").write(out, overwrite=True)
        dm.dia_sources.write(cat, format="ascii.ecsv", overwrite=True)
        rec["write"] = time.perf_counter() - t
        records.append(rec)
        info.update(
            mode=m["mode"],
            used=m["n_candidates_used"],
            selected=m["n_kernel_sources"],
            ksum=m["kernel_sum"],
            dia=len(dm.dia_sources),
        )

    totals = time_call(be, once, repeat)
    timed = records[-repeat:]
    med = {s: statistics.median(r[s] for r in timed) for s in (*STAGES, "subtract")}
    med["end-to-end"] = statistics.median(totals)
    print(
        f"  {name:6s} {size}²: end-to-end {med['end-to-end']:.2f} s (median of {repeat}); "
        f"{info['mode']}, "
        f"{info['selected']} kernel sources selected, {info['used']} used, kernel sum "
        f"{info['ksum']:.4f}, "
        f"{info['dia']} DIA sources",
        flush=True,
    )
    return med


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--backend",
        choices=("numpy", "cupy", "all"),
        default="all",
        help="backend(s) to time; 'all' = every backend available here (default)",
    )
    ap.add_argument(
        "--sizes", type=int, nargs="+", default=[2048, 4096], help="image sides (default 2048 4096)"
    )
    ap.add_argument(
        "--repeat", type=int, default=3, help="timed runs per size and backend (default 3)"
    )
    ap.add_argument(
        "--stars-per-mpx",
        type=float,
        default=480.0,
        help="stars per million pixels (default 480: ~2000 on 2048², ~8000 on 4096²)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--blas-threads",
        type=int,
        default=1,
        help="OpenBLAS threads during the runs (default 1, as `gpudiff subtract` sets them: "
        "its pools and FFT workers already keep the cores busy; 0 = leave OpenBLAS's own)",
    )
    args = ap.parse_args(argv)
    if args.repeat < 1 or min(args.sizes) < 256:
        ap.error("need --repeat >= 1 and sizes >= 256")
    names = available_backends() if args.backend == "all" else [args.backend]
    if args.backend == "cupy" and "cupy" not in available_backends():
        print("CuPy with a CUDA device is not available here", file=sys.stderr)
        return 2

    results: dict = {}
    # What the command runs under (gpudiff.cli.console_main): one BLAS thread (OpenBLAS's
    # spin-waiting threads cost the kernel fit ~1.5 s of 2048² on two busy cores).
    blas = blas_threads(args.blas_threads) if args.blas_threads > 0 else contextlib.nullcontext()
    with blas, tempfile.TemporaryDirectory(prefix="gpudiff_bench_subtract_") as tmp:
        folder = Path(tmp)
        for size in args.sizes:
            sci, tmpl, desc = make_files(size, args.stars_per_mpx, args.seed, folder)
            print(f"{desc}; FITS {sci.stat().st_size / 2**20:.0f} MiB each", flush=True)
            for name in names:
                results[(name, size)] = run_backend(name, size, sci, tmpl, folder, args.repeat)

    cols = list(results)
    print()
    head = f"{'stage':22s}" + "".join(f"{f'{n} {s}²':>16s}" for n, s in cols)
    print(head)
    print("-" * len(head))
    for stage in (*STAGES, "end-to-end"):
        if stage == "end-to-end":
            print("-" * len(head))
        print(f"{stage:22s}" + "".join(f"{results[c][stage]:14.3f} s" for c in cols))
    print()
    for (name, size), med in results.items():
        target = TARGET_S * (size / TARGET_SIZE) ** 2
        verdict = "PASS" if med["end-to-end"] <= target else "MISS"
        scaled = (
            "" if size == TARGET_SIZE else f" (the {TARGET_S:g} s at {TARGET_SIZE}² scaled by area)"
        )
        print(
            f"target {name} {size}²: end-to-end {med['end-to-end']:.2f} s vs ≤ {target:.2f} "
            f"s{scaled}: {verdict}"
            + ("" if name == "numpy" else " [the target is for 2 CPU cores with NumPy]")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
