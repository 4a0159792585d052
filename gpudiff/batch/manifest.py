"""Batch manifests: one row per job, read and checked on the client before anything runs.

A manifest is a CSV (``.csv``, or any suffix but ``.ecsv``) or ECSV table.  Columns
(names are case-insensitive, ``-`` and ``_`` alike):

=====================  ===================================================================
``kind``               ``subtract`` (default when the column is absent), ``match-psf``, ``coadd``
``id``                 optional row label (default: the row number)
``output``             the FITS to write; relative to ``out_dir``
``science``,           subtract inputs (relative to the manifest's folder)
``template``
``exposure``           match-psf input
``warps``              coadd inputs, ``;``-separated; ``psf_matched`` likewise (optional)
``config``             a JSON/TOML file of task-config fields (relative to the manifest)
``set``                ``;``-separated ``field=value`` overrides, dotted for nested configs
``mode``,              subtract options as in ``gpudiff subtract`` (``preconvolve`` and
``preconvolve``,       ``detect`` are booleans: true/false/1/0/yes/no)
``detect``,
``sources``,
``sources_out``,
``matched_template_out``
``reference_fwhm``,    match-psf options as in ``gpudiff match-psf``
``reference_psf``,
``kernel_size``
``method``             coadd method (default ``compare-warp``)
``science_psf``, ...   what the images' files lack, as the command-line options of the same
                       names (:mod:`gpudiff.image.inputs`): subtract rows take
                       ``science_``/``template_`` + ``psf``, ``noise``, ``variance``,
                       ``ivar``, ``mask`` (paths), ``science_mask_bits``,
                       ``template_mask_bits``, ``mask_bits`` (both), ``fwhm``, ``science_fwhm``,
                       ``template_fwhm``; match-psf rows ``psf``, ``noise``, ``variance``,
                       ``ivar``, ``mask``, ``mask_bits``, ``fwhm``; coadd rows the same, the
                       paths (and ``fwhm``) ``;``-separated: one for all warps or one per warp
=====================  ===================================================================

A subtract row without ``mode`` (and no ``mode`` in its ``config``/``set``) runs ``auto``,
as ``gpudiff subtract`` does.

Whole-manifest problems (unreadable, empty, no ``output`` column, two rows writing one
output) raise :class:`~gpudiff.errors.ManifestError`.  A bad row (unknown kind, missing
value, missing input file, bad option) gets a ``problem`` naming the row and the column;
the batch reports it as a failed row and runs the others.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GpudiffError, ManifestError

__all__ = ["Job", "read_manifest", "KINDS"]

log = logging.getLogger("gpudiff.batch")

# kind -> (required inputs, optional inputs, options).  Inputs are paths relative to the
# manifest; "warps" and "psf_matched" are ;-separated lists of them.
_EXTRA_INPUTS = ("psf", "noise", "variance", "ivar", "mask")  # gpudiff.image.inputs
KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "subtract": (
        ("science", "template"),
        ("sources", *(f"{r}_{c}" for r in ("science", "template") for c in _EXTRA_INPUTS)),
        (
            "mode",
            "preconvolve",
            "detect",
            "sources_out",
            "matched_template_out",
            "science_mask_bits",
            "template_mask_bits",
            "mask_bits",
            "fwhm",
            "science_fwhm",
            "template_fwhm",
        ),
    ),
    "match-psf": (
        ("exposure",),
        ("reference_psf", *_EXTRA_INPUTS),
        ("reference_fwhm", "kernel_size", "mask_bits", "fwhm"),
    ),
    "coadd": (("warps",), ("psf_matched", *_EXTRA_INPUTS), ("method", "mask_bits", "fwhm")),
}


def _lists(kind: str) -> set[str]:
    """Columns that are ;-separated lists of paths: a coadd's per-warp inputs (one for all
    warps or one per warp, as ``gpudiff coadd --psf``)."""
    return {"warps", "psf_matched", *_EXTRA_INPUTS} if kind == "coadd" else set()


_OUTPUTS = {"sources_out", "matched_template_out"}  # extra outputs: relative to out_dir
_COMMON = {"kind", "id", "output", "config", "set"}
_KNOWN = _COMMON | {c for spec in KINDS.values() for part in spec for c in part}
_BOOL = {
    "true": True,
    "1": True,
    "yes": True,
    "y": True,
    "false": False,
    "0": False,
    "no": False,
    "n": False,
}


@dataclass
class Job:
    """One manifest row, resolved: absolute paths, parsed options and config overrides.

    ``row`` is the 1-based data-row number of the manifest (the header not counted);
    ``problem`` is set when the row cannot run (the text names the row and the column).
    """

    row: int
    id: str
    kind: str
    output: str
    inputs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None

    @property
    def label(self) -> str:
        return f"row {self.row}" + (f" (id {self.id})" if self.id != str(self.row) else "")


def _norm(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def _read_rows(path: Path) -> list[dict[str, str | None]]:
    """The rows as ``{column: text or None}``; ``#`` lines of a CSV are comments."""
    try:
        if path.suffix.lower() == ".ecsv":
            from astropy.table import Table

            t = Table.read(path, format="ascii.ecsv")
            masks = {c: np.ma.getmaskarray(t[c]) for c in t.colnames}  # empty ECSV cells are masked
            rows = [
                {_norm(c): (None if masks[c][i] else str(t[c][i])) for c in t.colnames}
                for i in range(len(t))
            ]
            return rows
        with open(path, newline="") as f:
            lines = [ln for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        reader = csv.DictReader(lines, skipinitialspace=True)
        rows = []
        for r in reader:
            if None in r:  # more cells than header names
                raise ManifestError(
                    f"{path}: data row {len(rows) + 1} has more cells than the header "
                    f"({len(reader.fieldnames or [])} columns)"
                )
            rows.append({_norm(k): v for k, v in r.items()})
        return rows
    except ManifestError:
        raise
    except FileNotFoundError:
        raise ManifestError(f"manifest {path}: no such file") from None
    except Exception as exc:
        raise ManifestError(
            f"manifest {path} is not a readable CSV/ECSV table ({type(exc).__name__}: {exc})"
        ) from None


def _text(row: dict, col: str) -> str | None:
    v = row.get(col)
    if v is None:
        return None
    v = str(v).strip()
    return v or None


def _resolve(base: Path, text: str) -> str:
    p = Path(os.path.expanduser(text))
    return os.path.normpath(p if p.is_absolute() else base / p)


def _parse_value(col: str, text: str, kind: str = "subtract") -> Any:
    if col in ("preconvolve", "detect"):
        if text.lower() not in _BOOL:
            raise ValueError(f"must be true or false, got {text!r}")
        return _BOOL[text.lower()]
    if col == "fwhm" and kind == "coadd":  # one for all warps or one per warp
        return [_parse_value("reference_fwhm", t.strip()) for t in text.split(";") if t.strip()]
    if col.endswith("mask_bits"):
        from ..image.inputs import parse_mask_bits

        try:
            parse_mask_bits(text)
        except GpudiffError as exc:
            raise ValueError(str(exc)) from None
        return text
    if col in ("reference_fwhm", "fwhm", "science_fwhm", "template_fwhm"):
        v = float(text)
        if not (v > 0 and v != float("inf")):
            raise ValueError(f"must be a positive FWHM in pixels, got {text!r}")
        return v
    if col == "kernel_size":
        v = int(text)
        if v < 3 or v % 2 == 0:
            raise ValueError(f"must be an odd integer >= 3, got {text!r}")
        return v
    if col == "mode" and text not in ("auto", "convolveTemplate", "convolveScience"):
        raise ValueError(f"must be auto, convolveTemplate or convolveScience, got {text!r}")
    return text


def _make_job(i: int, row: dict, manifest: Path, out_dir: Path) -> Job:
    from ..commands._config import load_config_file, parse_set
    from ..commands.subtract import merge_overrides

    base = manifest.parent
    jid = _text(row, "id") or str(i)
    kind_text = _text(row, "kind") or "subtract"
    kind = kind_text.lower().replace("_", "-")
    job = Job(row=i, id=jid, kind=kind, output=_resolve(out_dir, _text(row, "output") or ""))
    where = f"{manifest.name} {job.label}"
    if kind not in KINDS:
        job.problem = (
            f"{where}: column 'kind': unknown kind {kind_text!r}; choose one of {sorted(KINDS)}"
        )
        return job
    if _text(row, "output") is None:
        job.problem = f"{where}: column 'output' is empty"
        return job
    required, optional, options = KINDS[kind]
    for col in sorted(_KNOWN - _COMMON - set(required) - set(optional) - set(options)):
        if _text(row, col) is not None:
            job.problem = f"{where}: column '{col}' does not apply to {kind} rows"
            return job
    for col in (*required, *optional):
        text = _text(row, col)
        if text is None:
            if col in required:
                job.problem = (
                    f"{where}: column '{col}' is "
                    + ("missing" if col not in row else "empty")
                    + f" (a {kind} row needs {', '.join(required)})"
                )
                return job
            continue
        lists = _lists(kind)
        paths = (
            [_resolve(base, t.strip()) for t in text.split(";") if t.strip()]
            if col in lists
            else [_resolve(base, text)]
        )
        for p in paths:
            if not os.path.isfile(p):
                job.problem = f"{where}: column '{col}': input file {p} " + (
                    "is not a regular file" if os.path.exists(p) else "does not exist"
                )
                return job
        job.inputs[col] = paths if col in lists else paths[0]
    for col in options:
        text = _text(row, col)
        if text is None:
            continue
        try:
            job.options[col] = (
                _resolve(out_dir, text) if col in _OUTPUTS else _parse_value(col, text, kind)
            )
        except ValueError as exc:
            job.problem = f"{where}: column '{col}': {exc}"
            return job
    if kind == "match-psf" and ("reference_psf" in job.inputs) == ("reference_fwhm" in job.options):
        job.problem = (
            f"{where}: a match-psf row needs exactly one of the columns 'reference_fwhm' and "
            "'reference_psf'"
        )
        return job
    try:
        cfg = _text(row, "config")
        sets = [s.strip() for s in (_text(row, "set") or "").split(";") if s.strip()]
        job.overrides = merge_overrides(
            load_config_file(_resolve(base, cfg) if cfg else None), parse_set(sets)
        )
    except GpudiffError as exc:
        job.problem = f"{where}: column '{'set' if 'set' in str(exc) else 'config'}': {exc}"
    return job


def read_manifest(manifest, out_dir) -> list[Job]:
    """Read and check a manifest; the jobs in row order (see the module docstring).

    Parameters
    ----------
    manifest : str or path-like
        CSV or ECSV file; input paths in it are relative to its folder.
    out_dir : str or path-like
        Folder that relative ``output`` (and ``sources_out``, ``matched_template_out``)
        paths are relative to.

    Raises
    ------
    ManifestError
        Unreadable or empty manifest, no ``output`` column, or two rows with one output.
    """
    manifest, out_dir = Path(manifest).absolute(), Path(out_dir).absolute()
    rows = _read_rows(manifest)
    if not rows:
        raise ManifestError(f"manifest {manifest} has no rows")
    columns = set().union(*(r.keys() for r in rows))
    if "output" not in columns:
        raise ManifestError(
            f"manifest {manifest} has no 'output' column; its columns are {sorted(columns)}"
        )
    unknown = sorted(columns - _KNOWN)
    if unknown:  # extra bookkeeping columns (visit, detector, ...) are allowed, but say so
        log.warning(
            "manifest %s: ignoring columns %s (known: %s)", manifest.name, unknown, sorted(_KNOWN)
        )
    jobs = [_make_job(i, r, manifest, out_dir) for i, r in enumerate(rows, start=1)]
    seen: dict[str, Job] = {}
    for job in jobs:
        if job.problem is None:
            for out in (job.output, *(job.options.get(c) for c in _OUTPUTS)):
                if out is None:
                    continue
                key = os.path.normcase(os.path.realpath(out))
                if key in seen:
                    raise ManifestError(
                        f"manifest {manifest}: {job.label} and {seen[key].label} both write {out}"
                    )
                seen[key] = job
    return jobs
