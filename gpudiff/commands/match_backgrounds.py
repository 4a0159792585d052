"""``gpudiff match-backgrounds``: work in progress this session (the owner replaces this module)."""

from __future__ import annotations

import argparse

HELP = "match-backgrounds (being written)"


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the options to ``parser``."""
    parser.add_argument("inputs", nargs="*")


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("match-backgrounds is being written")
