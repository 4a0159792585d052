"""``gpudiff match-backgrounds``: match the backgrounds of a tract's warps to a reference visit.

::

    gpudiff match-backgrounds WARP... --out-dir DIR [--ref-visit ID] [--bin-size N]
                              [--visit-key KEY] [--patch-size N] [--patch-overlap N]
                              [--tract-box X0,Y0,X1,Y1] [--mask-detected]
                              [--noise|--variance|--ivar FILE...] [--mask FILE... [--mask-bits B]]
                              [--config FILE] [--set FIELD=VALUE ...] [--overwrite] [--backend ...]
                              [-v]
    gpudiff match-backgrounds [--config FILE] [--set ...] --show-config [--format toml]

Runs :class:`gpudiff.tasks.MatchBackgroundsTask` (LSST's tract-level ``MatchBackgroundsTask``,
docs/algorithms.md §9.1).  Each warp is an exposure in tract pixel coordinates (its xy0) whose
header card ``--visit-key`` (default ``VISIT``) holds its visit id.  Writes, for every input
``NAME.fits``: ``DIR/NAME.matched.fits`` (the matched warp, LSST layout) and
``DIR/NAME.background.fits`` (the model added: a float32 image with xy0 cards, and a ``BINNED`` HDU
with the visit's tract bin grid); and ``DIR/match_backgrounds.ecsv``, the per-visit table
(reference-choice costs and diagnostics), which is also printed.  All files are written atomically;
existing outputs need ``--overwrite``.

``--noise``/``--variance``/``--ivar``/``--mask`` take one file for every warp or exactly one
per warp, in the warps' order (:mod:`gpudiff.image.inputs`); the matched warps' ``GDNOISRC``
says where their variance came from.  Exit status 3 when a background model or a matched
warp has non-finite values where it has data.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError

HELP = "match the backgrounds of warps (visits × patches of a tract) to a reference visit"

SUMMARY_NAME = "match_backgrounds.ecsv"


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _box(text: str):
    from ..image import Box

    try:
        x0, y0, x1, y1 = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X0,Y0,X1,Y1 (integers), got {text!r}") from None
    if x1 <= x0 or y1 <= y0:
        raise argparse.ArgumentTypeError(f"empty box {text!r}")
    return Box(x0, y0, x1, y1)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``gpudiff match-backgrounds`` to ``parser``."""
    parser.add_argument(
        "warps", nargs="+", metavar="WARP", help="warp exposures (FITS), several visits"
    )
    parser.add_argument(
        "--out-dir", required=True, metavar="DIR", help="folder for the outputs (created)"
    )
    parser.add_argument(
        "--ref-visit", type=int, metavar="ID", help="reference visit (default: chosen by cost)"
    )
    parser.add_argument(
        "--bin-size", type=_positive_int, metavar="N", help="tract bin size in pixels (default 128)"
    )
    parser.add_argument(
        "--visit-key", default="VISIT", metavar="KEY", help="header card of the visit id"
    )
    parser.add_argument(
        "--patch-size",
        type=_positive_int,
        default=4000,
        metavar="N",
        help="inner patch size of the tract, pixels (default 4000, LSST's)",
    )
    parser.add_argument(
        "--patch-overlap",
        type=int,
        default=100,
        metavar="N",
        help="patch overlap border, pixels (default 100, LSST's)",
    )
    parser.add_argument(
        "--tract-box",
        type=_box,
        metavar="X0,Y0,X1,Y1",
        help="tract pixels (default: from 0,0 to the far corner of the warps)",
    )
    parser.add_argument(
        "--mask-detected", action="store_true", help="also ignore DETECTED pixels in the bins"
    )
    parser.add_argument(
        "--config", metavar="FILE", help="JSON or TOML file of MatchBackgroundsConfig fields"
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="override a config field, e.g. tract_bg_model.interpolation=LINEAR (repeatable)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    from ._config import add_show_config
    from ._inputs import add_input_options

    add_show_config(parser, "MatchBackgroundsConfig")
    # Background matching uses no PSF: only the noise and mask inputs apply.
    add_input_options(parser, roles=(), nargs="+", psf=False)


def _outputs(paths, out_dir: Path) -> list[tuple[Path, Path]]:
    outs, seen = [], set()
    for p in paths:
        stem = Path(p).name
        for suffix in (".fits.gz", ".fits", ".fit", ".fz"):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        if stem in seen:
            raise InvalidInputError(
                f"two inputs are named {stem!r}: their outputs would collide in {out_dir}"
            )
        seen.add(stem)
        outs.append((out_dir / f"{stem}.matched.fits", out_dir / f"{stem}.background.fits"))
    return outs


def _background_hdus(bkg, reference: int):
    import numpy as np
    from astropy.io import fits

    from ..image.fitsio import _write_xy0

    model = np.asarray(
        bkg.model if isinstance(bkg.model, np.ndarray) else bkg.model.get(), dtype=np.float32
    )
    prim = fits.PrimaryHDU(model)
    h = prim.header
    h["EXTNAME"] = "BACKGROUND"
    h["VISIT"] = (int(bkg.visit), "visit of the warp")
    h["PATCH"] = (int(bkg.patch), "sequential patch index in the tract")
    h["REFVISIT"] = (int(reference), "reference visit the warp was matched to")
    h["ISREF"] = (bool(bkg.is_reference), "warp of the reference visit (zero model)")
    h["BUNIT"] = ("adu", "model added to the warp image (image units)")
    _write_xy0(h, (bkg.bbox.x0, bkg.bbox.y0))
    hdus = [prim]
    if bkg.binned is not None:
        b = fits.ImageHDU(np.asarray(bkg.binned, dtype=np.float64), name="BINNED")
        b.header["XCEN0"] = (float(bkg.x_centres[0]), "tract x of the first bin centre")
        b.header["YCEN0"] = (float(bkg.y_centres[0]), "tract y of the first bin centre")
        b.header["XBIN"] = (
            float(bkg.x_centres[1] - bkg.x_centres[0]) if len(bkg.x_centres) > 1 else 0.0,
            "bin spacing along x, px",
        )
        b.header["YBIN"] = (
            float(bkg.y_centres[1] - bkg.y_centres[0]) if len(bkg.y_centres) > 1 else 0.0,
            "bin spacing along y, px",
        )
        hdus.append(b)
    return fits.HDUList(hdus)


def task_config(args: argparse.Namespace):
    """The ``MatchBackgroundsConfig`` of the command line: ``--visit-key``, then ``--config``
    and ``--set``, then ``--bin-size`` and ``--mask-detected`` (which win)."""
    from ..tasks.match_backgrounds import MatchBackgroundsConfig

    config = MatchBackgroundsConfig(visit_key=args.visit_key)
    if getattr(args, "config", None) or getattr(args, "set", None):
        from ._config import apply_overrides, load_config_file, parse_set

        config = apply_overrides(config, load_config_file(args.config), "MatchBackgroundsConfig")
        config = apply_overrides(config, parse_set(args.set), "MatchBackgroundsConfig")
    tb = config.tract_bg_model
    if args.bin_size is not None:
        tb = replace(tb, x_bin=args.bin_size, y_bin=args.bin_size)
    if args.mask_detected and "DETECTED" not in tb.mask:
        tb = replace(tb, mask=tb.mask + ("DETECTED",))
    return replace(config, tract_bg_model=tb)


def run(args: argparse.Namespace) -> int:
    """Read the warps, match, write; print the per-visit summary.  Errors are GpudiffErrors."""
    from ..backend import get_backend
    from ..image import Box, read_exposure, write_exposure
    from ..image.atomic import atomic_write, check_writable
    from ..image.tract import TractGrid
    from ..tasks.match_backgrounds import MatchBackgroundsTask

    t0 = time.perf_counter()
    config = task_config(args)
    if getattr(args, "show_config", False):
        from ._config import show_config

        return show_config(config, args.config_format)
    if args.patch_overlap < 0:
        raise InvalidInputError(f"--patch-overlap must be >= 0, got {args.patch_overlap}")

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outs = _outputs(args.warps, out_dir)
    summary = out_dir / SUMMARY_NAME
    for pair in outs:  # fail before the work, not after it
        for p in pair:
            check_writable(p, overwrite=args.overwrite)
    check_writable(summary, overwrite=args.overwrite)

    be = get_backend(getattr(args, "backend", None))
    warps = [read_exposure(p, backend=be) for p in args.warps]
    warps, sources = _attach(warps, args)
    for p, w in zip(args.warps, warps):
        if args.visit_key not in w.metadata:
            raise InvalidInputError(
                f"{p}: no {args.visit_key!r} header card (the visit id); use --visit-key"
            )
    if args.tract_box is not None:
        box = args.tract_box
    else:
        if any(w.xy0[0] < 0 or w.xy0[1] < 0 for w in warps):
            raise InvalidInputError("warps with negative xy0: give the tract with --tract-box")
        box = Box(0, 0, max(w.bbox.x1 for w in warps), max(w.bbox.y1 for w in warps))
    tract = TractGrid(box, (args.patch_size, args.patch_size), args.patch_overlap)
    res = MatchBackgroundsTask(config, backend=be).run(warps, tract, ref_visit=args.ref_visit)

    from ._quality import check_background_models, check_exposure_finite, report

    quality = check_background_models(
        [
            (p, b.model if isinstance(b.model, np.ndarray) else be.asnumpy(b.model))
            for p, b in zip(args.warps, res.background_info_list)
        ]
    )
    for p, m in zip(args.warps, res.matched_image_list):
        quality += [f"{p}: {q}" for q in check_exposure_finite(m, "matched warp")]
    for w, m, bkg, (mpath, bpath), src in zip(
        warps, res.matched_image_list, res.background_info_list, outs, sources
    ):
        m.metadata["REFVISIT"] = (res.reference_visit, "background-matching reference visit")
        m.metadata["GDNOISRC"] = (src.noise, f"variance: {src.noise_detail}"[:46])
        write_exposure(mpath, m, overwrite=args.overwrite)
        hdul = _background_hdus(bkg, res.reference_visit)
        atomic_write(bpath, lambda f, h=hdul: h.writeto(f, checksum=True), overwrite=args.overwrite)
    table = res.diagnostics.copy()
    table.meta["inputs"] = [os.fspath(p) for p in args.warps]
    table.meta["tract_box"] = [box.x0, box.y0, box.x1, box.y1]
    atomic_write(
        summary, lambda f: table.write(f, format="ascii.ecsv"), overwrite=args.overwrite, text=True
    )

    print(
        f"gpudiff match-backgrounds: {len(warps)} warps of {len(res.diagnostics)} visits "
        f"on {tract!r}"
    )
    how = "given" if res.reference_choice is None else "chosen by cost"
    print(f"  reference visit {res.reference_visit} ({how}); per-visit summary:")
    shown = table.copy()
    for name in shown.colnames:
        if shown[name].dtype.kind == "f":
            shown[name].info.format = ".4g"
    for line in shown.pformat(max_lines=-1, max_width=-1):
        print("  " + line)
    print(
        f"  wrote {2 * len(warps)} FITS files and {summary} (backend {be.name}, "
        f"{time.perf_counter() - t0:.1f} s)"
    )
    return report("match-backgrounds", quality)


def _attach(warps: list, args: argparse.Namespace) -> tuple[list, list]:
    """The --noise/--variance/--ivar/--mask inputs (one for all warps or one per warp)."""
    from ..image.inputs import attach_inputs
    from ._inputs import per_input

    n = len(warps)
    each = {
        k: per_input(getattr(args, k, None), n, f"--{k}")
        for k in ("noise", "variance", "ivar", "mask")
    }
    out, sources = [], []
    for i, (w, p) in enumerate(zip(warps, args.warps)):
        w, src = attach_inputs(
            w,
            p,
            need_psf=False,
            mask_bits=getattr(args, "mask_bits", None),
            log=lambda m: print("  " + m),
            **{k: v[i] for k, v in each.items()},
        )
        out.append(w)
        sources.append(src)
    return out, sources
