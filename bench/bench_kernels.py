#!/usr/bin/env python3
"""Benchmark the registered kernels (``clipped_stack``, ``mask_dilate_or``) per backend.

Examples::

    python bench/bench_kernels.py --backend numpy --size 1024
    python bench/bench_kernels.py --backend all --size 4096 --nepoch 20 --repeat 5
    python bench/bench_kernels.py --backend cupy --kernel all --peak-tbs 4.8

Inputs are made once on the host and moved to each backend before timing, so the times
are kernel times on resident data (no host<->device transfer).  Each configuration runs
``--warmup`` untimed calls first (the first CuPy call compiles the module), then
``--repeat`` timed calls, each bracketed by ``synchronize()``; the table shows the median.

For CuPy the table also shows the achieved memory bandwidth: the minimal traffic of the
kernel (every input byte read once, every output byte written once) divided by the time,
and as a fraction of ``--peak-tbs`` (default 4.8 TB/s, an H200's HBM3e).
"""

from __future__ import annotations

import argparse
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
from gpudiff.backend import kernels as K


def make_stack(size: int, nepoch: int, seed: int, outlier_frac: float, bad_frac: float):
    rng = np.random.default_rng(seed)
    shape = (nepoch, size, size)
    data = rng.standard_normal(shape, dtype=np.float32)
    data *= np.float32(5.0)
    data += np.float32(100.0)
    n_out = int(outlier_frac * data.size)
    if n_out:
        idx = rng.integers(0, data.size, n_out)
        data.reshape(-1)[idx] += rng.uniform(50.0, 500.0, n_out).astype(np.float32)
    bad = rng.random(shape, dtype=np.float32) < bad_frac
    weights = rng.uniform(0.5, 2.0, nepoch).astype(np.float32)
    return data, bad, weights


def make_mask(size: int, seed: int, fp_size: int):
    rng = np.random.default_rng(seed + 1)
    mask = np.where(rng.random((size, size)) < 0.01, 1 << rng.integers(0, 31, (size, size)), 0)
    fp = np.ones((fp_size, fp_size), dtype=bool)
    return mask.astype(np.int32), fp


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
        "--kernel", choices=("clipped_stack", "mask_dilate_or", "all"), default="clipped_stack"
    )
    ap.add_argument("--size", type=int, default=4096, help="image side in pixels (default 4096)")
    ap.add_argument("--nepoch", type=int, default=20, help="stack depth N (default 20)")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    ap.add_argument("--nsigma", type=float, default=3.0)
    ap.add_argument("--niter", type=int, default=3)
    ap.add_argument("--weighted", action="store_true", help="pass per-epoch weights")
    ap.add_argument("--bad-frac", type=float, default=0.05, help="fraction of masked samples")
    ap.add_argument("--outlier-frac", type=float, default=0.01, help="fraction of outlier samples")
    ap.add_argument(
        "--footprint", type=int, default=9, help="mask_dilate_or footprint side (default 9)"
    )
    ap.add_argument(
        "--peak-tbs",
        type=float,
        default=4.8,
        help="peak memory bandwidth in TB/s (default 4.8, H200)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--verify",
        action="store_true",
        help="compare the CuPy outputs with the NumPy twin's (needs both backends)",
    )
    args = ap.parse_args(argv)

    have = available_backends()
    if args.backend == "all":
        names = have
    elif args.backend in have:
        names = [args.backend]
    else:
        print(
            f"backend {args.backend!r} is not available here (available: {have})", file=sys.stderr
        )
        return 1
    kernels = ("clipped_stack", "mask_dilate_or") if args.kernel == "all" else (args.kernel,)

    rows = []
    outputs: dict[tuple[str, str], tuple] = {}
    data = bad = w = mask = fp = None
    if "clipped_stack" in kernels:
        data, bad, w = make_stack(
            args.size, args.nepoch, args.seed, args.outlier_frac, args.bad_frac
        )
        if not args.weighted:
            w = None
    if "mask_dilate_or" in kernels:
        mask, fp = make_mask(args.size, args.seed, args.footprint)

    npix = args.size * args.size
    for name in names:
        be = get_backend(name)
        for kname in kernels:
            if kname == "clipped_stack":
                d_, b_ = be.asarray(data), be.asarray(bad)
                w_ = None if w is None else be.asarray(w)
                f = K.get_kernel("clipped_stack", be)

                def call(f=f, d_=d_, b_=b_, w_=w_):
                    return f(d_, b_, w_, args.nsigma, args.niter)

                shape = f"{args.nepoch}x{args.size}x{args.size}"
                # bytes: data f32 + bad u8 read, mean f32 + var f32 + n i32 written
                nbytes = args.nepoch * npix * (4 + 1) + npix * 12 + args.nepoch * 4
            else:
                m_ = be.asarray(mask)
                f = K.get_kernel("mask_dilate_or", be)

                def call(f=f, m_=m_):
                    return f(m_, fp)

                shape = f"{args.size}x{args.size} fp{args.footprint}x{args.footprint}"
                nbytes = npix * 4 * 2  # mask read once (ideal caching), out written
            times = time_call(be, call, args.repeat, args.warmup)
            med = statistics.median(times)
            if args.verify:
                outputs[(name, kname)] = tuple(
                    be.asnumpy(o) for o in (call() if kname == "clipped_stack" else (call(),))
                )
            row = {
                "backend": name,
                "kernel": kname,
                "shape": shape,
                "median_ms": med * 1e3,
                "min_ms": min(times) * 1e3,
                "mpix_s": npix / med / 1e6,
                "gbs": nbytes / med / 1e9 if be.is_gpu else None,
            }
            row["peak_frac"] = (
                (row["gbs"] / (args.peak_tbs * 1e3)) if row["gbs"] is not None else None
            )
            rows.append(row)
            del call

    hdr = (
        f"{'backend':<7} {'kernel':<15} {'shape':<22} {'median ms':>10} {'min ms':>10} "
        f"{'Mpix/s':>9} {'GB/s':>8} {'of peak':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        gbs = f"{r['gbs']:8.1f}" if r["gbs"] is not None else f"{'-':>8}"
        frac = f"{100 * r['peak_frac']:7.1f}%" if r["peak_frac"] is not None else f"{'-':>8}"
        print(
            f"{r['backend']:<7} {r['kernel']:<15} {r['shape']:<22} {r['median_ms']:10.2f} "
            f"{r['min_ms']:10.2f} {r['mpix_s']:9.2f} {gbs} {frac}"
        )
    print(
        f"(repeat={args.repeat}, warmup={args.warmup}, nsigma={args.nsigma}, niter={args.niter}, "
        f"weighted={args.weighted}; GB/s = minimal bytes moved / median time; "
        f"peak {args.peak_tbs} TB/s)"
    )

    if args.verify:
        for kname in kernels:
            a, b = outputs.get(("numpy", kname)), outputs.get(("cupy", kname))
            if a is None or b is None:
                print(f"verify {kname}: needs both numpy and cupy")
                continue
            if kname == "clipped_stack":
                same_n = float(np.mean(a[2] == b[2]))
                ok = a[2] == b[2]
                dm = np.nanmax(
                    np.abs(a[0][ok] - b[0][ok]) / np.maximum(np.abs(a[0][ok]), 1e-30), initial=0.0
                )
                print(
                    f"verify clipped_stack: n_used identical on {100 * same_n:.4f}% of pixels, "
                    f"max rel |mean diff| there {dm:.2e}"
                )
            else:
                print(f"verify mask_dilate_or: identical = {bool(np.array_equal(a[0], b[0]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
