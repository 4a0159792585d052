"""``gpudiff subtract SCIENCE TEMPLATE -o DIFF.fits``: AL subtraction (or the score image),
DIA source detection, outputs in the LSST-style layout with the figures in the header."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..backend import resolve_backend
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


def merge_overrides(*layers: dict | None) -> dict:
    """Deep-merge config override mappings; later layers win, nested mappings merge."""
    out: dict = {}
    for layer in layers:
        for k, v in (layer or {}).items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = merge_overrides(out[k], v)
            else:
                out[k] = dict(v) if isinstance(v, dict) else v
    return out


def write_table_atomic(table, path, overwrite: bool = False) -> None:
    """Write an astropy table (FITS by suffix, else ECSV) atomically
    (:func:`gpudiff.image.atomic.atomic_write`): a killed job never leaves a truncated catalog."""
    import os

    from ..image.atomic import atomic_write

    path = os.fspath(path)
    fmt = "fits" if path.lower().endswith((".fits", ".fit")) else "ascii.ecsv"
    atomic_write(path, lambda f: table.write(f, format=fmt), overwrite, text=fmt != "fits")


def subtract_files(science, template, output, *, overrides: dict | None = None, mode: str | None = None,
                   preconvolve: bool = False, sources=None, sources_out=None, matched_template_out=None,
                   detect: bool = True, plots=None, backend=None, overwrite: bool = False, log=print) -> dict:
    """Subtract ``template`` from ``science`` (FITS files) and write the difference: the file-level
    work of ``gpudiff subtract``, shared by the command and by :mod:`gpudiff.batch`.

    Parameters
    ----------
    science, template, output : str or path-like
        Input exposures and the difference (or, with ``preconvolve``, score) FITS to write;
        every FITS output is written atomically (temporary name, then rename).
    overrides : dict, optional
        Config fields of ``AlardLuptonSubtractConfig`` (or the preconvolve config), nested
        mappings for nested configs, as from ``--config``/``--set``.
    mode : {"auto", "convolveTemplate", "convolveScience"}, optional
        Overrides the config's ``mode``.
    preconvolve : bool
        Write the score image of ``AlardLuptonPreconvolveSubtractTask``.
    sources : str, optional
        Kernel-source catalog (x, y and S/N or flux/flux_err columns).
    sources_out, matched_template_out, plots : str, optional
        Optional outputs: DIA catalog (FITS or ECSV), PSF-matched template, diagnostic PNGs.
    detect : bool
        Run DIA source detection (the difference then carries the detection mask planes).
    backend : Backend or str, optional
    overwrite : bool
        Replace existing outputs; otherwise an existing ``output`` fails before any work.
    log : callable
        Receives the one-line notes (e.g. "no PSF in the file; estimated one").

    Returns
    -------
    dict
        ``output``, ``mode``, ``backend``, ``kernel_sum``, ``n_kernel_sources``,
        ``n_candidates_used``, ``n_candidates_rejected``, ``template_coverage``,
        ``n_dia_sources`` (None without detection) and ``timings`` (stage → seconds).
    """
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
    from ..image.atomic import check_writable
    from ._config import apply_overrides

    science, template, out = str(science), str(template), Path(output)
    if out.exists() and not overwrite:
        raise InvalidInputError(f"output {out} exists; pass --overwrite to replace it")
    for extra in (out, sources_out, matched_template_out):  # fail before the work, not after
        if extra is not None:
            check_writable(extra, overwrite=True)
    be = resolve_backend(backend)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    sci_exp = read_exposure(science, backend=be)
    tmpl_exp = read_exposure(template, backend=be)
    sci_exp, tmpl_exp = ensure_psf(sci_exp, science, log), ensure_psf(tmpl_exp, template, log)
    timings["read"] = time.perf_counter() - t
    if not tmpl_exp.bbox.contains(sci_exp.bbox) or (
            tmpl_exp.wcs is not None and sci_exp.wcs is not None
            and not wcs_equal(tmpl_exp.wcs, sci_exp.bbox, sci_exp.wcs, sci_exp.bbox)):
        if tmpl_exp.wcs is None or sci_exp.wcs is None:
            raise InvalidInputError(f"template {template} does not cover the science grid and one of "
                                    "the two files has no WCS to warp with")
        t = time.perf_counter()
        tmpl_exp = warp_exposure(tmpl_exp, sci_exp.wcs, sci_exp.bbox, name="template", dest_name="science",
                                 backend=be)
        timings["warp"] = time.perf_counter() - t
    cfg_cls = AlardLuptonPreconvolveSubtractConfig if preconvolve else AlardLuptonSubtractConfig
    overrides = merge_overrides(overrides, {"mode": mode} if mode else None)
    config = apply_overrides(cfg_cls(), overrides)
    src_table = None
    if sources:
        from astropy.table import Table

        try:
            src_table = Table.read(str(sources))
        except Exception as exc:
            raise InvalidInputError(f"cannot read source catalog {sources}: {exc}") from None
    t = time.perf_counter()
    if preconvolve:
        res = AlardLuptonPreconvolveSubtractTask(config, backend=be).run(tmpl_exp, sci_exp, src_table)
        result_exp = res.score_exposure
    else:
        res = AlardLuptonSubtractTask(config, backend=be).run(tmpl_exp, sci_exp, src_table)
        result_exp = res.difference
    timings["subtract"] = time.perf_counter() - t
    for k, v in res.metadata.items():
        if k.startswith("time_"):
            timings[k[5:]] = v
    dia = None
    if detect:
        t = time.perf_counter()
        if preconvolve:
            dm = DetectAndMeasureScoreTask(backend=be).run(result_exp, result_exp)
        else:
            dm = DetectAndMeasureTask(backend=be).run(result_exp)
        result_exp, dia = dm.subtracted_measured_exposure, dm.dia_sources
        timings["detect"] = time.perf_counter() - t
    for key, card in _header(res, be.name, timings).items():
        result_exp.metadata[key] = card
    t = time.perf_counter()
    result_exp.to_backend("numpy").write(out, overwrite=True)
    if matched_template_out:
        res.matched_template.to_backend("numpy").write(matched_template_out, overwrite=overwrite)
    if dia is not None and sources_out:
        write_table_atomic(dia, sources_out, overwrite=overwrite)
    if plots:
        import numpy as np

        from ._plots import kernel_grid_png, residual_histogram_png

        pdir = Path(plots)
        pdir.mkdir(parents=True, exist_ok=True)
        kernel_grid_png(pdir / "kernel_grid.png", res.psf_matching_kernel, sci_exp.bbox)
        mi = result_exp.masked_image.to_numpy()
        good = mi.good_pixels(("NO_DATA", "EDGE", "SAT", "BAD", "CR", "DETECTED", "DETECTED_NEGATIVE"))
        residual_histogram_png(pdir / "residual_histogram.png", (mi.image / np.sqrt(mi.variance))[good])
    timings["write"] = time.perf_counter() - t
    m = res.metadata
    return {
        "output": str(out),
        "mode": str(m.get("mode", "")),
        "backend": be.name,
        "kernel_sum": float(m.get("kernel_sum", float("nan"))),
        "n_kernel_sources": int(m.get("n_kernel_sources", 0)),
        "n_candidates_used": int(m.get("n_candidates_used", 0)),
        "n_candidates_rejected": int(m.get("n_candidates_rejected", 0)),
        "template_coverage": float(m.get("template_coverage", float("nan"))),
        "n_dia_sources": None if dia is None else len(dia),
        "timings": {k: float(v) for k, v in timings.items()},
    }


def run(args: argparse.Namespace) -> int:
    from ._config import load_config_file, parse_set

    overrides = merge_overrides(load_config_file(args.config), parse_set(args.set))
    s = subtract_files(args.science, args.template, args.output, overrides=overrides, mode=args.mode,
                       preconvolve=args.preconvolve, sources=args.sources, sources_out=args.sources_out,
                       matched_template_out=args.matched_template_out, detect=not args.no_detect,
                       plots=args.plots, backend=args.backend, overwrite=args.overwrite)
    print(f"gpudiff subtract: {s['mode']} on {s['backend']}; kernel sum {s['kernel_sum']:.4f}; "
          f"{s['n_candidates_used']} kernel candidates used; wrote {s['output']}"
          + (f"; {s['n_dia_sources']} DIA sources" if s["n_dia_sources"] is not None else ""))
    print("  timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in s["timings"].items()))
    return 0
