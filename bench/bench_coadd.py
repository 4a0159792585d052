#!/usr/bin/env python3
"""Benchmark coaddition: AssembleCoaddTask (MEANCLIP, MEAN) and CompareWarpAssembleCoaddTask.

Examples::

    python bench/bench_coadd.py --backend all --size 4096 --nwarp 20      # the issue's case
    python bench/bench_coadd.py --backend numpy --size 1024 --nwarp 20 --repeat 1

The warps are made once on the host (sky noise of per-warp depth, a few hundred Gaussian
stars, a cosmic-ray-like outlier population) and moved to each backend before timing, so
the times are coaddition on resident data: weights, the band loop, the epoch-axis kernel,
mask propagation and, for CompareWarp, the static-sky model, the per-warp detection and
filtering and the final stack.  The PSF-matched warps of CompareWarp share the direct
warps' pixels (with a common PSF attached): PSF matching itself is timed by
``bench_model_psf_match.py``.  Targets (issue 7): 20 warps of 4096² in ≤ 0.5 s on a GPU,
≤ 30 s on 2 CPU cores.  Memory: 12 bytes per pixel per warp (4 GB at 20 × 4096²) plus the
band stack (256 MiB on the CPU, a quarter of the free device memory on a GPU).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import numpy as np

from _timing import time_call  # noqa: E402  (sibling module of the bench scripts)

try:
    import gpudiff  # noqa: F401
except ImportError:  # running from a source checkout without installation
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpudiff.backend import available_backends, get_backend
from gpudiff.image import Exposure, GaussianPsf
from gpudiff.tasks.assemble_coadd import AssembleCoaddConfig, AssembleCoaddTask
from gpudiff.tasks.compare_warp import CompareWarpAssembleCoaddConfig, CompareWarpAssembleCoaddTask


def make_warps(size: int, nwarp: int, seed: int, nstars: int = 400):
    """Host arrays: list of (image, variance, mask, psf sigma)."""
    rng = np.random.default_rng(seed)
    xs, ys = rng.uniform(20, size - 20, nstars), rng.uniform(20, size - 20, nstars)
    fluxes = 10 ** rng.uniform(3, 5.5, nstars)
    out = []
    for k in range(nwarp):
        sky_sigma = rng.uniform(10.0, 30.0)
        sigma = rng.uniform(1.2, 2.0)
        img = rng.standard_normal((size, size), dtype=np.float32)
        img *= np.float32(sky_sigma)
        r = int(5 * sigma) + 1
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        for x, y, f in zip(xs, ys, fluxes):
            ix, iy = int(x), int(y)
            stamp = (
                f
                / (2 * np.pi * sigma**2)
                * np.exp(-((xx + ix - x) ** 2 + (yy + iy - y) ** 2) / (2 * sigma**2))
            )
            img[iy - r : iy + r + 1, ix - r : ix + r + 1] += stamp.astype(np.float32)
        hits = rng.integers(0, size * size, size * size // 20000)  # cosmic-ray-like outliers
        img.reshape(-1)[hits] += np.float32(50 * sky_sigma)
        var = np.full((size, size), sky_sigma**2, np.float32)
        mask = np.zeros((size, size), np.int32)
        out.append((img, var, mask, sigma))
    return out


def _bench_backend(be, host, methods, args) -> None:
    """Time each of ``methods`` on backend ``be``; its copies of the warps are freed on return."""
    direct = [
        Exposure.from_arrays(i, v, m, psf=GaussianPsf(sigma=s), backend=be) for i, v, m, s in host
    ]
    common = GaussianPsf(sigma=2.2)
    matched = [Exposure(d.masked_image, psf=common) for d in direct]
    for method in methods:
        if method == "compare-warp":
            task = CompareWarpAssembleCoaddTask(CompareWarpAssembleCoaddConfig(), backend=be)
            run = functools.partial(task.run, direct, matched)
        else:
            task = AssembleCoaddTask(AssembleCoaddConfig(statistic=method.upper()), backend=be)
            run = functools.partial(task.run, direct)
        last = {}

        def call():
            last["r"] = run()

        t = statistics.median(time_call(be, call, args.repeat, args.warmup))
        rate = args.nwarp * args.size**2 / 1e6 / t
        n_bands = last["r"].metadata["n_bands"]
        print(f"{be.name:8s} {method:13s} {t:9.3f} {rate:12.1f} {n_bands:6d}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="all", help="numpy, cupy or all (the backends present)")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--nwarp", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--methods", default="meanclip,mean,compare-warp")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    names = available_backends() if args.backend == "all" else [args.backend]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    host = make_warps(args.size, args.nwarp, args.seed)
    print(
        f"coadd of {args.nwarp} warps of {args.size}x{args.size} (median of {args.repeat}, "
        f"after {args.warmup} warm-up)"
    )
    print(f"{'backend':8s} {'method':13s} {'time [s]':>9s} {'Mpix*warp/s':>12s} {'bands':>6s}")
    for name in names:
        _bench_backend(get_backend(name), host, methods, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
