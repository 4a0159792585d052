#!/usr/bin/env python3
"""Benchmark ModelPsfMatchTask on a ``--size``² exposure per backend.

Examples::

    python bench/bench_model_psf_match.py --backend numpy
    python bench/bench_model_psf_match.py --backend all --size 4096 --repeat 3

The exposure is a :func:`gpudiff.sim.simulate_exposure` field with a spatially varying
Moffat PSF (FWHM 3.5 px ± 15 %, β = 3; a :class:`~gpudiff.image.GridPsf` of 8×8 nodes,
35-px images) matched to a round Gaussian of 1.3× its largest FWHM, with LSST's
ModelPsfMatch defaults (21-px AL kernel, 27 bases, spatial order 2, 128-px cells: a
4096² exposure gives 34×34 = 1156 cells).  Stages:

* ``build_cell_set``: realize both PSFs at every cell centre, pad, stack the stamps and
  make the candidates (host loop over cells, then one transfer);
* ``fit_kernel``: the batched single-kernel solves and the spatial fit (no clipping);
* ``apply_kernel``: the exact spatially varying convolution of image (6 terms), variance
  (21 term pairs) and mask, normalized per pixel;
* ``run()``: everything, including the width check and the residual diagnostics.

The exposure is made once on the host and moved to each backend before timing.  Every
stage runs once untimed (warm-up: FFT plans, CUDA compilation), then ``--repeat`` timed
runs bracketed by ``backend.synchronize()``; the table shows the median and the minimum.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from _timing import time_call  # noqa: E402  (sibling module of the bench scripts)

try:
    import gpudiff  # noqa: F401
except ImportError:  # running from a source checkout without installation
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpudiff.backend import available_backends, get_backend
from gpudiff.image import GaussianPsf
from gpudiff.sim import PsfSpec, simulate_exposure
from gpudiff.tasks.model_psf_match import ModelPsfMatchTask


def make_exposure(size: int, seed: int):
    """A size² field (one star per 64² px on average) with a ±15 % varying Moffat PSF."""
    spec = PsfSpec(kind="moffat", fwhm=3.5, beta=3.0, variation=(0.1, 0.05))
    sim = simulate_exposure(
        size, psf=spec, n_stars=max(50, (size // 64) ** 2), flux_min=1e3, flux_max=5e5, seed=seed
    )
    psf = sim.exposure.psf
    largest = max(psf.fwhm(x, y) for x in psf.xs for y in psf.ys)
    return sim.exposure, GaussianPsf(fwhm=1.3 * largest)


def fmt_s(t: float) -> str:
    return f"{t * 1e3:9.1f} ms" if t < 1.0 else f"{t:9.3f} s "


def run_backend(name: str, args, exposure, reference, rows: list) -> None:
    be = get_backend(name)
    exp_b = exposure.to_backend(be)
    task = ModelPsfMatchTask(backend=be)

    def add(stage: str, times: list[float]) -> None:
        rows.append((name, stage, statistics.median(times), min(times)))
        print(f"  {name:6s} {stage:46s} {fmt_s(statistics.median(times))}", flush=True)

    add(
        "build_cell_set (realize PSFs, candidates)",
        time_call(be, lambda: task.build_cell_set(exp_b, reference), args.repeat),
    )
    cell_set = task.build_cell_set(exp_b, reference)
    add(
        f"fit_kernel ({cell_set.n_cells_x}x{cell_set.n_cells_y} cells, 27 bases)",
        time_call(be, lambda: task.fit_kernel(cell_set), args.repeat),
    )
    kernel = task.fit_kernel(cell_set).kernel
    add(
        f"apply_kernel ({args.size}² img+var+mask, order 2)",
        time_call(be, lambda: task.apply_kernel(exp_b, kernel), args.repeat),
    )
    add("run() total", time_call(be, lambda: task.run(exp_b, reference), args.repeat))
    meta = task.run(exp_b, reference).metadata
    print(
        f"         PSF images {meta['psf_size']} px, fitted kernel sum "
        f"{meta['fitted_kernel_sum']:.5f}, "
        f"PSF residual max {100 * meta['residual_max']:.2f} %",
        flush=True,
    )


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
    ap.add_argument("--size", type=int, default=4096, help="image side in pixels (default 4096)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per stage (default 3)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if args.size < 256 or args.repeat < 1:
        ap.error("need --size >= 256 and --repeat >= 1")
    names = available_backends() if args.backend == "all" else [args.backend]
    if args.backend == "cupy" and "cupy" not in available_backends():
        print("CuPy with a CUDA device is not available here", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    exposure, reference = make_exposure(args.size, args.seed)
    print(
        f"exposure: {args.size}² with {exposure.psf!r} simulated in "
        f"{time.perf_counter() - t0:.1f} s; "
        f"reference {reference!r}; median of {args.repeat} after 1 warm-up",
        flush=True,
    )
    rows: list = []
    for name in names:
        run_backend(name, args, exposure, reference, rows)

    print()
    print(f"{'backend':8s} {'stage':48s} {'median':>12s} {'min':>12s}")
    print("-" * 84)
    for name, stage, med, best in rows:
        print(f"{name:8s} {stage:48s} {fmt_s(med):>12s} {fmt_s(best):>12s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
