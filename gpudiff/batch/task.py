"""What runs on a Dask worker for one manifest row, and the output-validity check of ``--resume``.

:func:`run_job` reads the row's inputs on the worker, runs its task, writes its output
atomically (every FITS writer of gpudiff writes a temporary name beside the target and
renames it, so a killed worker never leaves a truncated output), and returns a small
dict: no pixel ever goes through the scheduler.  It imports nothing of Dask, so it can
also be called directly (that is how the tests make their single-process references).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
import warnings

from ..backend.threads import ENV_THREADS, get_num_threads, num_threads
from ..errors import GpudiffError, ManifestError

__all__ = ["run_job", "worker_threads", "output_status", "remove_stale_temporaries"]

#: The FITS HDUs every gpudiff exposure output has (the LSST-style layout).
EXPOSURE_HDUS = ("IMAGE", "MASK", "VARIANCE")
# Temporary names of gpudiff's atomic writers: ".<name>.<12 hex>.tmp" beside the target.
_TMP = r"^\.{name}\.[0-9a-f]{{12}}\.tmp$"


def output_status(path) -> tuple[bool, str]:
    """Whether ``path`` is a complete gpudiff exposure FITS, without reading its pixels.

    Checks that the file opens as FITS with every header parsed, holds the ``IMAGE``,
    ``MASK`` and ``VARIANCE`` HDUs, and is long enough for the data its last header
    declares (a truncated file is not).  Pixel checksums are not verified: outputs are
    written atomically, so a present file is a whole file unless something else wrote it.

    Returns
    -------
    valid : bool
    reason : str
        Why not (empty when valid).
    """
    from astropy.io import fits

    path = os.fspath(path)
    if not os.path.isfile(path):
        return False, "missing"
    size = os.path.getsize(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with fits.open(path, memmap=False, lazy_load_hdus=False) as hdul:
                names = [str(h.name).upper() for h in hdul]
                info = hdul.fileinfo(len(hdul) - 1)
                end = info["datLoc"] + info["datSpan"]
    except Exception as exc:
        return False, f"not a readable FITS file ({type(exc).__name__}: {exc})"
    for w in caught:
        if "truncat" in str(w.message).lower() or "corrupt" in str(w.message).lower():
            return False, f"truncated or corrupt ({w.message})"
    missing = [n for n in EXPOSURE_HDUS if n not in names]
    if missing:
        return False, f"no {', '.join(missing)} HDU (HDUs: {names})"
    if end > size:
        return False, f"truncated: {size} bytes, the headers declare {end}"
    return True, ""


def remove_stale_temporaries(path) -> list[str]:
    """Delete the temporaries a killed writer of ``path`` left beside it; their names."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    pattern = re.compile(_TMP.format(name=re.escape(name)))
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if pattern.match(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(entry.path)
    return removed


def _subtract(job, backend, overwrite, note) -> dict:
    from ..commands.subtract import subtract_files

    from ..commands.subtract import cli_mode

    o = job.options
    extra = {
        f"{r}_{c}": job.inputs.get(f"{r}_{c}")
        for r in ("science", "template")
        for c in ("psf", "noise", "variance", "ivar", "mask")
    }
    extra.update(
        {
            k: o.get(k)
            for k in (
                "science_mask_bits",
                "template_mask_bits",
                "fwhm",
                "science_fwhm",
                "template_fwhm",
            )
        }
    )
    for r in ("science", "template"):  # mask_bits names both masks unless one has its own
        if extra[f"{r}_mask_bits"] is None:
            extra[f"{r}_mask_bits"] = o.get("mask_bits")
    s = subtract_files(
        job.inputs["science"],
        job.inputs["template"],
        job.output,
        overrides=job.overrides,
        mode=cli_mode(o.get("mode"), job.overrides),
        preconvolve=o.get("preconvolve", False),
        sources=job.inputs.get("sources"),
        sources_out=o.get("sources_out"),
        matched_template_out=o.get("matched_template_out"),
        detect=o.get("detect", True),
        backend=backend,
        overwrite=overwrite,
        log=note,
        **extra,
    )
    return dict(
        kernel_sum=s["kernel_sum"],
        n_candidates_used=s["n_candidates_used"],
        n_dia_sources=s["n_dia_sources"],
        mode=s["mode"],
        backend=s["backend"],
        timings=s["timings"],
        quality=s.get("quality", []),
    )


def _extras(job) -> dict:
    """The single-image input columns of a match-psf or coadd row."""
    out = {c: job.inputs.get(c) for c in ("psf", "noise", "variance", "ivar", "mask")}
    out.update(mask_bits=job.options.get("mask_bits"), fwhm=job.options.get("fwhm"))
    return out


def _match_psf(job, backend, overwrite, note) -> dict:
    from ..commands.match_psf import match_psf_file

    s = match_psf_file(
        job.inputs["exposure"],
        job.output,
        reference_fwhm=job.options.get("reference_fwhm"),
        reference_psf=job.inputs.get("reference_psf"),
        kernel_size=job.options.get("kernel_size"),
        overrides=job.overrides,
        backend=backend,
        overwrite=overwrite,
        log=note,
        **_extras(job),
    )
    return dict(
        kernel_sum=s.get("fitted_kernel_sum"),
        n_candidates_used=s.get("n_candidates"),
        backend=s["backend"],
        timings=s["timings"],
        quality=s.get("quality", []),
    )


def _coadd(job, backend, overwrite, note) -> dict:
    try:
        from ..commands.coadd import coadd_files
    except ImportError:
        raise GpudiffError(
            "coadd rows need gpudiff.commands.coadd.coadd_files, which this gpudiff "
            "installation lacks"
        ) from None
    s = coadd_files(
        job.inputs["warps"],
        job.output,
        psf_matched=job.inputs.get("psf_matched"),
        method=job.options.get("method", "compare-warp"),
        overrides=job.overrides,
        backend=backend,
        overwrite=overwrite,
        **_extras(job),
    )
    for text in [f"{s.get('n_used')} of {s.get('n_inputs')} warps used", *s.get("notes", [])]:
        note(text)
    return dict(
        backend=s.get("backend"), timings=s.get("timings", {}), quality=s.get("quality", [])
    )


_RUNNERS = {"subtract": _subtract, "match-psf": _match_psf, "coadd": _coadd}


def worker_threads(threads: int | None = None) -> int:
    """The thread setting of one batch row: ``threads`` if given, else the worker's
    ``$GPUDIFF_NUM_THREADS`` if set, else 1.

    A batch runs one row per worker process (or per GPU-worker thread) on every core, so a
    row that also took every core for its pools and FFTs would oversubscribe the machine
    ``workers``-fold: one thread per row is the default, unless asked otherwise.
    """
    if threads is not None:
        return int(threads)
    return get_num_threads() if os.environ.get(ENV_THREADS, "").strip() else 1


def run_job(job, backend=None, overwrite: bool = False, threads: int | None = None) -> dict:
    """Run one manifest row here (on a Dask worker, or in-process); its summary.

    Parameters
    ----------
    job : gpudiff.batch.Job
    backend : str, optional
        Backend name (None: the worker's ``GPUDIFF_BACKEND`` or auto).
    overwrite : bool
        Replace an existing output (``--overwrite``, or an invalid one found by ``--resume``).
    threads : int, optional
        Host threads for the row's pools and FFTs (default: the worker's
        ``$GPUDIFF_NUM_THREADS``, else 1; :func:`worker_threads`).

    Returns
    -------
    dict
        ``row``, ``id``, ``kind``, ``output``, ``status`` (``ok`` / ``failed``), ``error``
        (type and message; ``quality check failed: ...`` when the output was written but
        failed the command's quality check, :mod:`gpudiff.commands._quality`), ``time_s``,
        ``read_s``, ``write_s``, ``kernel_sum``,
        ``n_candidates_used``, ``n_dia_sources``, ``backend``, ``worker`` (host:pid),
        ``notes``.  gpudiff errors (bad inputs) are reported in it; any other exception
        propagates so that Dask can retry the row (``retries``).
    """
    t0 = time.perf_counter()
    notes: list[str] = []
    out = {
        "row": job.row,
        "id": job.id,
        "kind": job.kind,
        "output": job.output,
        "status": "failed",
        "error": "",
        "worker": f"{socket.gethostname()}:{os.getpid()}",
    }
    try:
        if job.problem:
            raise ManifestError(job.problem)
        os.makedirs(os.path.dirname(job.output) or ".", exist_ok=True)
        for extra in [
            job.output,
            *(job.options.get(k) for k in ("sources_out", "matched_template_out")),
        ]:
            if extra and remove_stale_temporaries(extra):
                notes.append(
                    "removed the temporary files of an interrupted write of "
                    f"{os.path.basename(extra)}"
                )
        with num_threads(worker_threads(threads)):
            res = _RUNNERS[job.kind](job, backend, overwrite, notes.append)
        quality = res.pop("quality", None) or []
        if quality:  # written, but its own quality check failed: as the CLI's exit status 3
            out["error"] = "quality check failed: " + "; ".join(quality)
        else:
            out["status"] = "ok"
    except GpudiffError as exc:  # the inputs are bad: retrying would fail the same way
        res = {}
        out["error"] = f"{type(exc).__name__}: {exc}"
    timings = res.pop("timings", {}) or {}
    out.update(res)
    out["time_s"] = time.perf_counter() - t0
    out["read_s"] = float(timings.get("read", float("nan")))
    out["write_s"] = float(timings.get("write", float("nan")))
    out["notes"] = "; ".join(notes)
    return out
