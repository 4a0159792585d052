"""The ``gpudiff`` command line.

Subcommands are small functions registered in :data:`COMMANDS`; each takes the parsed
arguments and returns an exit status.  Errors of gpudiff (``GpudiffError``) are printed as
one line and give exit status 1; usage errors give 2 (argparse's convention).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Callable

from . import __version__
from .backend import BACKEND_NAMES, cupy_status, get_backend
from .errors import GpudiffError

__all__ = ["main", "build_parser"]

log = logging.getLogger("gpudiff")


def _module_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "not installed"


def _cupy_version() -> str:
    for dist in ("cupy-cuda13x", "cupy-cuda12x", "cupy"):
        v = _module_version(dist)
        if v != "not installed":
            return f"{v} ({dist})"
    return "not installed"


def _kernel_cache_dir() -> str:
    # CuPy caches compiled RawModules here (its documented default and override).
    return os.environ.get("CUPY_CACHE_DIR", str(Path.home() / ".cupy" / "kernel_cache"))


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, the resolved backend, CUDA devices and where kernels come from."""
    from .backend.kernels import cuda_source_dir, list_kernels

    ok, reason = cupy_status()
    try:
        be = get_backend(args.backend)
        resolved = be.name
    except GpudiffError as exc:
        resolved = f"unavailable ({exc})"
    try:
        src = str(cuda_source_dir())
    except GpudiffError as exc:
        src = f"not found ({exc})"
    rows = [
        ("gpudiff", __version__),
        ("python", platform.python_version()),
        ("numpy", _module_version("numpy")),
        ("scipy", _module_version("scipy")),
        ("astropy", _module_version("astropy")),
        ("cupy", _cupy_version()),
        ("backend requested", args.backend or os.environ.get("GPUDIFF_BACKEND", "auto")),
        ("backend resolved", resolved),
        ("CUDA", reason if ok else f"no ({reason})"),
        ("CUDA kernel sources", src),
        ("registered kernels", ", ".join(list_kernels())),
        ("kernel cache dir", _kernel_cache_dir()),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Simulate a science/template pair, PSF-match and subtract it, write the outputs."""
    import numpy as np

    from .sim import simulate_pair
    from .psfmatch import PsfMatchConfig
    from .tasks import ImagePsfMatchConfig, ImagePsfMatchTask

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    be = get_backend(args.backend)
    n_stars = max(50, int(500 * (args.size / 512) ** 2))
    print(f"gpudiff demo: simulating a {args.size}x{args.size} pair (seed {args.seed}, {n_stars} stars) ...")
    pair = simulate_pair(size=args.size, seed=args.seed, n_stars=n_stars, flux_min=2e3, flux_max=5e5,
                         n_transients=5, transient_snr=(20, 80),
                         transient_isolation=30 if args.size >= 512 else 0)
    sci_path, tmpl_path = out / "science.fits", out / "template.fits"
    pair.science.write(sci_path, overwrite=True)
    pair.template.write(tmpl_path, overwrite=True)
    truth_path = out / "truth.ecsv"
    pair.truth.write(truth_path, format="ascii.ecsv", overwrite=True)
    print(f"  wrote {sci_path}, {tmpl_path} and {truth_path} "
          f"({len(pair.truth)} sources, {len(pair.transients)} injected transients)")
    print(f"  science PSF FWHM {pair.science.psf.fwhm():.2f} px, "
          f"template PSF FWHM {pair.template.psf.fwhm():.2f} px; backend {be.name}")
    # A small field holds few kernel stars: use a spatially constant kernel there, and the
    # subtraction defaults (first-order kernel, fitted background) on larger fields.
    order = 1 if args.size >= 384 else 0
    config = ImagePsfMatchConfig(kernel=PsfMatchConfig(fit_for_background=True, spatial_kernel_order=order,
                                                       spatial_bg_order=order))
    res = ImagePsfMatchTask(config, backend=be).subtract_exposures(pair.template, pair.science)
    diff_path = out / "difference.fits"
    res.subtracted_exposure.to_backend("numpy").write(diff_path, overwrite=True)
    d = res.difference.to_numpy()
    good = d.good_pixels(("NO_DATA", "EDGE", "SAT", "BAD", "DETECTED"))
    z = (d.image / np.sqrt(d.variance))[good]
    print(f"  ImagePsfMatchTask: kernel sum {res.psf_matching_kernel.kernel_sum():.4f}, "
          f"{res.kernel_fit.n_used} kernel candidates used; difference noise "
          f"{np.std(z):.3f} sigma (1 expected); wrote {diff_path}")
    for row in pair.transients:
        xi, yi = int(round(row["x"])) - d.xy0[0], int(round(row["y"])) - d.xy0[1]
        ap = d.image[yi - 12:yi + 13, xi - 12:xi + 13]
        if ap.shape == (25, 25) and np.isfinite(ap).all():
            print(f"    transient at ({row['x']:.1f}, {row['y']:.1f}): injected {row['delta_flux']:.0f}, "
                  f"measured {ap.sum():.0f} (25x25 aperture)")
    # Never a fake result: say what the demo does not do yet.
    print("  not yet available in this version: decorrelation, the score image and DIA source "
          "detection (AlardLuptonSubtractTask).")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "info": (cmd_info, "versions, resolved backend, CUDA devices, kernel locations"),
    "demo": (cmd_demo, "simulate an image pair and run gpudiff on it"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``gpudiff`` command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--backend", choices=BACKEND_NAMES, default=None,
                        help="array backend (default: $GPUDIFF_BACKEND or auto)")
    common.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")

    parser = argparse.ArgumentParser(
        prog="gpudiff", description="Astronomical image differencing on GPUs (LSST algorithms).")
    parser.add_argument("--version", action="version", version=f"gpudiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        if name == "demo":
            p.add_argument("--out", default="gpudiff_demo", help="output directory (default: ./gpudiff_demo)")
            p.add_argument("--size", type=_positive_int, default=512, help="image side in pixels (default 512)")
            p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    return parser


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 256:
        # Smaller fields hold too few stars to constrain a matching kernel.
        raise argparse.ArgumentTypeError(f"size must be at least 256 pixels, got {v}")
    return v


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gpudiff`` console script and ``python -m gpudiff``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else (logging.INFO if args.verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    func, _ = COMMANDS[args.command]
    try:
        return func(args)
    except GpudiffError as exc:
        print(f"gpudiff {args.command}: error: {exc}", file=sys.stderr)
        return 1
