"""``python -m gpudiff`` is the ``gpudiff`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
