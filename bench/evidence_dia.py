"""Issue 14's evidence: DIA catalogs against the truth on realistic raw pairs, and false
sources on the shared DECam cutouts.

Examples::

    python bench/evidence_dia.py                      # 2048², both PSF orderings, both paths
    python bench/evidence_dia.py --size 1024 --ratios 1.4 --tasks subtract
    python bench/evidence_dia.py --decam              # + the 20 same-epoch DECam pairs

Realistic pairs (:func:`gpudiff.sim.realistic_raw_pair`, seed 14, ``--transients``
injections) go through the tasks with command-line defaults and are measured by
``tests/test_defects.measure_pair`` (the same measurement the tests use): completeness of
clean records for injections with S/N ≥ 8 (and its variants), clean records matching no
injection per Mpix, the median PSF-flux ratio and the pull spread of S/N > 20 injections,
and the source-free sky of the difference in units of its variance plane.  Targets:
completeness ≥ 0.95, false ≤ 2 per Mpix, flux within 2 %, pulls 1 ± 0.15, sky σ 1 ± 0.03.

``--decam`` runs ``gpudiff subtract`` (defaults) on every same-epoch pair of the shared
DECam cutouts (``GPUDIFF_SHARED_DATA`` or ``../shared/data``) and counts clean DIA records
(target ≤ 5 per Mpix), then checks the OBS04a − OBS18a transient near array (129, 128).
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

KEYS = (
    "mode",
    "sky_std",
    "sky_median",
    "n_dia",
    "false_clean",
    "false_clean_per_mpix",
    "n_snr8",
    "completeness_snr8",
    "completeness_snr8_away",
    "completeness_snr8_difference",
    "flux_ratio_median",
    "pull_std",
    "kernel_sum",
    "star_chi2_ratio",
)


def realistic(size: int, n_transients: int, ratios, tasks) -> None:
    from test_defects import measure_pair  # the tests' own measurement

    from gpudiff.sim import realistic_raw_pair

    print(f"realistic raw pairs {size}², {n_transients} injections, seed 14")
    print("ratio  task         " + "  ".join(k for k in KEYS[1:]))
    for ratio in ratios:
        pair = realistic_raw_pair(
            size, science_fwhm_ratio=ratio, seed=14, n_transients=n_transients
        )
        for task in tasks:
            t0 = time.perf_counter()
            m = measure_pair(pair, task=task)
            vals = []
            for k in KEYS[1:]:
                v = m.get(k)
                vals.append(f"{v:.4f}" if isinstance(v, float) else str(v))
            print(
                f"{ratio:<5}  {task:<11}  {'  '.join(vals)}  ({m.get('mode')}, "
                f"{time.perf_counter() - t0:.0f} s)",
                flush=True,
            )


def _shared() -> Path | None:
    for cand in (os.environ.get("GPUDIFF_SHARED_DATA"), ROOT.parent / "shared" / "data"):
        if cand and (Path(cand) / "decam_sfft_mini" / "input").is_dir():
            return Path(cand) / "decam_sfft_mini" / "input"
    return None


def decam() -> None:
    from astropy.table import Table

    src = _shared()
    if src is None:
        print("DECam cutouts not found (GPUDIFF_SHARED_DATA or ../shared/data): skipped")
        return
    out = Path(tempfile.mkdtemp(prefix="gpudiff_decam_"))

    def run(sci: str, tmpl: str, tag: str) -> Table | None:
        cmd = [sys.executable, "-m", "gpudiff", "subtract", str(src / sci), str(src / tmpl)]
        cmd += ["-o", str(out / f"{tag}.fits"), "--sources-out", str(out / f"{tag}.ecsv")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            print(f"  {tag}: exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
            return None
        return Table.read(out / f"{tag}.ecsv")

    total, fails, npairs = 0, 0, 0
    for epoch in ("04", "18"):
        for a, b in itertools.combinations("abcde", 2):
            npairs += 1
            cat = run(f"DEC-OBS{epoch}{a}.mini.fits", f"DEC-OBS{epoch}{b}.mini.fits", epoch + a + b)
            if cat is None:
                fails += 1
                continue
            n = int(np.asarray(cat["clean"], bool).sum())
            total += n
            print(f"  OBS{epoch}{a} - OBS{epoch}{b}: {len(cat)} records, {n} clean")
    mpix = npairs * 256 * 256 / 1e6
    print(
        f"DECam: {npairs} pairs, {fails} failed, {total} clean records = "
        f"{total / mpix:.2f} per Mpix (target <= 5)"
    )
    cat = run("DEC-OBS04a.mini.fits", "DEC-OBS18a.mini.fits", "transient")
    if cat is not None:
        d = np.hypot(np.asarray(cat["x_array"]) - 128.7, np.asarray(cat["y_array"]) - 127.8)
        i = int(np.argmin(d))
        flags = [c for c in cat.colnames if c.startswith("flag_") and cat[c][i]]
        print(
            f"OBS04a - OBS18a transient: nearest record {d[i]:.2f} px, S/N "
            f"{float(cat['snr'][i]):.1f}, clean {bool(cat['clean'][i])} {flags}"
        )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--transients", type=int, default=200)
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.75, 1.4])
    ap.add_argument("--tasks", nargs="*", default=["subtract", "preconvolve"])
    ap.add_argument("--decam", action="store_true", help="also the shared DECam cutouts")
    ap.add_argument("--no-realistic", action="store_true")
    args = ap.parse_args(argv)
    if not args.no_realistic:
        realistic(args.size, args.transients, args.ratios, args.tasks)
    if args.decam:
        decam()


if __name__ == "__main__":
    main()
