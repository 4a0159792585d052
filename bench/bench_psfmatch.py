#!/usr/bin/env python3
"""Benchmark the PSF-matching kernel fit and the spatially varying convolution per backend.

Examples::

    python bench/bench_psfmatch.py --backend numpy
    python bench/bench_psfmatch.py --backend all --candidates 1000 --size 4096 --repeat 3

(a) **Kernel fit** of ``--candidates`` N kernel candidates with LSST's default
Alard–Lupton basis (27 bases, 21×21 kernel, 43² stamps, ``fit_for_background=True``):

* ``make_candidates``: cutting the stamps out of the image pair (and the checks);
* ``design matrices``: the 27 basis correlations of every template stamp (batched FFTs);
* ``normal equations + solves``: M = CᵀWC, b = CᵀWI and the batched float64 solves
  (:func:`gpudiff.psfmatch.solve.fit_stamps`);
* ``residual statistics``: D = I − C·a, var_D = var_I + K²⊗var_T and the z statistics;
* ``fit_spatial_kernel``: the whole clipping loop and the spatial model, orders 1 and 2.

The stamps come from a ``--size``² :func:`gpudiff.sim.simulate_pair` field of bright,
isolated stars (template Gaussian PSF σ = 2.0 px, science σ = 2.8 px, Poisson noise), the
N brightest being the candidates.

(b) **Spatially varying convolution** of the ``--size``² template MaskedImage with the
fitted kernel of spatial order 1 (3 terms) and 2 (6 terms):
:meth:`SpatialKernel.convolve` (image + variance + mask), with the image plane
(``varying_correlate``) and the mask dilation timed on their own for reference.

Data are made once on the host and moved to each backend before timing.  Every stage
runs once untimed (warm-up: FFT plans, CUDA module compilation), then ``--repeat`` timed
runs, each bracketed by ``backend.synchronize()``; the table shows the median.

Targets (2 CPU cores, NumPy): the batched single-kernel solve (design matrices + normal
equations and solves) of 1000 candidates < 0.5 s (scaled linearly for other N), and the
4096² order-1 convolution < 1.5 s (scaled by area for other sizes).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from _timing import time_call  # noqa: E402  (sibling module of the bench scripts)

try:
    import gpudiff  # noqa: F401
except ImportError:  # running from a source checkout without installation
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpudiff.backend import available_backends, get_backend
from gpudiff.ops.convolution import dilate_mask, varying_correlate
from gpudiff.psfmatch import PsfMatchConfig, fit_spatial_kernel, make_candidates, make_kernel_basis
from gpudiff.psfmatch.solve import design_matrices, fit_stamps, good_region, residual_statistics
from gpudiff.sim import simulate_pair

FWHM_PER_SIGMA = 2.354820045

#: Targets on 2 CPU cores with NumPy (seconds), at the reference sizes.
SOLVE_TARGET_S, SOLVE_TARGET_N = 0.5, 1000
CONV_TARGET_S, CONV_TARGET_SIZE = 1.5, 4096


def median_time(be, fn, repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs after ``warmup`` untimed ones."""
    return statistics.median(time_call(be, fn, repeat, warmup))


def make_field(size: int, n_candidates: int, seed: int):
    """A size² science/template pair of bright isolated stars and the candidate positions
    (the ``n_candidates`` brightest stars whose 43² stamps are inside the image)."""
    usable = float(size - 60) ** 2  # sources are kept 30 px inside the edges
    # ~30 % more stars than candidates (some fall on a cosmic ray, a bad column or the
    # edge), at least 45 px apart so every 43² stamp holds one star; capped by the area
    # (one star per 75² px keeps the random placement with that separation easy).
    n_stars = max(1, int(min(1.3 * n_candidates + 20, usable / (75.0 * 75.0))))
    pair = simulate_pair(
        size,
        n_stars=n_stars,
        min_separation=45.0,
        margin=-30.0,
        flux_min=2.0e4,
        flux_max=2.0e5,
        n_transients=0,
        science=dict(psf=2.8 * FWHM_PER_SIGMA),
        template=dict(psf=2.0 * FWHM_PER_SIGMA),
        seed=seed,
    )
    t = pair.truth[pair.truth["is_star"]]
    order = np.argsort(-np.asarray(t["flux_template"]))
    return pair, np.asarray(t["x"])[order], np.asarray(t["y"])[order]


def fresh(cands):
    """A copy of a KernelCandidates with every status reset (the fit mutates them)."""
    return dataclasses.replace(cands, status=None, reason=[], rejected=list(cands.rejected))


def fmt_s(t: float) -> str:
    return f"{t * 1e3:9.1f} ms" if t < 1.0 else f"{t:9.3f} s "


