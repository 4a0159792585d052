"""``gpudiff subtract SCIENCE TEMPLATE -o DIFF.fits``: AL subtraction (or the score image),
DIA source detection, outputs in the LSST-style layout with the figures in the header."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from ..backend import resolve_backend
from ..backend.threads import accepts_threads
from ..errors import InvalidInputError

HELP = "PSF-match and subtract a template from a science image, detect DIA sources"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("science", help="science exposure (LSST-style, CCDData or plain FITS)")
    parser.add_argument(
        "template", help="template exposure (warped onto the science grid if needed)"
    )
    parser.add_argument("-o", "--output", required=True, help="difference (or score) FITS to write")
    parser.add_argument(
        "--mode",
        choices=("auto", "convolveTemplate", "convolveScience"),
        default=None,
        help="which image to convolve (default: auto, unless --config/--set sets mode)",
    )
    parser.add_argument(
        "--preconvolve",
        action="store_true",
        help="write the preconvolved score image (AlardLuptonPreconvolveSubtractTask)",
    )
    parser.add_argument(
        "--sources", help="kernel-source catalog (x, y and S/N or flux/flux_err columns)"
    )
    parser.add_argument("--sources-out", help="write the DIA source catalog here (ECSV or FITS)")
    parser.add_argument("--matched-template-out", help="write the PSF-matched template here")
    parser.add_argument("--no-detect", action="store_true", help="skip DIA source detection")
    parser.add_argument(
        "--plots",
        metavar="DIR",
        help="write diagnostic PNGs here: kernel_grid.png, residual_histogram.png",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--config", help="JSON or TOML file of task config fields")
    parser.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="override one config field (dotted for nested, repeatable)",
    )
    from ._config import add_show_config
    from ._inputs import add_input_options

    add_show_config(
        parser, "AlardLuptonSubtractConfig (with --preconvolve: the preconvolve config)"
    )
    add_input_options(parser, roles=("science", "template"))


def ensure_psf(exposure, path: str, log=print):
    """The exposure with a PSF: its own, else one estimated from its stars, else (with a
    warning) a Gaussian of the header's ``FWHM`` card in pixels; a PsfError otherwise.
    (:func:`gpudiff.image.inputs.resolve_psf` without a given PSF or FWHM.)"""
    from ..image.inputs import resolve_psf

    return resolve_psf(exposure, path, log=lambda m: log("  " + m))[0]


def _box_str(box) -> str:
    """``[x0:x1, y0:y1]`` in parent pixels, for messages."""
    return f"[{box.x0}:{box.x1}, {box.y0}:{box.y1}]"


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
    # The spatial orders the fit actually used (lowered automatically on small fields).
    for key, card, what in (
        ("spatial_kernel_order_used", "GDKORD", "spatial kernel order used"),
        ("spatial_bg_order_used", "GDBORD", "spatial bg order used (-1: none fitted)"),
    ):
        if m.get(key) is not None:
            cards[card] = (int(m[key]), what)
    if m.get("kernel_star_flux_ratio") is not None:
        # The photometric check of the kernel sum: flux ratio measured on the kernel stars.
        cards["GDKRAT"] = (float(m["kernel_star_flux_ratio"]), "kernel stars' flux ratio")
        cards["GDKRATE"] = (float(m["kernel_star_flux_ratio_err"]), "its uncertainty")
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

    import warnings

    path = os.fspath(path)
    fmt = "fits" if path.lower().endswith((".fits", ".fit")) else "ascii.ecsv"
    with warnings.catch_warnings():
        # Catalog metadata keys longer than 8 characters become HIERARCH cards, which
        # astropy reads back as they were: nothing for the user to act on.
        warnings.filterwarnings("ignore", message="Keyword name .* HIERARCH card")
        atomic_write(path, lambda f: table.write(f, format=fmt), overwrite, text=fmt != "fits")


@accepts_threads
def subtract_files(
    science,
    template,
    output,
    *,
    overrides: dict | None = None,
    mode: str | None = None,
    preconvolve: bool = False,
    sources=None,
    sources_out=None,
    matched_template_out=None,
    detect: bool = True,
    plots=None,
    backend=None,
    overwrite: bool = False,
    log=print,
    science_psf=None,
    template_psf=None,
    science_noise=None,
    template_noise=None,
    science_variance=None,
    template_variance=None,
    science_ivar=None,
    template_ivar=None,
    science_mask=None,
    template_mask=None,
    science_mask_bits=None,
    template_mask_bits=None,
    fwhm: float | None = None,
    science_fwhm: float | None = None,
    template_fwhm: float | None = None,
) -> dict:
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
    threads : int, optional
        Host threads for thread pools and FFTs during the call (default: the process's
        setting, :func:`gpudiff.backend.threads.get_num_threads`).
    overwrite : bool
        Replace existing outputs; otherwise an existing ``output`` fails before any work.
    log : callable
        Receives the one-line notes (e.g. "no PSF in the file; estimated one").
    science_psf, template_psf : Psf, 2-D array or path, optional
        PSFs that win over the files' own (see :mod:`gpudiff.image.inputs`).
    science_noise, template_noise : array or path, optional
        1σ maps; ``*_variance`` variance maps; ``*_ivar`` inverse-variance maps (at most one
        of the three per image; a file's header may correct the kind).
    science_mask, template_mask : int array or path, optional
        Masks OR-ed into the images' own; ``*_mask_bits`` name their bits (``"BAD=0,SAT=1"``).
    fwhm, science_fwhm, template_fwhm : float, optional
        Last-resort PSF FWHM in pixels (per image, else ``fwhm`` for both).

    Returns
    -------
    dict
        ``output``, ``mode``, ``backend``, ``kernel_sum``, ``n_kernel_sources``,
        ``n_candidates_used``, ``n_candidates_rejected``, ``template_coverage``,
        ``n_dia_sources`` (None without detection), ``timings`` (stage → seconds),
        ``inputs`` (per image: where its PSF, variance and mask came from; also written as
        the ``GDPSFSRC``/``GDNOISRC``/``GDTPSFSR``/``GDTNOISR`` cards) and ``quality``
        (the failed quality checks, :mod:`gpudiff.commands._quality`; empty when passed —
        the output is written either way).
    """
    from ..image.inputs import input_cards, read_with_inputs
    from ..ops.register import content_offset
    from ..ops.warp import warp_exposure, wcs_equal
    from ..tasks import (
        AlardLuptonPreconvolveSubtractTask,
        AlardLuptonSubtractTask,
        DetectAndMeasureScoreTask,
        DetectAndMeasureTask,
    )
    from ..image.atomic import check_writable
    from ._quality import check_subtraction

    science, template, out = str(science), str(template), Path(output)
    if out.exists() and not overwrite:
        raise InvalidInputError(f"output {out} exists; pass --overwrite to replace it")
    for extra in (out, sources_out, matched_template_out):  # fail before the work, not after
        if extra is not None:
            check_writable(extra, overwrite=True)
    be = resolve_backend(backend)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    note = lambda m: log("  " + m)  # noqa: E731
    sci_exp, sci_src = read_with_inputs(
        science,
        backend=be,
        psf=science_psf,
        noise=science_noise,
        variance=science_variance,
        ivar=science_ivar,
        mask=science_mask,
        mask_bits=science_mask_bits,
        fwhm=science_fwhm if science_fwhm is not None else fwhm,
        log=note,
    )
    tmpl_exp, tmpl_src = read_with_inputs(
        template,
        backend=be,
        psf=template_psf,
        noise=template_noise,
        variance=template_variance,
        ivar=template_ivar,
        mask=template_mask,
        mask_bits=template_mask_bits,
        fwhm=template_fwhm if template_fwhm is not None else fwhm,
        log=note,
    )
    timings["read"] = time.perf_counter() - t
    if not tmpl_exp.bbox.contains(sci_exp.bbox) or (
        tmpl_exp.wcs is not None
        and sci_exp.wcs is not None
        and not wcs_equal(tmpl_exp.wcs, sci_exp.bbox, sci_exp.wcs, sci_exp.bbox)
    ):
        if tmpl_exp.wcs is None or sci_exp.wcs is None:
            # No WCS to warp with: the two files share one parent pixel frame (their xy0),
            # as afw cutouts of one exposure do.  As LSST's template retrieval, the science
            # pixels the template does not cover become NO_DATA in it (and so in the
            # difference); no overlap at all is an error.
            over = tmpl_exp.bbox.intersection(sci_exp.bbox)
            if over is None:
                raise InvalidInputError(
                    f"template {template} (box {_box_str(tmpl_exp.bbox)}) does not overlap "
                    f"the science grid (box {_box_str(sci_exp.bbox)}) and one of the two "
                    "files has no WCS to warp with"
                )
            # Boxes that differ are where a frame goes wrong (an xy0 lost or misread):
            # the content must agree with the frame before the template is placed in it.
            off = content_offset(sci_exp.masked_image, tmpl_exp.masked_image)
            if not off.registered:
                raise InvalidInputError(
                    f"template {template} (box {_box_str(tmpl_exp.bbox)}) and science "
                    f"(box {_box_str(sci_exp.bbox)}) have no WCS, and in their common pixel "
                    f"frame the template's content lies ({off.dx:+d}, {off.dy:+d}) px from "
                    "the science's (cross-correlation peak at "
                    f"{off.peak_sigma:.0f} sigma; {100 * off.zero_fraction:.0f} % of it at "
                    "zero shift): their xy0 disagree with what they show. Fix the files' "
                    "xy0 (LTV1/2 or CRVAL1A/2A cards) or give both a WCS"
                )
            covered = over.width * over.height / (sci_exp.bbox.width * sci_exp.bbox.height)
            log(
                f"  warning: template {template} (box {_box_str(tmpl_exp.bbox)}) covers "
                f"{100 * covered:.1f} % of the science grid (box {_box_str(sci_exp.bbox)}) "
                "and one of the two files has no WCS: taken on the science box in their "
                "common pixel frame, NO_DATA where it does not reach"
            )
            tmpl_exp = tmpl_exp.on_box(sci_exp.bbox)
        else:
            t = time.perf_counter()
            tmpl_exp = warp_exposure(
                tmpl_exp,
                sci_exp.wcs,
                sci_exp.bbox,
                name="template",
                dest_name="science",
                backend=be,
            )
            timings["warp"] = time.perf_counter() - t
    config = task_config(overrides, mode, preconvolve)
    src_table = None
    if sources:
        from astropy.table import Table

        try:
            src_table = Table.read(str(sources))
        except Exception as exc:
            raise InvalidInputError(f"cannot read source catalog {sources}: {exc}") from None
    t = time.perf_counter()
    if preconvolve:
        res = AlardLuptonPreconvolveSubtractTask(config, backend=be).run(
            tmpl_exp, sci_exp, src_table
        )
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
        if preconvolve:  # detected on the score, measured on the plain difference (as LSST)
            dia = (
                DetectAndMeasureScoreTask(backend=be)
                .run(
                    res.difference,
                    result_exp,
                    bright_sources=res.science_sources,
                    science=sci_exp,
                    template=tmpl_exp,
                )
                .dia_sources
            )
        else:
            # The science sources flag residuals inside bright stars' halos (issue 14).
            dm = DetectAndMeasureTask(backend=be).run(
                result_exp,
                bright_sources=res.science_sources,
                science=sci_exp,
                template=tmpl_exp,
            )
            result_exp, dia = dm.subtracted_measured_exposure, dm.dia_sources
        timings["detect"] = time.perf_counter() - t
    m = res.metadata
    if m.get("science_sharper_than_template"):  # the task logs it; the command says it too
        log(
            "  warning: the science PSF looks sharper than the template's under "
            "convolveTemplate: the kernel must deconvolve; --mode auto would convolve the "
            "science image"
        )
    if m.get("kernel_sum_check_failed"):
        log(
            f"  warning: the kernel sum {float(m.get('kernel_sum', float('nan'))):.4f} disagrees "
            f"with the kernel stars' flux ratio {float(m.get('kernel_star_flux_ratio', 0)):.4f} "
            f"± {float(m.get('kernel_star_flux_ratio_err', float('nan'))):.4f}"
        )
    quality = check_subtraction(m, result_exp, sci_exp, tmpl_exp)
    cards = _header(res, be.name, timings)
    cards.update(input_cards(sci_src, "science"))
    cards.update(input_cards(tmpl_src, "template"))
    if dia is not None and "noise_excess" in dia.meta:
        # > 1: correlated noise; the DIA threshold and S/N are in measured-noise units.
        cards["GDNOISEX"] = (float(dia.meta["noise_excess"]), "detection noise / variance plane's")
    for key, card in cards.items():
        value = card[0]
        if isinstance(value, float) and not math.isfinite(value):
            continue  # FITS headers cannot hold NaN or inf: an unmeasured figure is left out
        result_exp.metadata[key] = card
    t = time.perf_counter()
    result_exp.to_backend("numpy").write(out, overwrite=True)
    if matched_template_out:
        res.matched_template.to_backend("numpy").write(matched_template_out, overwrite=overwrite)
    if dia is not None and sources_out:
        write_table_atomic(dia, sources_out, overwrite=overwrite)
    if plots:
        import numpy as np

        from ._plots import PLOTS_NOTE, have_matplotlib, kernel_grid_png, residual_histogram_png

        if not have_matplotlib():
            log("  plots: " + PLOTS_NOTE)

        pdir = Path(plots)
        pdir.mkdir(parents=True, exist_ok=True)
        kernel_grid_png(pdir / "kernel_grid.png", res.psf_matching_kernel, sci_exp.bbox)
        mi = result_exp.masked_image.to_numpy()
        good = mi.good_pixels(
            ("NO_DATA", "EDGE", "SAT", "BAD", "CR", "DETECTED", "DETECTED_NEGATIVE")
        )
        residual_histogram_png(
            pdir / "residual_histogram.png", (mi.image / np.sqrt(mi.variance))[good]
        )
    timings["write"] = time.perf_counter() - t
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
        "inputs": {"science": sci_src.as_dict(), "template": tmpl_src.as_dict()},
        "quality": quality,
    }


