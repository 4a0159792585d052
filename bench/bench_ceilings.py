#!/usr/bin/env python3
"""The hardware ceilings every other benchmark is read against.

Examples::

    python bench/bench_ceilings.py --backend all --size 4096

Per backend it times, on a float32 N² image (random data, never zeros: some FFT and copy
paths short-cut on zeros):

* **copy**: a device-to-device (or host memory) copy of the image — the achievable memory
  bandwidth, reported in GB/s as 2·bytes/time (one read, one write);
* **axpy**: ``out = a*x + y`` — the bandwidth of a three-stream elementwise kernel, the
  shape of the spatially varying combination Σ p_k·(I ⊗ K_k);
* **rfft2 / irfft2**: a forward and an inverse real 2-D FFT of the image (the unit of
  every correlation gpudiff does: a correlation is one forward FFT of the image, one of
  the kernel — cached — and one inverse);
* **h2d / d2h** (CuPy only): pageable host ↔ device copies of the image, the cost a
  host-to-host run pays on top of the device-resident one.

A stage that moves B bytes cannot run faster than B / copy-bandwidth; one doing F
correlations of an N² image cannot beat F·(rfft2 + irfft2).  ``bench/NOTES.md`` uses these
figures for its predictions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import time_call  # noqa: E402

from gpudiff.backend import available_backends, get_backend  # noqa: E402


def ceilings(name: str, size: int, repeat: int) -> dict[str, tuple[float, str]]:
    """Median time (s) and a derived figure of each probe on backend ``name``."""
    be = get_backend(name)
    xp = be.xp
    host = np.random.default_rng(1).normal(100.0, 10.0, (size, size)).astype(np.float32)
    x = be.asarray(host)
    y = be.asarray(host[::-1].copy())
    out = xp.empty_like(x)
    nbytes = x.nbytes
    kw = be.fft_kwargs
    res: dict[str, tuple[float, str]] = {}

    t = statistics.median(time_call(be, lambda: xp.copyto(out, x), repeat))
    res["copy"] = (t, f"{2 * nbytes / t / 1e9:8.1f} GB/s")
    a = np.float32(1.5)

    def axpy():
        xp.multiply(x, a, out=out)
        xp.add(out, y, out=out)

    t = statistics.median(time_call(be, axpy, repeat))
    # two kernels as written: read x, write out, read out + y, write out = 5 streams
    res["axpy"] = (t, f"{5 * nbytes / t / 1e9:8.1f} GB/s")

    spec = be.fft.rfft2(x, **kw)
    t = statistics.median(time_call(be, lambda: be.fft.rfft2(x, **kw), repeat))
    res["rfft2"] = (t, f"{(nbytes + spec.nbytes) / t / 1e9:8.1f} GB/s eff")
    t = statistics.median(time_call(be, lambda: be.fft.irfft2(spec, s=x.shape, **kw), repeat))
    res["irfft2"] = (t, f"{(nbytes + spec.nbytes) / t / 1e9:8.1f} GB/s eff")
    if be.name == "cupy":
        t = statistics.median(time_call(be, lambda: be.asarray(host), repeat))
        res["h2d"] = (t, f"{nbytes / t / 1e9:8.1f} GB/s")
        t = statistics.median(time_call(be, lambda: be.asnumpy(x), repeat))
        res["d2h"] = (t, f"{nbytes / t / 1e9:8.1f} GB/s")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="all", help="numpy, cupy or all (default: all present)")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)
    names = available_backends() if args.backend == "all" else [args.backend]
    print(
        f"ceilings on a float32 {args.size}² image ({args.size * args.size * 4 / 2**20:.0f} MiB), "
        f"median of {args.repeat}"
    )
    print(f"{'backend':8s} {'probe':8s} {'time':>12s}  figure")
    for name in names:
        for probe, (t, fig) in ceilings(name, args.size, args.repeat).items():
            print(f"{name:8s} {probe:8s} {t * 1e3:9.2f} ms  {fig}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
