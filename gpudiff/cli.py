"""The ``gpudiff`` command line.

Each subcommand is a module of :mod:`gpudiff.commands` with ``HELP``, ``configure(parser)``
and ``run(args) -> int``, imported only when it is used.  Errors of gpudiff
(``GpudiffError``) are printed as one line and give exit status 1; usage errors give 2
(argparse's convention).  On the console (:func:`console_main`) warnings are one line
each as well.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import logging
import os
import sys
import warnings

from .backend import BACKEND_NAMES
from .backend.threads import ENV_THREADS, blas_threads, num_threads
from .errors import GpudiffError

__all__ = ["main", "console_main", "build_parser", "COMMANDS"]

#: Subcommand name → its module under gpudiff.  ``batch`` lives with the batch package,
#: which runs the other commands' file functions: ``gpudiff.commands`` never imports it,
#: so the two packages do not import each other.
COMMANDS: dict[str, str] = {
    "info": "commands.info",
    "demo": "commands.demo",
    "subtract": "commands.subtract",
    "match-psf": "commands.match_psf",
    "match-backgrounds": "commands.match_backgrounds",
    "coadd": "commands.coadd",
    "batch": "batch.command",
}


class _VersionAction(argparse.Action):
    """``--version``, resolving the version only when asked (importlib.metadata is slow
    to import: the command line's start should not pay for it)."""

    def __init__(
        self,
        option_strings,
        dest=argparse.SUPPRESS,
        default=argparse.SUPPRESS,
        help="show program's version number and exit",
    ):
        super().__init__(
            option_strings=option_strings, dest=dest, default=default, nargs=0, help=help
        )

    def __call__(self, parser, namespace, values, option_string=None):
        from . import __version__

        print(f"gpudiff {__version__}")  # stdout, as argparse's own version action
        parser.exit()


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


@contextlib.contextmanager
def _thread_setting(n: int | None):
    """``--threads N`` for the command: the setting of this process (a ``num_threads``
    block) and ``$GPUDIFF_NUM_THREADS`` for the processes it starts (``batch`` workers),
    both restored afterwards (``main`` may be called in-process, as the tests do)."""
    if n is None:
        yield
        return
    old = os.environ.get(ENV_THREADS)
    os.environ[ENV_THREADS] = str(n)
    try:
        with num_threads(n):
            yield
    finally:
        if old is None:
            os.environ.pop(ENV_THREADS, None)
        else:
            os.environ[ENV_THREADS] = old


def _command(name: str):
    return importlib.import_module(f"gpudiff.{COMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``gpudiff`` command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--backend",
        choices=BACKEND_NAMES,
        default=None,
        help="array backend (default: $GPUDIFF_BACKEND or auto)",
    )
    # --threads is also accepted before the command (``gpudiff --threads 1 info``); after it,
    # its default must not overwrite the value given before (argparse fills sub-parser
    # defaults in after the main parser's).
    common.add_argument(
        "--threads",
        type=_positive_int,
        default=argparse.SUPPRESS,
        metavar="N",
        help=f"host threads per process for thread pools and FFTs (default: ${ENV_THREADS}, "
        "else one per core; batch workers: 1 each)",
    )
    common.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )

    parser = argparse.ArgumentParser(
        prog="gpudiff", description="Astronomical image differencing on GPUs (LSST algorithms)."
    )
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"host threads per process for thread pools and FFTs (default: ${ENV_THREADS}, "
        "else one per core; batch workers: 1 each)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        mod = _command(name)
        p = sub.add_parser(name, parents=[common], help=mod.HELP, description=mod.HELP)
        mod.configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gpudiff`` console script and ``python -m gpudiff``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (
        logging.WARNING
        if args.verbose == 0
        else (logging.INFO if args.verbose == 1 else logging.DEBUG)
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        with _thread_setting(args.threads):
            return _command(args.command).run(args)
    except GpudiffError as exc:
        print(f"gpudiff {args.command}: error: {exc}", file=sys.stderr)
        return 1


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # gpudiff's warnings already say what and where (a reader names the file); the
    # source line of the warnings.warn call is noise to a command-line user.
    own = category.__module__.split(".")[0] == "gpudiff"
    kind = "" if own else f" ({category.__name__})"
    print(f"gpudiff: warning: {message}{kind}", file=sys.stderr if file is None else file)


def console_main() -> int:
    """The ``gpudiff`` console script and ``python -m gpudiff``: :func:`main` with every
    warning printed as one line (``gpudiff: warning: ...``) instead of Python's
    two-line format, in a process tuned for one command.  Library callers of :func:`main`
    keep Python's warning machinery and their process settings."""
    # The process runs one command: its settings are ours to choose.  BLAS on one thread:
    # the command's pools and FFT workers already keep the cores busy, and OpenBLAS's
    # idle threads spin (perf: 0.6–1 CPU-s of 14 on a 2048² subtraction on 2 cores, 0.05
    # after).  A larger first garbage-collector generation: the imports make hundreds of
    # thousands of long-lived objects that the default threshold (700) scans again and
    # again, and arrays are freed by reference counting anyway (collections 0.26 → 0.10 s).
    gc.set_threshold(20_000, 10, 10)
    # An OPENBLAS_NUM_THREADS of the user's own wins.
    blas = contextlib.nullcontext() if "OPENBLAS_NUM_THREADS" in os.environ else blas_threads(1)
    with warnings.catch_warnings(), blas:
        warnings.showwarning = _one_line_warning
        return main()