def run_backend(name: str, args, pair, xs, ys, rows: list):
    be = get_backend(name)
    xp = be.xp
    template = pair.template.masked_image.to_backend(be)
    science = pair.science.masked_image.to_backend(be)
    config = PsfMatchConfig(fit_for_background=True)
    basis = make_kernel_basis(config)  # 27 AL bases, 21×21 (no FWHM scaling)
    assert basis.n_bases == 27 and basis.size == 21
    ks = config.kernel_size
    region = template.bbox

    def add(stage, t, target=None):
        verdict = ""
        if target is not None:
            verdict = "PASS" if t < target else "MISS"
        rows.append((name, stage, t, target, verdict))
        print(f"  {name:6s} {stage:52s} {fmt_s(t)}", flush=True)

    # --- (a) kernel fit -----------------------------------------------------------------
    all_cands = make_candidates(template, science, xs, ys, kernel_size=ks, region=region)
    n = min(args.candidates, len(all_cands))
    if n < args.candidates:
        print(f"  note: only {n} usable candidates in a {args.size}² field", file=sys.stderr)
    # the n brightest (candidates are in source order = brightness order)
    xn, yn = all_cands.x[:n], all_cands.y[:n]
    add(
        f"make_candidates ({n} stamps 43²)",
        median_time(
            be,
            lambda: make_candidates(template, science, xn, yn, kernel_size=ks, region=region),
            args.repeat,
        ),
    )
    cands = make_candidates(template, science, xn, yn, kernel_size=ks, region=region)
    kern = be.asarray(basis.kernels, dtype=np.float64)
    kshape = basis.kernels.shape[1:]
    sums = basis.kernels.sum(axis=(1, 2))
    sci = good_region(cands.science, kshape)
    sci_var = good_region(cands.science_var, kshape)
    var_sum = sci_var + good_region(cands.template_var, kshape)

    t_design = median_time(
        be, lambda: design_matrices(be, cands.template, basis, True), args.repeat
    )
    add(f"design matrices ({n}×27 basis correlations)", t_design)
    C = design_matrices(be, cands.template, basis, True)
    t_solve = median_time(
        be, lambda: fit_stamps(be, C, sci, var_sum, sums, fit_for_background=True), args.repeat
    )
    add(f"normal equations + solves ({n} × 28²)", t_solve)
    target = SOLVE_TARGET_S * n / SOLVE_TARGET_N
    add("=> batched single-kernel solve (design + solve)", t_design + t_solve, target)
    sol = fit_stamps(be, C, sci, var_sum, sums, fit_for_background=True)
    add(
        f"residual statistics ({n} stamps)",
        median_time(
            be,
            lambda: residual_statistics(
                be, C, sol.coeffs, sci, sci_var, cands.template_var, kern, None
            ),
            args.repeat,
        ),
    )
    fits = {}
    for order in (1, 2):
        cfg = config.with_overrides(spatial_kernel_order=order)

        def run(cfg=cfg):
            return fit_spatial_kernel(fresh(cands), basis, cfg, region, be)

        add(
            f"fit_spatial_kernel (spatial order {order}, bg order 1)",
            median_time(be, run, args.repeat),
        )
        fits[order] = run()
        f = fits[order]
        print(
            f"         used {f.n_used}/{n}, rejected {int((f.candidates.status == 2).sum())}, "
            f"iterations {f.n_iterations}, kernel sum {f.kernel_sum:.5f}",
            flush=True,
        )

    # --- (b) spatially varying convolution -------------------------------------------------
    area_scale = (args.size / CONV_TARGET_SIZE) ** 2
    for order in (1, 2):
        sk = fits[order].kernel
        nk = sk.functions.n_terms
        add(
            f"SpatialKernel.convolve {args.size}² order {order} ({nk} terms): img+var+mask",
            median_time(be, lambda sk=sk: sk.convolve(template), args.repeat),
            CONV_TARGET_S * area_scale if order == 1 else None,
        )
        kt = sk.term_kernels()
        terms = sk.functions.on_grid(template.bbox, xp)
        img = xp.nan_to_num(template.image)
        add(
            "  of which image plane alone (varying_correlate)",
            median_time(be, lambda: varying_correlate(img, kt, terms, be), args.repeat),
        )
    fp = np.any(fits[1].kernel.term_kernels() != 0, axis=0)
    add(
        "  mask plane alone (OR-dilation, 21×21 footprint)",
        median_time(be, lambda: dilate_mask(template.mask, fp, be), args.repeat),
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
    ap.add_argument("--candidates", type=int, default=1000, help="kernel candidates (default 1000)")
    ap.add_argument("--size", type=int, default=4096, help="image side in pixels (default 4096)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per stage (default 3)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if args.candidates < 1 or args.size < 128 or args.repeat < 1:
        ap.error("need --candidates >= 1, --size >= 128, --repeat >= 1")

    names = available_backends() if args.backend == "all" else [args.backend]
    if args.backend == "cupy" and "cupy" not in available_backends():
        print("CuPy with a CUDA device is not available here", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    pair, xs, ys = make_field(args.size, args.candidates, args.seed)
    print(
        f"field: {args.size}² pair with {len(xs)} stars simulated in "
        f"{time.perf_counter() - t0:.1f} s; "
        f"median of {args.repeat} after 1 warm-up",
        flush=True,
    )
    rows: list = []
    for name in names:
        run_backend(name, args, pair, xs, ys, rows)

    print()
    print(f"{'backend':8s} {'stage':58s} {'median':>12s} {'target':>10s} {'':4s}")
    print("-" * 96)
    for name, stage, t, target, verdict in rows:
        tgt = f"< {target:.3g} s" if target is not None else ""
        print(f"{name:8s} {stage:58s} {fmt_s(t):>12s} {tgt:>10s} {verdict:4s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
