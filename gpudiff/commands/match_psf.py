"""``gpudiff match-psf``: convolve an exposure so that its PSF becomes a reference PSF model.

::

    gpudiff match-psf EXPOSURE -o OUT.fits (--reference-fwhm F | --reference-psf PSF.fits)
                      [--psf FILE] [--noise|--variance|--ivar FILE] [--mask FILE [--mask-bits B]]
                      [--fwhm F] [--kernel-size N] [--config FILE] [--set FIELD=VALUE ...]
                      [--overwrite] [--backend ...] [-v]
    gpudiff match-psf [--kernel-size N] [--config FILE] [--set ...] --show-config [--format toml]

Runs :class:`gpudiff.tasks.ModelPsfMatchTask` (LSST ``ModelPsfMatchTask``, docs/algorithms.md §7).
The output is written in the LSST-style layout with the reference PSF as its ``PSF`` HDU and the
fit's figures as ``MPM*`` header cards, and ``GDPSFSRC``/``GDNOISRC`` saying where the input's PSF
and variance came from.  Exit status 3 when the output fails its quality check (fitted kernel sum
outside 0.5-2, PSF residual > 1, non-finite unmasked pixels;
:mod:`gpudiff.commands._quality`); the output is still written for inspection.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import replace

from ..backend.threads import accepts_threads
from ..errors import FitsWriteError

HELP = "match an exposure's PSF to a reference PSF model (ModelPsfMatchTask)"

#: Header cards written to the output: metadata key → (card, comment).
_CARDS = {
    "kernel_size": ("MPMKSIZE", "ModelPsfMatch kernel size [px]"),
    "spatial_kernel_order": ("MPMORDER", "ModelPsfMatch spatial kernel order"),
    "psf_size": ("MPMPSFSZ", "ModelPsfMatch PSF image size [px]"),
    "psf_padding": ("MPMPAD", "ModelPsfMatch PSF padding [px]"),
    "n_candidates": ("MPMNCAND", "ModelPsfMatch cells used in the fit"),
    "kernel_sum": ("MPMKSUM", "ModelPsfMatch forced kernel sum"),
    "fitted_kernel_sum": ("MPMFKSUM", "ModelPsfMatch fitted kernel sum"),
    "reference_fwhm": ("MPMREFFW", "reference PSF FWHM (determinant radius) [px]"),
    "science_fwhm_min": ("MPMFWMIN", "input PSF FWHM, min over cells [px]"),
    "science_fwhm_max": ("MPMFWMAX", "input PSF FWHM, max over cells [px]"),
    "residual_max": ("MPMRESMX", "max relative residual of PSF (x) K vs reference"),
    "spatial_condition_number": ("MPMCOND", "condition number of the spatial system"),
}


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive FWHM in pixels, got {text}")
    return v


def _odd_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 3 or v % 2 == 0:
        # the Alard-Lupton kernel is centred on its central pixel: it must be odd
        raise argparse.ArgumentTypeError(f"the kernel size must be an odd integer >= 3, got {v}")
    return v


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``gpudiff match-psf`` to ``parser``."""
    parser.add_argument("exposure", metavar="EXPOSURE", help="input exposure (FITS)")
    parser.add_argument(
        "-o", "--output", metavar="OUT.fits", required=True, help="output exposure (FITS)"
    )
    ref = parser.add_mutually_exclusive_group(required=True)
    ref.add_argument(
        "--reference-fwhm",
        metavar="F",
        type=_positive_float,
        help="match to a round Gaussian PSF of this FWHM (pixels)",
    )
    ref.add_argument(
        "--reference-psf",
        metavar="PSF.fits",
        help="match to the PSF in this FITS file (gpudiff PSF HDU, WebbPSF, or an image)",
    )
    parser.add_argument(
        "--kernel-size",
        metavar="N",
        type=_odd_int,
        default=None,
        help="matching kernel size in pixels (odd; default 21, LSST's)",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="JSON or TOML file of ModelPsfMatchConfig fields"
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="override a config field, e.g. kernel.spatial_kernel_order=1 (repeatable)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.fits if it exists")
    from ._config import add_show_config
    from ._inputs import add_input_options

    add_show_config(parser, "ModelPsfMatchConfig")
    add_input_options(parser, roles=())


