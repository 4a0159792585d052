"""``python -m gpudiff`` is the ``gpudiff`` command."""

from .cli import console_main

if __name__ == "__main__":
    raise SystemExit(console_main())