def task_config(overrides: dict | None = None, mode: str | None = None, preconvolve: bool = False):
    """The task config ``subtract_files`` runs with: ``AlardLuptonSubtractConfig`` (or the
    preconvolve config) with ``overrides`` (nested mappings for nested configs) and ``mode``
    (which wins over the overrides' mode) applied."""
    from ..tasks import AlardLuptonPreconvolveSubtractConfig, AlardLuptonSubtractConfig
    from ._config import apply_overrides

    cfg_cls = AlardLuptonPreconvolveSubtractConfig if preconvolve else AlardLuptonSubtractConfig
    return apply_overrides(cfg_cls(), merge_overrides(overrides, {"mode": mode} if mode else None))


def cli_mode(mode: str | None, overrides: dict | None) -> str | None:
    """The command line's mode: the option, else the config's if it sets one, else ``auto``
    (the Python API keeps the config's default, LSST's convolveTemplate)."""
    if mode:
        return mode
    return None if (overrides or {}).get("mode") else "auto"


def run(args: argparse.Namespace) -> int:
    from ._config import load_config_file, parse_set
    from ._inputs import input_kwargs
    from ._quality import report

    overrides = merge_overrides(load_config_file(args.config), parse_set(args.set))
    if args.show_config:
        from ._config import show_config

        config = task_config(overrides, cli_mode(args.mode, overrides), args.preconvolve)
        return show_config(config, args.config_format)
    s = subtract_files(
        args.science,
        args.template,
        args.output,
        overrides=overrides,
        mode=cli_mode(args.mode, overrides),
        preconvolve=args.preconvolve,
        sources=args.sources,
        sources_out=args.sources_out,
        matched_template_out=args.matched_template_out,
        detect=not args.no_detect,
        plots=args.plots,
        backend=args.backend,
        overwrite=args.overwrite,
        **input_kwargs(args),
    )
    print(
        f"gpudiff subtract: {s['mode']} on {s['backend']}; kernel sum {s['kernel_sum']:.4f}; "
        f"{s['n_candidates_used']} kernel candidates used; wrote {s['output']}"
        + (f"; {s['n_dia_sources']} DIA sources" if s["n_dia_sources"] is not None else "")
    )
    for role in ("science", "template"):
        src = s["inputs"][role]
        print(
            f"  {role}: PSF from {src['psf']}"
            + (f" ({src['psf_detail']})" if src["psf_detail"] else "")
            + f", variance from {src['noise']}"
            + (f" ({src['noise_detail']})" if src["noise_detail"] else "")
        )
    print("  timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in s["timings"].items()))
    return report("subtract", s["quality"])
