"""Batch runs on Dask: one task per manifest row, on this machine or on a cluster.

::

    from gpudiff.batch import run
    result = run("manifest.csv", "out/")                       # embedded LocalCluster
    result = run("manifest.csv", "out/", client=my_client)     # an existing dask Client
    print(result.n_ok, result.n_failed, result.rows_per_minute)

:func:`run` reads and checks the manifest (:mod:`gpudiff.batch.manifest`), submits one
Dask task per row (:func:`gpudiff.batch.task.run_job`: inputs are read on the worker, the
output written there atomically, a small dict comes back), shows progress, and writes a
summary table to ``out_dir``.  A failed row is reported, not fatal; a row whose worker
dies is rescheduled by Dask (the scheduler's ``allowed_failures``); ``resume`` skips rows
whose outputs are already valid.  Importing this package does not import Dask.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import GpudiffError, InvalidInputError, ManifestError
from .manifest import KINDS, Job, read_manifest
from .task import output_status, remove_stale_temporaries, run_job

__all__ = [
    "run",
    "BatchResult",
    "Job",
    "read_manifest",
    "run_job",
    "output_status",
    "remove_stale_temporaries",
    "KINDS",
    "SUMMARY_COLUMNS",
]

log = logging.getLogger("gpudiff.batch")

#: Columns of the summary table, in order.
SUMMARY_COLUMNS = (
    "row",
    "id",
    "kind",
    "output",
    "status",
    "error",
    "time_s",
    "read_s",
    "write_s",
    "kernel_sum",
    "n_candidates_used",
    "n_dia_sources",
    "worker_losses",
    "worker",
    "notes",
)
_FLOATS = {"time_s", "read_s", "write_s", "kernel_sum"}
_INTS = {"row", "n_candidates_used", "n_dia_sources", "worker_losses"}


@dataclass
class BatchResult:
    """What :func:`run` did.

    Attributes
    ----------
    table : astropy.table.Table
        One row per manifest row of this shard (:data:`SUMMARY_COLUMNS`); ``status`` is
        ``ok``, ``failed`` or ``skipped`` (``resume``: the output was already valid).
    n_ok, n_failed, n_skipped : int
    wall_s : float
        From the first submission to the last result (cluster start-up excluded).
    rows_per_minute : float
        ``n_ok`` / ``wall_s`` in minutes: the throughput (pairs per minute for subtract rows).
    summary_path : str
        The ECSV the table was written to.
    n_workers : int
    """

    table: object
    n_ok: int
    n_failed: int
    n_skipped: int
    wall_s: float
    rows_per_minute: float
    summary_path: str
    n_workers: int


def _require_distributed() -> None:
    """Dask's ``distributed`` is an optional extra: say how to install it, not a traceback."""
    try:
        import distributed  # noqa: F401
    except ImportError as exc:
        raise GpudiffError(
            f"batch runs need Dask's distributed scheduler, which is not installed ({exc}); "
            "install the extra: pip install 'gpudiff[distributed]' "
            "(or: pip install 'dask[distributed]' tqdm)"
        ) from None


def _tqdm_available() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _table(rows: list[dict]):
    from astropy.table import MaskedColumn, Table

    t = Table()
    for c in SUMMARY_COLUMNS:
        vals = [r.get(c) for r in rows]
        if c in _FLOATS:
            t[c] = [math.nan if v is None else float(v) for v in vals]
        elif c in _INTS:  # n/a (e.g. no detection) is a masked cell, an empty one in the ECSV
            t[c] = MaskedColumn(
                [0 if v is None else int(v) for v in vals],
                mask=[v is None for v in vals],
                dtype="int64",
            )
        else:
            t[c] = [("" if v is None else str(v)) for v in vals]
    return t


def _print_summary(res: BatchResult, out=print) -> None:
    t = res.table
    show = t if len(t) <= 50 else t[t["status"] == "failed"]
    if len(show):
        cols = [
            "row",
            "id",
            "kind",
            "status",
            "time_s",
            "kernel_sum",
            "n_candidates_used",
            "n_dia_sources",
            "worker_losses",
        ]
        from astropy.table import Table

        view = Table(show[cols], copy=True)  # display formats must not reach the returned table
        view["time_s"].format, view["kernel_sum"].format = ".2f", ".4f"
        for line in view.pformat(max_lines=-1, max_width=-1):
            out("  " + line)
    for r in t[t["status"] == "failed"]:
        out(f"  row {r['row']} ({r['output']}) failed: {r['error']}")
    ok = t[t["status"] == "ok"]
    per_row = (
        f"{float(sum(ok['time_s'])) / len(ok):.2f} s per row on a worker (mean)"
        if len(ok)
        else "no row ran"
    )
    out(
        f"gpudiff batch: {len(t)} rows: {res.n_ok} ok, {res.n_failed} failed, "
        f"{res.n_skipped} skipped, in {res.wall_s:.1f} s on {res.n_workers} workers; {per_row}; "
        f"throughput {res.rows_per_minute:.1f} rows/min; summary {res.summary_path}"
    )


