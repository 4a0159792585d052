"""Subcommands of the ``gpudiff`` command line, one module each (see :mod:`gpudiff.cli`)."""
