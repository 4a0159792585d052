"""``gpudiff subtract SCIENCE TEMPLATE -o DIFF.fits``: AL subtraction (or the score image),
DIA source detection, outputs in the LSST-style layout with the figures in the header."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..backend import get_backend
from ..errors import InvalidInputError

HELP = "PSF-match and subtract a template from a science image, detect DIA sources"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("science", help="science exposure (LSST-style, CCDData or plain FITS)")
    parser.add_argument("template", help="template exposure (warped onto the science grid if needed)")
    parser.add_argument("-o", "--output", required=True, help="difference (or score) FITS to write")
    parser.add_argument("--mode", choices=("auto", "convolveTemplate", "convolveScience"), default=None,
                        help="which image to convolve (default: the config's, convolveTemplate)")
    parser.add_argument("--preconvolve", action="store_true",
                        help="write the preconvolved score image (AlardLuptonPreconvolveSubtractTask)")
    parser.add_argument("--sources", help="kernel-source catalog (x, y and S/N or flux/flux_err columns)")
    parser.add_argument("--sources-out", help="write the DIA source catalog here (ECSV or FITS)")
    parser.add_argument("--matched-template-out", help="write the PSF-matched template here")
    parser.add_argument("--no-detect", action="store_true", help="skip DIA source detection")
    parser.add_argument("--plots", metavar="DIR",
                        help="write diagnostic PNGs here: kernel_grid.png, residual_histogram.png")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--config", help="JSON or TOML file of task config fields")
    parser.add_argument("--set", action="append", metavar="FIELD=VALUE",
                        help="override one config field (dotted for nested, repeatable)")


def ensure_psf(exposure, path: str, log=print):
    """The exposure with a PSF: its own, else one estimated from its stars, else (with a
    warning) a Gaussian of the header's ``FWHM`` card in pixels; a PsfError otherwise."""
    from ..errors import PsfError
    from ..image import Exposure, GaussianPsf, estimate_psf

    if exposure.psf is not None:
        return exposure
    errors = []
    for kw in ({}, {"kernel_size": 25, "min_stars": 3}):  # the second fits small cutouts
        try:
            psf = estimate_psf(exposure, **kw)
            log(f"  {path}: no PSF in the file; estimated one from its stars (FWHM {psf.fwhm():.2f} px)")
            break
        except PsfError as exc:
            errors.append(str(exc))
    else:
        fwhm = exposure.metadata.get("FWHM")
        try:
            fwhm = float(fwhm)
        except (TypeError, ValueError):
            fwhm = None
        if not fwhm or not fwhm > 0:
            raise PsfError(f"{path}: no PSF in the file and none could be estimated ({errors[-1]})")
        psf = GaussianPsf(fwhm=fwhm)
        log(f"  warning: {path}: no PSF in the file and too few stars to estimate one; using a "
            f"Gaussian of the header's FWHM = {fwhm:.2f} px")
    return Exposure(exposure.masked_image, psf, exposure.wcs, exposure.photo_calib, exposure.metadata)


def _header(res, backend, timings: dict) -> dict:
    m = res.metadata
    cards = {
        "GDMODE": (m.get("mode", ""), "gpudiff: image that was convolved"),
        "GDKSUM": (float(m.get("kernel_sum", float("nan"))), "PSF-matching kernel sum"),
        "GDNSRC": (int(m.get("n_kernel_sources", 0)), "kernel sources selected"),
        "GDNUSED": (int(m.get("n_candidates_used", 0)), "kernel candidates used"),
        "GDNREJ": (int(m.get("n_candidates_rejected", 0)), "kernel candidates rejected"),
        "GDTCOV": (float(m.get("template_coverage", float("nan"))), "template coverage fraction"),
        "GDBACKND": (backend, "gpudiff array backend"),
    }
    if "scale_science_variance_factor" in m:
        cards["GDSVSCI"] = (float(m["scale_science_variance_factor"]), "science variance scale")
        cards["GDSVTMP"] = (float(m["scale_template_variance_factor"]), "template variance scale")
    for i, (k, v) in enumerate(sorted(timings.items())):
        cards[f"GDT{i:02d}"] = (round(float(v), 4), f"seconds: {k}")
    return cards