def _collect(client, futures: dict, progress: str, log_fn) -> dict:
    """row → result dict for every ``futures`` (row → (job, future)); errored ones become failed
    rows."""
    from distributed import as_completed

    rows: dict[int, dict] = {}
    by_future = {f: job for job, f in futures.values()}
    if progress == "dask":
        from distributed import progress as dask_progress, wait

        dask_progress(list(by_future), notebook=False)
        wait(list(by_future))
        iterator, bar = list(by_future), None
    else:
        iterator = as_completed(list(by_future))
        bar = None
        if progress == "tqdm":
            from tqdm.auto import tqdm

            bar = tqdm(total=len(by_future), unit="row", desc="gpudiff batch", smoothing=0.1)
    for fut in iterator:
        job = by_future[fut]
        if fut.status == "finished":
            r = fut.result()
        else:
            # retried and still raising, or KilledWorker (its worker died more than
            # allowed_failures times)
            exc = fut.exception()
            r = {
                "row": job.row,
                "id": job.id,
                "kind": job.kind,
                "output": job.output,
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}",
            }
        rows[job.row] = {**r, "worker_losses": 0}
        if r["status"] == "failed":
            log_fn(f"gpudiff batch: {job.label} failed: {r['error']}")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                failed=sum(x["status"] == "failed" for x in rows.values()), refresh=False
            )
    if bar is not None:
        bar.close()
    try:  # how often each row lost its worker: the scheduler's "suspicious" count
        keys = {f.key: job.row for job, f in futures.values()}

        def _suspicious(dask_scheduler, keys=tuple(keys)):
            return {
                k: dask_scheduler.tasks[k].suspicious for k in keys if k in dask_scheduler.tasks
            }

        for key, n in client.run_on_scheduler(_suspicious).items():
            rows[keys[key]]["worker_losses"] = int(n)
    except Exception as exc:  # e.g. a scheduler that forbids run_on_scheduler
        log.info("cannot read worker-loss counts from the scheduler: %s", exc)
    return rows


