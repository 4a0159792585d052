"""``gpudiff info``: versions, the resolved backend, CUDA devices, kernel locations."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

from ..backend import cupy_status, get_backend
from ..errors import GpudiffError

HELP = "versions, resolved backend, CUDA devices, kernel locations"


def configure(parser: argparse.ArgumentParser) -> None:
    """No options beyond the common ones."""


def _module_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "not installed"


def _cupy_version() -> str:
    for dist in ("cupy-cuda13x", "cupy-cuda12x", "cupy"):
        v = _module_version(dist)
        if v != "not installed":
            return f"{v} ({dist})"
    return "not installed"


def _kernel_cache_dir() -> str:
    # CuPy caches compiled RawModules here (its documented default and override).
    return os.environ.get("CUPY_CACHE_DIR", str(Path.home() / ".cupy" / "kernel_cache"))


def run(args: argparse.Namespace) -> int:
    """Print versions, the resolved backend, CUDA devices and where kernels come from."""
    from .. import __version__  # here, not at import: importlib.metadata slows `gpudiff --help`
    from ..backend.kernels import cuda_source_dir, list_kernels
    from ..backend.threads import get_num_threads

    ok, reason = cupy_status()
    try:
        be = get_backend(args.backend)
        resolved = be.name
    except GpudiffError as exc:
        resolved = f"unavailable ({exc})"
    try:
        src = str(cuda_source_dir())
    except GpudiffError as exc:
        src = f"not found ({exc})"
    rows = [
        ("gpudiff", __version__),
        ("python", platform.python_version()),
        ("numpy", _module_version("numpy")),
        ("scipy", _module_version("scipy")),
        ("astropy", _module_version("astropy")),
        ("cupy", _cupy_version()),
        ("backend requested", args.backend or os.environ.get("GPUDIFF_BACKEND", "auto")),
        ("backend resolved", resolved),
        ("host threads", get_num_threads()),
        ("CUDA", reason if ok else f"no ({reason})"),
        ("CUDA kernel sources", src),
        ("registered kernels", ", ".join(list_kernels())),
        ("kernel cache dir", _kernel_cache_dir()),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
