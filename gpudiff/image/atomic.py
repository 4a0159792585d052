"""Atomic file output: write beside the target under a temporary name, fsync, rename.

Every file gpudiff writes goes through :func:`atomic_write`, so an interrupted or failed
write (a full disk, an exception, Ctrl-C) never leaves a truncated output, and a failed
overwrite keeps the old file.  The CLI and batch layers can use it for any format:
``atomic_write(path, lambda f: table.write(f, format="ascii.ecsv"), text=True)``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import IO, Any, Callable

from ..errors import FitsWriteError

__all__ = ["atomic_write", "check_writable", "temporary_name"]


def temporary_name(path) -> str:
    """The hidden temporary ``.NAME.<random>.tmp`` beside ``path`` that :func:`atomic_write`
    uses."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")


def atomic_write(
    path,
    write: Callable[[IO], Any],
    overwrite: bool = False,
    error: type[Exception] = FitsWriteError,
    text: bool = False,
) -> None:
    """Call ``write(f)`` on a file that becomes ``path`` only once complete.

    ``f`` is a binary file, or a UTF-8 text file with ``text=True`` (ECSV, CSV).

    The temporary is created with ``O_EXCL`` and mode 0666 & ~umask (not mkstemp's
    0600), flushed and fsynced, then renamed over ``path`` (atomic on POSIX).  On any
    failure it is removed; ``KeyboardInterrupt`` and other ``BaseException`` s pass
    through unchanged after that cleanup.

    Raises
    ------
    error (default FitsWriteError)
        ``path`` exists and not ``overwrite``, its folder is missing or unwritable, or
        ``write`` failed; the message names ``path``.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise error(f"{path}: file exists (pass overwrite=True to replace it)")
    tmp = temporary_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise error(
            f"{path}: cannot create a file in {os.path.dirname(tmp)!r} ({exc.strerror or exc})"
        ) from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") if text else os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if not isinstance(exc, Exception):  # KeyboardInterrupt & co. pass through
            raise
        raise error(f"{path}: write failed ({type(exc).__name__}: {exc})") from exc


def check_writable(path, overwrite: bool = False, error: type[Exception] = FitsWriteError) -> None:
    """Fail fast, before any work, if ``path`` could not be written later.

    The CLI and batch layers call this on every output before reading inputs, so a typo'd
    or read-only output folder costs nothing instead of a whole subtraction.

    Raises
    ------
    error (default FitsWriteError)
        ``path`` exists and not ``overwrite``; its folder is missing, not a folder, or not
        writable.  The message names ``path``.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise error(f"{path}: file exists (pass overwrite=True / --overwrite to replace it)")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise error(f"{path}: cannot create a file in {folder!r} (no such folder)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise error(f"{path}: cannot create a file in {folder!r} (folder not writable)")