def run(
    manifest,
    out_dir,
    client=None,
    *,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    workers: int | None = None,
    gpus=None,
    tasks_per_gpu: int = 2,
    retries: int = 3,
    resume: bool = False,
    overwrite: bool = False,
    njobs: int = 1,
    job: int = 0,
    backend: str | None = None,
    progress="auto",
    memory_limit="auto",
    strict: bool = False,
    summary_name: str | None = None,
    log_fn=print,
) -> BatchResult:
    """Run every row of a manifest as a Dask task and write a summary table.

    Parameters
    ----------
    manifest : str or path-like
        CSV/ECSV manifest (:mod:`gpudiff.batch.manifest`); inputs relative to its folder.
    out_dir : str or path-like
        Created if needed; relative outputs go here, and the summary ECSV.
    client : dask.distributed.Client, optional
        Use this client (and its cluster) as is.
    scheduler, scheduler_file : str, optional
        Otherwise connect to this scheduler address (``tcp://host:8786``) or scheduler file;
        with none of the three an embedded cluster is started and closed
        (:func:`gpudiff.batch.cluster.start_local_cluster`: ``workers`` CPU processes, or
        one worker per GPU of ``gpus`` or found).
    tasks_per_gpu : int
        Embedded GPU cluster: rows run concurrently on each GPU (worker threads, each on
        its own CUDA stream), so one row's FITS reading and writing overlaps another's
        device work.
    retries : int
        A row raising an unexpected (non-gpudiff) error is retried this many times; with an
        embedded cluster it is also how many times a row may lose its worker before it is
        reported failed (an existing scheduler keeps its ``allowed-failures`` setting).
    resume : bool
        Skip rows whose output is a valid exposure FITS (:func:`output_status`); redo the
        others, replacing an invalid output.
    overwrite : bool
        Replace existing outputs (otherwise such a row fails, naming the file).
    njobs, job : int
        Run only rows ``r`` with ``(r - 1) % njobs == job`` (a job array: ``job`` is 0-based).
    backend : str, optional
        Backend of the tasks (default: the workers' ``GPUDIFF_BACKEND`` or auto; ``cupy``
        on an embedded GPU cluster).
    progress : {"auto", "tqdm", "dask", None}
        ``auto``: a tqdm bar with an embedded cluster, Dask's progress bar otherwise.
    strict : bool
        Raise :class:`ManifestError` for the first bad row instead of reporting it.
    summary_name : str, optional
        Default ``batch_summary.ecsv`` (``batch_summary_job{J}of{N}.ecsv`` when sharded).
    log_fn : callable
        Receives the printed lines (failures as they come, the summary at the end).

    Returns
    -------
    BatchResult

    Notes
    -----
    Dask starts worker processes with ``multiprocessing``'s *spawn*, which re-imports the
    main script: in a script, call :func:`run` under ``if __name__ == "__main__":``.
    """
    if client is None:
        _require_distributed()
    njobs, job = _check_int("njobs", njobs, 1), _check_int("job", job, 0)
    retries = _check_int("retries", retries, 0)
    if job >= njobs:
        raise InvalidInputError(
            f"job must be in 0..{njobs - 1} (0-based) for njobs={njobs}, got {job}"
        )
    if sum(x is not None for x in (client, scheduler, scheduler_file)) > 1:
        raise InvalidInputError("give at most one of client, scheduler and scheduler_file")
    out_dir = Path(out_dir)
    jobs = [j for j in read_manifest(manifest, out_dir) if (j.row - 1) % njobs == job]
    if strict:
        bad = next((j for j in jobs if j.problem), None)
        if bad is not None:
            raise ManifestError(bad.problem)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[int, dict] = {}
    todo: list[tuple[Job, bool]] = []
    for j in jobs:
        base = {"row": j.row, "id": j.id, "kind": j.kind, "output": j.output}
        if j.problem:
            rows[j.row] = {**base, "status": "failed", "error": f"ManifestError: {j.problem}"}
            log_fn(f"gpudiff batch: {j.problem}")
            continue
        if resume and os.path.exists(j.output):
            valid, why = output_status(j.output)
            if valid:
                rows[j.row] = {**base, "status": "skipped", "notes": "resume: output already valid"}
                continue
            log_fn(
                f"gpudiff batch: {j.label}: existing output {j.output} is invalid ({why}); "
                "redoing it"
            )
            todo.append((j, True))
            continue
        todo.append((j, overwrite))

    own_cluster = own_client = None
    n_workers, wall = 0, 0.0
    dask_logger = logging.getLogger("distributed")
    old_level = dask_logger.level
    try:
        if todo:
            from distributed import Client

            gpu_cluster = False
            if client is None:
                if scheduler or scheduler_file:
                    client = own_client = Client(scheduler, scheduler_file=scheduler_file)
                else:
                    from .cluster import start_local_cluster

                    if not log.isEnabledFor(
                        logging.DEBUG
                    ):  # worker start/stop and shutdown chatter
                        dask_logger.setLevel(logging.ERROR)

                    own_cluster, gpu_cluster = start_local_cluster(
                        workers=workers,
                        gpus=gpus,
                        backend=backend,
                        retries=retries,
                        memory_limit=memory_limit,
                        tasks_per_gpu=tasks_per_gpu,
                    )
                    client = own_client = Client(own_cluster)
            task_backend = backend or ("cupy" if gpu_cluster else None)
            mode = (
                progress
                if progress in ("tqdm", "dask", None, False)
                else ("tqdm" if own_cluster and _tqdm_available() else "dask")
            )
            token = uuid.uuid4().hex[:8]
            t0 = time.perf_counter()
            futures = {
                j.row: (
                    j,
                    client.submit(
                        run_job,
                        j,
                        task_backend,
                        ow,
                        retries=retries,
                        pure=False,
                        key=f"gpudiff-{j.kind}-row{j.row}-{token}",
                    ),
                )
                for j, ow in todo
            }
            rows.update(_collect(client, futures, mode or "none", log_fn))
            wall = time.perf_counter() - t0
            n_workers = len(
                client.nthreads()
            )  # at the end: a remote cluster may have grown meanwhile
            del futures
    finally:
        if own_client is not None:
            own_client.close()
        if own_cluster is not None:
            own_cluster.close()
        dask_logger.setLevel(old_level)

    ordered = [rows[j.row] for j in jobs]
    table = _table(ordered)
    n_ok = int((table["status"] == "ok").sum())
    name = summary_name or (
        "batch_summary.ecsv" if njobs == 1 else f"batch_summary_job{job}of{njobs}.ecsv"
    )
    summary_path = out_dir / name
    from ..commands.subtract import write_table_atomic

    table.meta.update(
        manifest=str(Path(manifest).absolute()),
        wall_s=wall,
        n_workers=n_workers,
        njobs=njobs,
        job=job,
    )
    write_table_atomic(table, summary_path, overwrite=True)
    res = BatchResult(
        table=table,
        n_ok=n_ok,
        n_failed=int((table["status"] == "failed").sum()),
        n_skipped=int((table["status"] == "skipped").sum()),
        wall_s=wall,
        rows_per_minute=(60.0 * n_ok / wall) if wall > 0 else 0.0,
        summary_path=str(summary_path),
        n_workers=n_workers,
    )
    _print_summary(res, log_fn)
    return res
