#!/usr/bin/env python3
"""Throughput of ``gpudiff batch``: pairs per minute on 1, 2, … CPU workers, and one worker per GPU.

Examples::

    python bench/bench_batch.py                         # 8 pairs of 512², 1 and 2 CPU workers
    python bench/bench_batch.py --pairs 32 --size 1024 --workers 1,2,4,8 --repeat 2
    python bench/bench_batch.py --gpus 0,1              # adds a row for one worker per GPU

The pairs are :func:`gpudiff.sim.simulate_pair` fields (``--size``², one star per 40² px,
2e3–5e5 ADU, science FWHM 3.5 px, template 2.5 px, five transients), written once to a
temporary folder with a manifest of subtract rows (LSST's default subtraction config,
DIA detection on).  For each cluster (an embedded Dask cluster from
:func:`gpudiff.batch.cluster.start_local_cluster`, one thread per worker) the whole
manifest runs once untimed (warm-up: worker imports, FFT plans, CUDA compilation), then
``--repeat`` timed times (``overwrite``); the table shows the median wall time, the
throughput in pairs per minute, the mean time a worker spent per pair, and the speed-up
over the first row.  Cluster start-up is timed separately.  On a shared or small machine
the workers compete for cores, so N workers speed up by less than N.
"""

from __future__ import annotations

import argparse
import logging
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

from gpudiff.backend import get_backend
from gpudiff.batch import run
from gpudiff.batch.cluster import detect_gpus, parse_gpus, start_local_cluster
from gpudiff.sim import simulate_pair


def make_manifest(folder: Path, n: int, size: int, seed: int) -> Path:
    """``n`` simulated pairs in ``folder`` and a CSV manifest of subtract rows."""
    lines = ["kind,science,template,output"]
    for i in range(n):
        pair = simulate_pair(
            size=size,
            n_stars=max(100, (size // 40) ** 2),
            flux_min=2e3,
            flux_max=5e5,
            science=dict(sky_subtracted=True),
            template=dict(sky_subtracted=True),
            seed=seed + i,
        )
        pair.science.write(folder / f"sci{i}.fits")
        pair.template.write(folder / f"tmpl{i}.fits")
        lines.append(f"subtract,sci{i}.fits,tmpl{i}.fits,diff{i}.fits")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def bench_cluster(
    label: str, manifest: Path, out: Path, n_pairs: int, repeat: int, **cluster_kw
) -> dict:
    from distributed import Client

    t0 = time.perf_counter()
    cluster, is_gpu = start_local_cluster(**cluster_kw)
    backend = "cupy" if is_gpu else "numpy"
    results = []
    try:
        with Client(cluster) as client:
            client.wait_for_workers(len(cluster.workers))
            startup = time.perf_counter() - t0

            def once():
                res = run(
                    manifest,
                    out,
                    client=client,
                    backend=backend,
                    overwrite=True,
                    progress=None,
                    log_fn=lambda s: None,
                )
                if res.n_ok != n_pairs:
                    raise SystemExit(
                        f"{label}: {res.n_failed} rows failed: {list(res.table['error'])}"
                    )
                results.append(res)

            times = time_call(
                get_backend("numpy"), once, repeat, warmup=1
            )  # the workers are other processes
    finally:
        cluster.close()
    timed = results[1:]
    wall = statistics.median(times)
    per_pair = statistics.mean(float(t["time_s"].mean()) for t in (r.table for r in timed))
    return dict(
        label=label,
        workers=timed[0].n_workers,
        startup=startup,
        wall=wall,
        per_min=60 * n_pairs / wall,
        per_pair=per_pair,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=8, help="pairs in the manifest (default 8)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument(
        "--workers", default="1,2", help="CPU worker counts to compare (default 1,2)"
    )
    parser.add_argument(
        "--gpus",
        default=None,
        help="GPU ids for a one-worker-per-GPU row (default: every GPU found; 'none' to skip)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per cluster (default 1)")
    parser.add_argument("--seed", type=int, default=100)
    args = parser.parse_args()
    logging.getLogger("distributed").setLevel(logging.ERROR)

    gpus = [] if args.gpus == "none" else (parse_gpus(args.gpus) if args.gpus else detect_gpus())
    with tempfile.TemporaryDirectory(prefix="gpudiff_bench_batch_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        manifest = make_manifest(tmp, args.pairs, args.size, args.seed)
        print(
            f"simulated {args.pairs} pairs of {args.size}² in {time.perf_counter() - t0:.1f} s; "
            f"median of {args.repeat} timed run(s) after one warm-up run per cluster",
            flush=True,
        )
        rows = []
        for n in (int(w) for w in args.workers.split(",")):
            rows.append(
                bench_cluster(
                    f"CPU, {n} worker{'s' * (n > 1)}",
                    manifest,
                    tmp / "out",
                    args.pairs,
                    args.repeat,
                    workers=n,
                    backend="numpy",
                )
            )
            print(f"  {rows[-1]['label']}: {rows[-1]['per_min']:.1f} pairs/min", flush=True)
        if gpus:
            rows.append(
                bench_cluster(
                    f"GPU, {len(gpus)} worker(s) {','.join(gpus)}",
                    manifest,
                    tmp / "out",
                    args.pairs,
                    args.repeat,
                    gpus=gpus,
                    backend="cupy",
                )
            )
        else:
            print("  (no GPU found: no GPU row)")
    print()
    print(
        f"| cluster | workers | start-up | wall ({args.pairs} pairs) | pairs/min | s/pair on a "
        "worker | speed-up |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['label']} | {r['workers']} | {r['startup']:.1f} s | {r['wall']:.2f} s | "
            f"{r['per_min']:.1f} | "
            f"{r['per_pair']:.3f} | {r['per_min'] / rows[0]['per_min']:.2f}× |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
