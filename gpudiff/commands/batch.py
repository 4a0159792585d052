"""``gpudiff batch``: work in progress this session (the owner replaces this module)."""

from __future__ import annotations

import argparse

HELP = "batch (being written)"


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the options to ``parser``."""
    parser.add_argument("inputs", nargs="*")


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("batch is being written")