@accepts_threads
def match_psf_file(
    exposure,
    output,
    *,
    reference_fwhm: float | None = None,
    reference_psf=None,
    kernel_size: int | None = None,
    overrides: dict | None = None,
    backend=None,
    overwrite: bool = False,
    log=print,
    psf=None,
    noise=None,
    variance=None,
    ivar=None,
    mask=None,
    mask_bits=None,
    fwhm: float | None = None,
) -> dict:
    """PSF-match the exposure in a FITS file to a reference PSF and write the result: the
    file-level work of ``gpudiff match-psf``, shared by the command and :mod:`gpudiff.batch`.

    Parameters
    ----------
    exposure, output : str or path-like
        Input exposure and the output FITS (written atomically).
    reference_fwhm : float, optional
        Match to a round Gaussian of this FWHM in pixels ...
    reference_psf : str or path-like, optional
        ... or to the PSF in this FITS file (exactly one of the two).
    kernel_size : int, optional
        Odd matching-kernel size; wins over ``overrides``.
    overrides : dict, optional
        ``ModelPsfMatchConfig`` fields (nested mappings for nested configs).
    backend : Backend or str, optional
    threads : int, optional
        Host threads for thread pools and FFTs during the call (default: the process's
        setting, :func:`gpudiff.backend.threads.get_num_threads`).
    overwrite : bool
        Replace ``output``; otherwise an existing ``output`` fails before any work.
    log : callable
        Receives one-line notes (which PSF fallback was used, what a noise file's header said).
    psf : Psf, 2-D array or path, optional
        The exposure's PSF; wins over the file's (:mod:`gpudiff.image.inputs`).
    noise, variance, ivar : array or path, optional
        A 1σ, variance or inverse-variance map replacing the variance plane (at most one).
    mask, mask_bits : optional
        A mask OR-ed into the exposure's and the names of its bits (``"BAD=0,SAT=1"``).
    fwhm : float, optional
        Last-resort PSF FWHM in pixels.

    Returns
    -------
    dict
        ``output``, ``backend``, ``reference`` (text), ``shape``, the task metadata
        (``kernel_size``, ``fitted_kernel_sum``, ``residual_max``, ``science_fwhm_min`` ...),
        ``timings`` (stage → seconds), ``inputs`` (where the PSF and variance came from; also
        the ``GDPSFSRC``/``GDNOISRC`` cards) and ``quality`` (failed quality checks; the
        output is written either way).
    """
    from ..backend import resolve_backend
    from ..errors import InvalidInputError
    from ..image import GaussianPsf, read_psf, write_exposure
    from ..image.inputs import input_cards, read_with_inputs
    from ._quality import check_model_psf_match
    from ..tasks.model_psf_match import ModelPsfMatchTask

    exposure, output = str(exposure), str(output)
    if (reference_fwhm is None) == (reference_psf is None):
        raise InvalidInputError("match-psf needs exactly one of reference_fwhm and reference_psf")
    if reference_fwhm is not None:
        try:
            reference_fwhm = float(reference_fwhm)
        except (TypeError, ValueError):
            raise InvalidInputError(
                f"reference_fwhm must be a number of pixels, got {reference_fwhm!r}"
            ) from None
        if not (math.isfinite(reference_fwhm) and reference_fwhm > 0):
            raise InvalidInputError(
                f"reference_fwhm must be a positive FWHM in pixels, got {reference_fwhm}"
            )
    if os.path.exists(output) and not overwrite:
        # fail before the work, not after it
        raise FitsWriteError(f"{output}: file exists (pass --overwrite to replace it)")
    from ..image.atomic import check_writable

    check_writable(output, overwrite=True)  # a missing or read-only folder fails before the work
    config = task_config(overrides, kernel_size)
    be = resolve_backend(backend)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    exp, src = read_with_inputs(
        exposure,
        backend=be,
        psf=psf,
        noise=noise,
        variance=variance,
        ivar=ivar,
        mask=mask,
        mask_bits=mask_bits,
        fwhm=fwhm,
        log=lambda m: log(f"gpudiff match-psf: {m}"),
    )
    if reference_fwhm is not None:
        reference = GaussianPsf(fwhm=reference_fwhm)
        ref_text = f"Gaussian of FWHM {reference_fwhm:.3g} px"
    else:
        reference = read_psf(reference_psf)
        ref_text = f"{reference_psf} ({type(reference).__name__})"
    timings["read"] = time.perf_counter() - t
    t = time.perf_counter()
    res = ModelPsfMatchTask(config, backend=be).run(exp, reference)
    timings["match"] = time.perf_counter() - t
    meta = res.metadata
    out = res.psf_matched_exposure
    for key, (card, comment) in _CARDS.items():
        value = meta.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):  # FITS cards cannot hold NaN
            out.metadata[card] = (value, comment)
    for card, value in input_cards(src, "science").items():
        out.metadata[card] = value
    quality = check_model_psf_match(meta, out)
    t = time.perf_counter()
    write_exposure(output, out, overwrite=overwrite)
    timings["write"] = time.perf_counter() - t
    summary = {k: v for k, v in meta.items() if isinstance(v, (int, float, str))}
    summary.update(
        output=output,
        backend=be.name,
        reference=ref_text,
        shape=tuple(exp.shape),
        timings=timings,
        inputs=src.as_dict(),
        quality=quality,
    )
    return summary


