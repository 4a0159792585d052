"""The shared harness of the device-count tests (``test_device_*.py``).

Installing the strict fake device of :mod:`strict_device` patches gpudiff's backend
factory for good, so every counted case runs in a fresh interpreter: a test module
defines a child function that installs the fake, counts its cases with :func:`count` and
writes a JSON file, and runs it with :func:`run_child` (or a module-scoped fixture made by
:func:`child_fixture`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def count(fn: Callable[[], Any]) -> tuple[dict, Any]:
    """({"calls", "syncs"}, result) of ``fn()`` on the installed fake device: the device
    calls and host syncs it makes (counted in a stage of its own, counters reset)."""
    import strict_device as sd

    with sd.counting():
        with sd.stage("x"):
            out = fn()
        st = sd.report()["stages"].get("x", {"calls": 0, "syncs": 0})
    return {"calls": st["calls"], "syncs": st["syncs"]}, out


def run_child(module: str, function: str, out_path: Path, timeout: float = 600) -> Any:
    """Run ``module.function(str(out_path))`` in a fresh interpreter (the repository and
    the tests first on its path, no ``GPUDIFF_BACKEND``) and return the JSON it wrote."""
    env = dict(os.environ)
    extra = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS)] + extra)
    env.pop("GPUDIFF_BACKEND", None)
    code = f"import {module} as t; t.{function}({str(out_path)!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=str(ROOT),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(Path(out_path).read_text())


def child_fixture(module: str, function: str = "_child", timeout: float = 600):
    """A module-scoped ``counts`` fixture: :func:`run_child` of ``module.function``, once
    per test module."""

    @pytest.fixture(scope="module")
    def counts(tmp_path_factory):
        out = tmp_path_factory.mktemp(module) / "counts.json"
        return run_child(module, function, out, timeout)

    return counts


def numpy_claiming_device():
    """The NumPy backend (its name dispatches the kernels to their NumPy twins) with
    ``is_gpu`` True: device code paths checked bit for bit against the host paths without
    a GPU.  gpudiff is imported here, not with this module, which the device-count
    children import before they install the strict fake."""
    from gpudiff.backend import Backend, get_backend

    class NumpyClaimingDevice(Backend):
        @property
        def is_gpu(self) -> bool:
            return True

    be = get_backend("numpy")
    return NumpyClaimingDevice(**{f.name: getattr(be, f.name) for f in dataclasses.fields(be)})
