"""``gpudiff coadd``: coadd warps into a deep template, masking transient artifacts.

::

    gpudiff coadd WARP... -o COADD.fits [--psf-matched WARP...]
                  [--method compare-warp|meanclip|mean|median] [--psf FILE...] [--fwhm F...]
                  [--noise|--variance|--ivar FILE...] [--mask FILE... [--mask-bits B]]
                  [--config FILE] [--set FIELD=VALUE ...] [--overwrite] [--backend ...] [-v]
    gpudiff coadd [--method ...] [--config FILE] [--set ...] --show-config [--format toml]

``compare-warp`` (the default) runs :class:`gpudiff.tasks.compare_warp.CompareWarpAssembleCoaddTask`
(docs/algorithms.md §10.4–§10.5); when no ``--psf-matched`` warps are given they are made with
:class:`~gpudiff.tasks.ModelPsfMatchTask` to the largest input PSF (one warp at a time,
kept in a temporary folder beside the output, read back lazily and deleted).  The other
methods run :class:`gpudiff.tasks.assemble_coadd.AssembleCoaddTask` with that statistic.
Warps are read one row band at a time.  The output is in the LSST-style layout (PSF HDU:
see the task) plus an ``NIMAGE`` HDU (inputs per pixel) and header cards with the counts.

``--psf``, ``--noise``, ``--variance``, ``--ivar``, ``--mask`` and ``--fwhm`` take one value
for every warp or exactly one per warp, in the warps' order (as ``--psf-matched``); see
:mod:`gpudiff.image.inputs`.  ``GDPSFSRC``/``GDNOISRC`` list where the warps' PSFs and
variances came from.  Exit status 3 when the coadd fails its quality check (no input
used, non-finite pixels with data).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from ..backend import get_backend
from ..backend.threads import accepts_threads
from ..errors import FitsWriteError, InvalidInputError, PsfError

HELP = "coadd warps into a deep template, masking artifacts (CompareWarpAssembleCoaddTask)"

METHODS = {"compare-warp": None, "meanclip": "MEANCLIP", "mean": "MEAN", "median": "MEDIAN"}

__all__ = ["coadd_files", "configure", "run", "METHODS"]


def _reference_psf(sources: list) -> Any:
    """The largest PSF of the inputs (trace FWHM at each warp's centre)."""
    best, best_fw = None, -1.0
    for s in sources:
        if s.psf is None:
            raise PsfError(
                f"{s.name}: no PSF; PSF-matched warps cannot be made (give --psf-matched)"
            )
        b = s.bbox
        fw = s.psf.fwhm(b.x0 + (b.width - 1) / 2.0, b.y0 + (b.height - 1) / 2.0)
        if fw > best_fw:
            best, best_fw = s, fw
    b = best.bbox
    from ..image import GridPsf, ImagePsf

    psf = best.psf
    if isinstance(psf, GridPsf):  # a constant model: the varying one at the warp's centre
        psf = ImagePsf(psf.kernel_image(b.x0 + (b.width - 1) / 2.0, b.y0 + (b.height - 1) / 2.0))
    return psf, best_fw


def _make_psf_matched(sources: list, folder: str, be, log: list) -> list[str]:
    """PSF-match every warp to the largest PSF with ModelPsfMatchTask; paths of the results."""
    from ..image import write_exposure
    from ..tasks.model_psf_match import ModelPsfMatchTask

    reference, fw = _reference_psf(sources)
    task = ModelPsfMatchTask(backend=be)
    paths = []
    for i, s in enumerate(sources):
        from ..image import Exposure

        exp = Exposure(s.read(s.bbox), psf=s.psf, wcs=s.wcs, photo_calib=s.photo_calib)
        out = task.run(exp, reference).psf_matched_exposure
        p = os.path.join(folder, f"psfmatched_{i:04d}.fits")
        write_exposure(p, out)
        paths.append(p)
        del exp, out
    log.append(f"made {len(paths)} PSF-matched warps (ModelPsfMatch to FWHM {fw:.2f} px)")
    return paths


def _write(output: str, exposure, n_image, overwrite: bool) -> None:
    """write_exposure plus an NIMAGE HDU, atomically (the coadd is written to a temporary
    file first, extended in memory, then renamed into place by fitsio's atomic writer)."""
    from astropy.io import fits

    from ..image import fitsio

    folder = os.path.dirname(os.path.abspath(output))
    fd, tmp = tempfile.mkstemp(suffix=".fits", dir=folder)
    os.close(fd)
    try:
        fitsio.write_exposure(tmp, exposure, overwrite=True)
        with fits.open(tmp, memmap=False) as hdul:
            hdus = fits.HDUList([h.copy() for h in hdul])
        if n_image is not None:
            hdus.append(
                fits.ImageHDU(
                    np.asarray(exposure.backend.asnumpy(n_image), dtype=np.int32), name="NIMAGE"
                )
            )
        fitsio._atomic_write(hdus, output, overwrite)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@accepts_threads
def coadd_files(
    warps: list[str],
    output: str,
    *,
    psf_matched: list[str] | None = None,
    method: str = "compare-warp",
    overrides: dict | None = None,
    backend=None,
    overwrite: bool = False,
    psf=None,
    noise=None,
    variance=None,
    ivar=None,
    mask=None,
    mask_bits=None,
    fwhm=None,
    log=None,
) -> dict:
    """Coadd warp FITS files into ``output`` (the programmatic form of ``gpudiff coadd``).

    Parameters
    ----------
    warps : list of str
        Direct warps on a common pixel grid (LSST layout; read lazily, by row bands).
    output : str
        The coadd FITS file (LSST layout + ``NIMAGE`` HDU), written atomically.
    psf_matched : list of str, optional
        PSF-matched warps, one per direct warp, for ``compare-warp``; made with
        ModelPsfMatch to the largest PSF when omitted.
    method : {"compare-warp", "meanclip", "mean", "median"}
    overrides : dict, optional
        Config fields (nested dicts for nested configs), as ``--config``/``--set``.
    backend : Backend or str, optional
    threads : int, optional
        Host threads for thread pools and FFTs during the call (default: the process's
        setting, :func:`gpudiff.backend.threads.get_num_threads`).
    overwrite : bool
    psf, noise, variance, ivar, mask, mask_bits, fwhm : optional
        What the warps' files lack (:mod:`gpudiff.image.inputs`): each one value for every
        warp or a list with one per warp, in order.  ``psf``: PSFs (paths, Psf objects or
        arrays) that win over the files'; ``noise``/``variance``/``ivar``: σ, variance or
        inverse-variance maps; ``mask`` (+ ``mask_bits``, e.g. ``"BAD=0,SAT=1"``): masks
        OR-ed into the warps'; ``fwhm``: the last-resort PSF FWHM (pixels).  A warp given
        any of these is read whole (not by bands).  For compare-warp without
        ``psf_matched``, a warp without a PSF gets one by the fallback order of
        :func:`gpudiff.image.inputs.resolve_psf`.
    log : callable, optional
        Receives the one-line notes as they happen (they are also in ``notes``).

    Returns
    -------
    dict
        JSON-able summary: ``output``, ``method``, ``n_inputs``, ``n_used``, ``skipped``,
        ``weights``, ``n_clipped_pixels``, ``n_no_data_pixels``, ``n_clipped_footprints``
        (compare-warp), ``backend``, ``timings`` (seconds), ``notes``, ``inputs`` (per warp:
        where its PSF and variance came from; summarised in the ``GDPSFSRC``/``GDNOISRC``
        cards) and ``quality`` (failed quality checks; the coadd is written either way).
    """
    from ._quality import check_coadd
    from ..tasks.assemble_coadd import AssembleCoaddTask
    from ..tasks.coadd_warps import FitsWarp
    from ..tasks.compare_warp import CompareWarpAssembleCoaddTask

    t0 = time.perf_counter()
    if method not in METHODS:
        raise InvalidInputError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if not warps:
        raise InvalidInputError("coadd needs at least one warp")
    if os.path.exists(output) and not overwrite:
        raise FitsWriteError(
            f"{output}: file exists (pass overwrite=True / --overwrite to replace it)"
        )
    if psf_matched is not None and method != "compare-warp":
        raise InvalidInputError(
            f"--psf-matched warps are only used by compare-warp, not {method!r}"
        )
    if psf_matched is not None and len(psf_matched) != len(warps):
        raise InvalidInputError(
            f"{len(warps)} warps but {len(psf_matched)} PSF-matched warps; give one per warp"
        )
    be = get_backend(backend)
    sources = [FitsWarp(p) for p in warps]
    notes: list[str] = []
    needs_psf = method == "compare-warp" and psf_matched is None
    sources, inputs = _attach(
        sources,
        warps,
        be,
        notes,
        log,
        needs_psf,
        psf=psf,
        noise=noise,
        variance=variance,
        ivar=ivar,
        mask=mask,
        mask_bits=mask_bits,
        fwhm=fwhm,
    )
    timings: dict = {}
    tmpdir = None
    try:
        if method == "compare-warp":
            config = task_config(method, overrides)
            if psf_matched is None:
                tmpdir = tempfile.mkdtemp(
                    prefix=".gpudiff-coadd-", dir=os.path.dirname(os.path.abspath(output))
                )
                ta = time.perf_counter()
                psf_matched = _make_psf_matched(sources, tmpdir, be, notes)
                timings["psf_match"] = time.perf_counter() - ta
            matched = [FitsWarp(p) for p in psf_matched]
            res = CompareWarpAssembleCoaddTask(config, backend=be).run(sources, matched)
        else:
            config = task_config(method, overrides)
            res = AssembleCoaddTask(config, backend=be).run(sources)
        meta = res.metadata
        exp = res.coadd_exposure
        for card, key, comment in (
            ("NCLIPPX", "n_clipped_pixels", "coadd pixels with CLIPPED"),
            ("NNODATA", "n_no_data_pixels", "coadd pixels without data"),
            ("NCLIPFP", "n_clipped_footprints", "CompareWarp artifact footprints"),
        ):
            if key in meta:
                exp.metadata[card] = (int(meta[key]), comment)
        exp.metadata["COADDMTH"] = (method, "gpudiff coadd method")
        for card, key, what in (("GDPSFSRC", "psf", "PSF"), ("GDNOISRC", "noise", "variance")):
            kinds = sorted({str(i[key]) for i in inputs if i[key] is not None})
            if kinds:
                exp.metadata[card] = (",".join(kinds)[:68], f"where the warps' {what}s came from")
        quality = check_coadd(meta, exp)
        ta = time.perf_counter()
        _write(output, exp, res.n_image, overwrite)
        timings["write"] = time.perf_counter() - ta
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    timings.update({k[5:]: float(v) for k, v in meta.items() if k.startswith("time_")})
    timings["total"] = time.perf_counter() - t0
    return dict(
        output=os.fspath(output),
        method=method,
        n_inputs=len(warps),
        n_used=int(meta["n_inputs"]),
        skipped=dict(res.skipped),
        weights=[float(w) for w in res.weights],
        n_clipped_pixels=int(meta["n_clipped_pixels"]),
        n_no_data_pixels=int(meta["n_no_data_pixels"]),
        n_clipped_footprints=int(meta.get("n_clipped_footprints", 0)),
        backend=be.name,
        timings={k: round(float(v), 4) for k, v in timings.items() if math.isfinite(v)},
        notes=notes,
        inputs=inputs,
        quality=quality,
    )


def _attach(
    sources: list, paths: list[str], be, notes: list, log, needs_psf: bool, **given
) -> tuple:
    """Attach the per-warp inputs; warps given any (or lacking a PSF that compare-warp needs)
    are read whole and wrapped as in-memory warps.  (sources, per-warp source dicts)."""
    from ..image.inputs import read_with_inputs
    from ..tasks.coadd_warps import ExposureWarp
    from ._inputs import per_input

    n = len(paths)
    each = {k: per_input(v, n, f"--{k.replace('_', '-')}") for k, v in given.items()}
    out, inputs = [], []

    def say(msg: str) -> None:
        notes.append(msg)
        if log is not None:
            log(msg)

    for i, (s, p) in enumerate(zip(sources, paths)):
        mine = {k: v[i] for k, v in each.items()}
        extras = any(mine[k] is not None for k in ("psf", "noise", "variance", "ivar", "mask"))
        if not extras and not (needs_psf and s.psf is None):
            out.append(s)
            whole = getattr(s, "_whole", None)  # a plain file FitsWarp read whole (its variance
            estimated = whole is not None and "GDVAREST" in whole.metadata  # may be estimated)
            inputs.append(
                {
                    "psf": "file" if s.psf is not None else None,
                    "noise": "estimated" if estimated else "file",
                }
            )
            continue
        exp, src = read_with_inputs(p, backend=be, need_psf=needs_psf, log=say, **mine)
        out.append(ExposureWarp(exp, name=s.name))
        inputs.append(src.as_dict())
    return out, inputs


def task_config(method: str = "compare-warp", overrides: dict | None = None):
    """The config ``coadd_files`` runs with: ``CompareWarpAssembleCoaddConfig`` for
    compare-warp, else ``AssembleCoaddConfig`` with the method's statistic; ``overrides``
    (nested mappings for nested configs) applied; ``do_n_image`` on (the NIMAGE HDU)."""
    from ..tasks.assemble_coadd import AssembleCoaddConfig
    from ..tasks.compare_warp import CompareWarpAssembleCoaddConfig
    from ._config import apply_overrides

    if method not in METHODS:
        raise InvalidInputError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if method == "compare-warp":
        base, name = CompareWarpAssembleCoaddConfig(), "CompareWarpAssembleCoaddConfig"
    else:
        base, name = AssembleCoaddConfig(statistic=METHODS[method]), "AssembleCoaddConfig"
    return _with_n_image(apply_overrides(base, overrides or {}, name))


def _with_n_image(config):
    from dataclasses import replace

    return replace(config, do_n_image=True)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``gpudiff coadd`` to ``parser``."""
    parser.add_argument(
        "warps", metavar="WARP", nargs="+", help="direct warps on a common grid (FITS)"
    )
    parser.add_argument(
        "-o", "--output", metavar="COADD.fits", required=True, help="output coadd (FITS)"
    )
    parser.add_argument(
        "--psf-matched",
        metavar="WARP",
        nargs="+",
        default=None,
        help="PSF-matched warps, one per WARP in the same order (compare-warp; default: "
        "made with ModelPsfMatch to the largest PSF)",
    )
    parser.add_argument(
        "--method",
        choices=sorted(METHODS),
        default="compare-warp",
        help="compare-warp (default), or a plain stack with that statistic",
    )
    parser.add_argument("--config", metavar="FILE", help="JSON or TOML file of config fields")
    parser.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="override a config field, e.g. detect.threshold_value=6 (repeatable)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace COADD.fits if it exists")
    from ._config import add_show_config
    from ._inputs import add_input_options

    add_show_config(
        parser,
        "CompareWarpAssembleCoaddConfig (with --method meanclip/mean/median: AssembleCoaddConfig)",
    )
    add_input_options(parser, roles=(), nargs="+")


def run(args: argparse.Namespace) -> int:
    """Coadd, write, print a summary.  Errors are raised as GpudiffError."""
    from ._config import load_config_file, parse_set
    from ._forward import file_options

    overrides = load_config_file(getattr(args, "config", None))
    for key, value in parse_set(getattr(args, "set", None)).items():
        if isinstance(value, dict) and isinstance(overrides.get(key), dict):
            overrides[key] = {**overrides[key], **value}
        else:
            overrides[key] = value
    if getattr(args, "show_config", False):
        from ._config import show_config

        return show_config(task_config(args.method, overrides), args.config_format)
    s = coadd_files(
        args.warps,
        args.output,
        psf_matched=args.psf_matched,
        method=args.method,
        overrides=overrides,
        **file_options(args),
    )
    print(f"gpudiff coadd: {s['n_used']} of {s['n_inputs']} warps, method {s['method']}")
    for note in s["notes"]:
        print(f"  {note}")
    for name, why in s["skipped"].items():
        print(f"  skipped {name}: {why}")
    extra = (
        f", {s['n_clipped_footprints']} artifact footprints"
        if s["method"] == "compare-warp"
        else ""
    )
    print(
        f"  {s['n_clipped_pixels']} CLIPPED pixels{extra}, "
        f"{s['n_no_data_pixels']} pixels without data"
    )
    print(f"  wrote {s['output']} (backend {s['backend']}, {s['timings']['total']:.1f} s)")
    from ._quality import report

    return report("coadd", s["quality"])
