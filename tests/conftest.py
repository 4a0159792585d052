"""Shared fixtures: a ``backend`` fixture over the backends present, a ``gpu`` marker, data paths.

Set ``GPUDIFF_BACKEND=cupy`` to run the backend-parametrized tests on CuPy only (and fail
loudly if CuPy cannot run); by default they run on every backend this machine has.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from gpudiff.backend import available_backends, get_backend

SHARED_DATA = Path(
    os.environ.get("GPUDIFF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def _backend_names() -> list[str]:
    forced = os.environ.get("GPUDIFF_BACKEND", "").strip().lower()
    if forced in ("numpy", "cupy"):
        return [forced]
    return available_backends()


def pytest_collection_modifyitems(config, items):
    if "cupy" in available_backends():
        return
    skip_gpu = pytest.mark.skip(reason="needs CuPy and a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=_backend_names())
def backend(request):
    """Each array backend available here (NumPy always; CuPy with a GPU)."""
    return get_backend(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(20261120)


@pytest.fixture
def shared_data():
    """Path to ../shared/data; skips the test when the real data are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not present at {SHARED_DATA}")
    return SHARED_DATA
