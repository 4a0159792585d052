#!/usr/bin/env python3
"""Benchmark ``warp_exposure`` (Lanczos-3) on an N² exposure for the three kinds of mapping.

Examples::

    python bench/bench_warp.py --backend numpy --size 4096 --repeat 3
    python bench/bench_warp.py --backend all --size 4096

Cases (destination = source box, TAN WCS of 0.2"/px):

- ``integer``: the destination grid is the source grid moved by whole pixels (what the
  ``gpudiff demo`` pair's bordered template needs): a copy, no resampling;
- ``subpixel``: a sub-pixel shift (0.37, −0.61) px: the separable path;
- ``scale``: a 0.5 % pixel-scale change plus a shift: separable (axis-aligned affine);
- ``rotation``: a 0.05° rotation plus a shift: the general path (36 gathers per pixel).

Times are min and median wall seconds of ``--repeat`` calls after one warm-up, with the
device synchronized on either side.  On a shared machine report the min.
"""

from __future__ import annotations

import argparse
import copy
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
from gpudiff.image import Box, Exposure, MaskedImage
from gpudiff.ops.warp import warp_exposure
from gpudiff.sim.wcs import make_wcs


def _cases(wcs):
    def moved(dx, dy, angle=0.0, scale=1.0):
        w = copy.deepcopy(wcs)
        w.wcs.crpix = [wcs.wcs.crpix[0] - dx, wcs.wcs.crpix[1] - dy]
        c, s = np.cos(angle), np.sin(angle)
        w.wcs.cd = np.asarray(wcs.wcs.cd) @ np.array([[c, -s], [s, c]]) * scale
        return w

    return {
        "integer": moved(3, -2),
        "subpixel": moved(0.37, -0.61),
        "scale": moved(0.37, -0.61, scale=1.005),
        "rotation": moved(0.37, -0.61, angle=np.deg2rad(0.05)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="numpy", help="numpy, cupy or all")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cases", nargs="+", default=["integer", "subpixel", "scale", "rotation"])
    args = ap.parse_args(argv)
    names = available_backends() if args.backend == "all" else [args.backend]
    n = args.size
    rng = np.random.default_rng(1)
    img = rng.normal(100.0, 5.0, (n, n)).astype(np.float32)
    box = Box(0, 0, n, n)
    wcs = make_wcs(box)
    cases = _cases(wcs)
    print(f"warp_exposure lanczos3, {n}², repeat {args.repeat}")
    print(f"{'backend':8s} {'case':10s} {'min s':>8s} {'median s':>9s}")
    for name in names:
        be = get_backend(name)
        mi = MaskedImage(img, np.full_like(img, 25.0), np.zeros((n, n), np.int32), backend="numpy")
        exp = Exposure(mi.to_backend(be), wcs=wcs)
        for case in args.cases:
            dest = cases[case]
            t = time_call(be, lambda: warp_exposure(exp, dest, box), args.repeat)
            print(f"{name:8s} {case:10s} {min(t):8.3f} {statistics.median(t):9.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