def task_config(overrides: dict | None = None, kernel_size: int | None = None):
    """The ``ModelPsfMatchConfig`` that ``match_psf_file`` runs with: ``overrides`` (nested
    mappings for nested configs) applied, then ``kernel_size``, which wins over them."""
    from ..tasks.model_psf_match import ModelPsfMatchConfig

    config = ModelPsfMatchConfig()
    if overrides:
        from ._config import apply_overrides

        config = apply_overrides(config, overrides, "ModelPsfMatchConfig")
    if kernel_size is not None:  # the explicit option wins over --config/--set
        config = replace(config, kernel=config.kernel.with_overrides(kernel_size=int(kernel_size)))
    return config


def run(args: argparse.Namespace) -> int:
    """Read, PSF-match, write; print a summary.  Errors are raised as GpudiffError."""
    from ._forward import file_options

    t0 = time.perf_counter()
    overrides = None
    if getattr(args, "config", None) or getattr(args, "set", None):
        from ._config import load_config_file, parse_set
        from .subtract import merge_overrides

        overrides = merge_overrides(load_config_file(args.config), parse_set(args.set))
    if args.show_config:
        from ._config import show_config

        return show_config(task_config(overrides, args.kernel_size), args.config_format)
    meta = match_psf_file(
        args.exposure,
        args.output,
        reference_fwhm=args.reference_fwhm,
        reference_psf=args.reference_psf,
        kernel_size=args.kernel_size,
        overrides=overrides,
        **file_options(args),
    )
    ny, nx = meta["shape"]
    fw = (
        f"{meta['science_fwhm_min']:.2f}"
        if math.isclose(meta["science_fwhm_min"], meta["science_fwhm_max"], rel_tol=1e-3)
        else f"{meta['science_fwhm_min']:.2f}-{meta['science_fwhm_max']:.2f}"
    )
    print(
        f"gpudiff match-psf: {args.exposure} ({nx}x{ny}, PSF FWHM {fw} px) -> {meta['reference']}"
    )
    print(
        f"  kernel {meta['kernel_size']} px, spatial order {meta['spatial_kernel_order']}, "
        f"{meta['n_cells_x']}x{meta['n_cells_y']} cells, PSF images {meta['psf_size']} px "
        f"(padded by {meta['psf_padding']}); fitted kernel sum {meta['fitted_kernel_sum']:.4f}, "
        f"PSF match residual {100 * meta['residual_max']:.2f} % (max over cells)"
    )
    src = meta["inputs"]
    print(
        f"  PSF from {src['psf']}"
        + (f" ({src['psf_detail']})" if src["psf_detail"] else "")
        + f", variance from {src['noise']}"
    )
    print(f"  wrote {args.output} (backend {meta['backend']}, {time.perf_counter() - t0:.1f} s)")
    from ._quality import report

    return report("match-psf", meta["quality"])
