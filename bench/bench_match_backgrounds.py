#!/usr/bin/env python3
"""Benchmark MatchBackgroundsTask: ``--visits`` visits × 4 patches of ``--size``² per backend.

Examples::

    python bench/bench_match_backgrounds.py --backend numpy
    python bench/bench_match_backgrounds.py --backend all --visits 20 --size 2048 --repeat 3

The tract is 2 × 2 patches of ``--size`` px (no overlap, so every warp is ``--size``²);
every visit covers all four patches with its own background (offset, gradient, a gentle
quadratic; tens of σ) on a shared star field (rendered once by :mod:`gpudiff.sim`) plus
Gaussian noise, a chip gap and bad columns.  LSST defaults: 128-px bins, MEANCLIP (3σ,
3 passes) of 256-px windows, Akima interpolation.  Stages:

* ``bin one warp``: :meth:`TractBackground.add_warp` of one warp (sort each 128² cell
  once, clipped statistics of the 2 × 2-cell windows);
* ``choose reference``: :class:`ChooseReferenceVisitTask` (bins every warp of every visit);
* ``match (ref given)``: :meth:`MatchBackgroundsTask.run` with ``ref_visit`` (difference
  models of the other visits, evaluation onto every warp, diagnostics);
* ``run() total``: choice and matching.

The default, 20 visits × 4 × 2048², holds 80 warps (4 GB) plus the 80 matched ones in
memory; use ``--visits`` to fit a smaller host.  Each stage runs ``--warmup`` untimed and
``--repeat`` timed times, bracketed by ``backend.synchronize()``; medians and minima shown.
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

import numpy as np
from astropy.io import fits

from gpudiff.backend import available_backends, get_backend
from gpudiff.image import Exposure
from gpudiff.image.tract import TractGrid
from gpudiff.sim import PolynomialBackground, simulate_exposure
from gpudiff.tasks.match_backgrounds import MatchBackgroundsTask
from gpudiff.tasks.tract_background import ChooseReferenceVisitTask, TractBackground


def make_warps(n_visits: int, size: int, seed: int = 1):
    """``n_visits`` × 4 warps of size² on a (2·size)² tract, all on the host."""
    tract = TractGrid.from_size(2 * size, patch_inner=size, patch_overlap=0)
    field = simulate_exposure(
        2 * size,
        noise="none",
        sky=0.0,
        n_stars=(2 * size // 64) ** 2,
        flux_min=2e3,
        flux_max=5e5,
        psf=3.5,
        seed=seed,
    )
    rng = np.random.default_rng(seed)
    sky, sigma = 1000.0, float(np.sqrt(1000.0))
    warps = []
    for v in range(n_visits):
        bg = PolynomialBackground(
            offset=rng.uniform(-40, 40) * sigma,
            gradient=tuple(rng.uniform(-15, 15, 2) * sigma),
            quadratic=tuple(rng.uniform(-3, 3, 3) * sigma),
            center=(size - 0.5, size - 0.5),
            scale=float(size),
        )
        gap = int(rng.integers(100, size - 100))
        for p in tract.patch_ids():
            b = tract.outer_box(p)
            stars = field.model[b.y0 : b.y1, b.x0 : b.x1]
            xx = np.arange(b.x0, b.x1, dtype=np.float64)[None, :]
            yy = np.arange(b.y0, b.y1, dtype=np.float64)[:, None]
            var = stars + np.float32(sky)
            img = stars + bg.evaluate(xx, yy).astype(np.float32)
            img += rng.standard_normal(img.shape, dtype=np.float32) * np.sqrt(var)
            mask = np.zeros(img.shape, np.int32)
            img[:, gap : gap + 30] = np.nan
            mask[:, gap : gap + 30] = 1 << 8  # NO_DATA
            cols = rng.integers(0, size, 2)
            mask[:, cols] |= 1  # BAD
            hdr = fits.Header()
            hdr["VISIT"] = v
            warps.append(
                Exposure.from_arrays(
                    img, var, mask, xy0=(b.x0, b.y0), metadata=hdr, backend="numpy"
                )
            )
    return tract, warps


def fmt_s(t: float) -> str:
    return f"{t * 1e3:9.1f} ms" if t < 1.0 else f"{t:9.3f} s "


def run_backend(name: str, args, tract, warps, rows: list) -> None:
    be = get_backend(name)
    # (on the host the warps are used as they are: a copy would double the memory)
    ws = warps if be.name == "numpy" else [w.to_backend(be) for w in warps]
    groups: dict = {}
    for w in ws:
        groups.setdefault(int(w.metadata["VISIT"]), []).append(w)
    mpix = sum(w.shape[0] * w.shape[1] for w in ws) / 1e6

    def add(stage: str, times: list[float], pix: float) -> None:
        med = statistics.median(times)
        rows.append((name, stage, med, min(times), pix / med))
        print(f"  {name:6s} {stage:40s} {fmt_s(med)}  {pix / med:8.1f} Mpix/s", flush=True)

    task = MatchBackgroundsTask(backend=be)
    add(
        "bin one warp (TractBackground)",
        time_call(
            be, lambda: TractBackground(tract, backend=be).add_warp(ws[0]), args.repeat, args.warmup
        ),
        ws[0].shape[0] * ws[0].shape[1] / 1e6,
    )
    add(
        f"choose reference ({len(groups)} visits)",
        time_call(
            be,
            lambda: ChooseReferenceVisitTask(backend=be).run(groups, tract),
            args.repeat,
            args.warmup,
        ),
        mpix,
    )
    add(
        "match (ref given)",
        time_call(be, lambda: task.run(ws, tract, ref_visit=0), args.repeat, args.warmup),
        mpix,
    )
    add("run() total", time_call(be, lambda: task.run(ws, tract), args.repeat, args.warmup), mpix)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="all", help="numpy, cupy or all (those present)")
    ap.add_argument("--visits", type=int, default=20)
    ap.add_argument("--size", type=int, default=2048, help="warp (patch) size, pixels")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument(
        "--warmup", type=int, default=None, help="untimed runs (default: 0 on numpy, 1 on cupy)"
    )
    args = ap.parse_args(argv)
    names = available_backends() if args.backend == "all" else [args.backend]
    t0 = time.perf_counter()
    tract, warps = make_warps(args.visits, args.size)
    print(
        f"{args.visits} visits x 4 patches of {args.size}^2 on a {2 * args.size}^2 tract "
        f"({len(warps)} warps, simulated in {time.perf_counter() - t0:.1f} s)"
    )
    rows: list = []
    for name in names:
        a = argparse.Namespace(**vars(args))
        if a.warmup is None:
            a.warmup = (
                0 if name == "numpy" else 1
            )  # CPU runs are long; GPU needs compilation warm-up
        run_backend(name, a, tract, warps, rows)
    print()
    print("| backend | stage | median | min | Mpix/s |")
    print("|---|---|---|---|---|")
    for name, stage, med, mn, rate in rows:
        print(f"| {name} | {stage} | {fmt_s(med).strip()} | {fmt_s(mn).strip()} | {rate:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