def run(args: argparse.Namespace) -> int:
    from ..image import read_exposure
    from ..ops.warp import warp_exposure, wcs_equal
    from ..tasks import (
        AlardLuptonPreconvolveSubtractConfig,
        AlardLuptonPreconvolveSubtractTask,
        AlardLuptonSubtractConfig,
        AlardLuptonSubtractTask,
        DetectAndMeasureScoreTask,
        DetectAndMeasureTask,
    )
    from ._config import apply_overrides, load_config_file, parse_set

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise InvalidInputError(f"output {out} exists; pass --overwrite to replace it")
    be = get_backend(args.backend)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    science = read_exposure(args.science, backend=be)
    template = read_exposure(args.template, backend=be)
    science, template = ensure_psf(science, args.science), ensure_psf(template, args.template)
    timings["read"] = time.perf_counter() - t
    if not template.bbox.contains(science.bbox) or (
            template.wcs is not None and science.wcs is not None
            and not wcs_equal(template.wcs, science.bbox, science.wcs, science.bbox)):
        if template.wcs is None or science.wcs is None:
            raise InvalidInputError(f"template {args.template} does not cover the science grid and one of "
                                    "the two files has no WCS to warp with")
        t = time.perf_counter()
        template = warp_exposure(template, science.wcs, science.bbox, name="template", dest_name="science",
                                 backend=be)
        timings["warp"] = time.perf_counter() - t
    cfg_cls = AlardLuptonPreconvolveSubtractConfig if args.preconvolve else AlardLuptonSubtractConfig
    overrides = load_config_file(args.config)
    for k, v in parse_set(args.set).items():
        overrides[k] = {**overrides.get(k, {}), **v} if isinstance(v, dict) else v
    if args.mode:
        overrides["mode"] = args.mode
    config = apply_overrides(cfg_cls(), overrides)
    sources = None
    if args.sources:
        from astropy.table import Table

        try:
            sources = Table.read(args.sources)
        except Exception as exc:
            raise InvalidInputError(f"cannot read source catalog {args.sources}: {exc}") from None
    t = time.perf_counter()
    if args.preconvolve:
        res = AlardLuptonPreconvolveSubtractTask(config, backend=be).run(template, science, sources)
        result_exp = res.score_exposure
    else:
        res = AlardLuptonSubtractTask(config, backend=be).run(template, science, sources)
        result_exp = res.difference
    timings["subtract"] = time.perf_counter() - t
    for k, v in res.metadata.items():
        if k.startswith("time_"):
            timings[k[5:]] = v
    dia = None
    if not args.no_detect:
        t = time.perf_counter()
        if args.preconvolve:
            dm = DetectAndMeasureScoreTask(backend=be).run(result_exp, result_exp)
        else:
            dm = DetectAndMeasureTask(backend=be).run(result_exp)
        result_exp, dia = dm.subtracted_measured_exposure, dm.dia_sources
        timings["detect"] = time.perf_counter() - t
    for key, card in _header(res, be.name, timings).items():
        result_exp.metadata[key] = card
    t = time.perf_counter()
    result_exp.to_backend("numpy").write(out, overwrite=True)
    if args.matched_template_out:
        res.matched_template.to_backend("numpy").write(args.matched_template_out, overwrite=args.overwrite)
    if dia is not None and args.sources_out:
        fmt = "fits" if str(args.sources_out).lower().endswith((".fits", ".fit")) else "ascii.ecsv"
        dia.write(args.sources_out, format=fmt, overwrite=args.overwrite)
    if args.plots:
        import numpy as np

        from ._plots import kernel_grid_png, residual_histogram_png

        pdir = Path(args.plots)
        pdir.mkdir(parents=True, exist_ok=True)
        kernel_grid_png(pdir / "kernel_grid.png", res.psf_matching_kernel, science.bbox)
        mi = result_exp.masked_image.to_numpy()
        good = mi.good_pixels(("NO_DATA", "EDGE", "SAT", "BAD", "CR", "DETECTED", "DETECTED_NEGATIVE"))
        residual_histogram_png(pdir / "residual_histogram.png", (mi.image / np.sqrt(mi.variance))[good])
    timings["write"] = time.perf_counter() - t
    m = res.metadata
    print(f"gpudiff subtract: {m.get('mode')} on {be.name}; kernel sum {m.get('kernel_sum', float('nan')):.4f}; "
          f"{m.get('n_candidates_used', 0)} kernel candidates used; wrote {out}"
          + (f"; {len(dia)} DIA sources" if dia is not None else ""))
    print("  timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return 0
