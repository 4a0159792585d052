"""``gpudiff batch MANIFEST --out-dir DIR``: run a manifest of jobs on Dask.

::

    gpudiff batch MANIFEST --out-dir DIR [--scheduler ADDRESS | --scheduler-file FILE]
                  [--workers N] [--gpus LIST] [--retries K] [--resume] [--overwrite]
                  [--njobs N --job J] [--strict] [--no-progress] [--backend ...] [-v]

With no scheduler an embedded Dask cluster runs on this machine (one worker process per
core, or one worker per GPU); ``--scheduler tcp://host:8786`` sends the same run to an
existing cluster.  ``--njobs N --job J`` runs one shard of a job array (J is 0-based, e.g.
``$SLURM_ARRAY_TASK_ID`` with ``--array=0-(N-1)``, or HTCondor's ``$(Process)``).  See
:mod:`gpudiff.batch.manifest` for the manifest's columns.  Exit status 0 when every row
is ok or skipped, 1 when a row failed (the summary table lists it), 2 for usage errors.
"""

from __future__ import annotations

import argparse

HELP = "run a manifest of subtract / match-psf / coadd jobs on Dask (local cluster or a scheduler)"


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {v}")
        return v

    return parse


def _gpus(text: str) -> list[str]:
    from .cluster import parse_gpus
    from ..errors import InvalidInputError

    try:
        return parse_gpus(text)
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``gpudiff batch`` to ``parser``."""
    parser.add_argument("manifest", metavar="MANIFEST", help="CSV or ECSV table, one row per job")
    parser.add_argument(
        "--out-dir",
        metavar="DIR",
        required=True,
        help="relative outputs and the summary table go here",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--scheduler", metavar="ADDRESS", help="an existing Dask scheduler, e.g. tcp://host:8786"
    )
    where.add_argument(
        "--scheduler-file", metavar="FILE", help="the scheduler file of an existing Dask cluster"
    )
    parser.add_argument(
        "--workers",
        metavar="N",
        type=_int_at_least(1),
        help="embedded cluster: CPU worker processes (default: one per core)",
    )
    parser.add_argument(
        "--gpus",
        metavar="LIST",
        type=_gpus,
        help="embedded cluster: one worker per GPU id, e.g. 0,1 (default: every GPU found)",
    )
    parser.add_argument(
        "--tasks-per-gpu",
        metavar="K",
        type=_int_at_least(1),
        default=2,
        help="embedded GPU cluster: rows run concurrently on each GPU, each on its own "
        "CUDA stream (default 2)",
    )
    parser.add_argument(
        "--retries",
        metavar="K",
        type=_int_at_least(0),
        default=3,
        help="retries of a row whose worker died or that raised an unexpected error (default 3)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="skip rows whose outputs exist and are valid"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument(
        "--njobs",
        metavar="N",
        type=_int_at_least(1),
        default=1,
        help="split the manifest into N shards (job arrays)",
    )
    parser.add_argument(
        "--job",
        metavar="J",
        type=_int_at_least(0),
        default=None,
        help="run shard J (0-based) of --njobs",
    )
    parser.add_argument("--strict", action="store_true", help="stop at the first bad manifest row")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from . import run as run_batch
    from ..errors import InvalidInputError

    if args.job is None and args.njobs > 1:
        raise InvalidInputError("--njobs needs --job J (0-based) to say which shard to run")
    job = args.job or 0
    if job >= args.njobs:
        raise InvalidInputError(
            f"--job must be in 0..{args.njobs - 1} for --njobs {args.njobs}, got {job}"
        )
    import logging

    # Dask logs every worker start and stop at INFO: show that only with -vv.
    logging.getLogger("distributed").setLevel(
        {0: logging.ERROR, 1: logging.WARNING}.get(args.verbose, logging.INFO)
    )
    logging.getLogger("gpudiff.batch").setLevel(logging.INFO if args.verbose else logging.WARNING)
    remote = args.scheduler or args.scheduler_file
    if remote and (args.workers or args.gpus):
        print(
            "gpudiff batch: note: --workers/--gpus apply to the embedded cluster only; using the "
            "scheduler's workers"
        )
    res = run_batch(
        args.manifest,
        args.out_dir,
        scheduler=args.scheduler,
        scheduler_file=args.scheduler_file,
        workers=None if remote else args.workers,
        gpus=None if remote else args.gpus,
        tasks_per_gpu=args.tasks_per_gpu,
        retries=args.retries,
        resume=args.resume,
        overwrite=args.overwrite,
        njobs=args.njobs,
        job=job,
        backend=args.backend,
        progress=None if args.no_progress else "auto",
        strict=args.strict,
    )
    return 1 if res.n_failed else 0
