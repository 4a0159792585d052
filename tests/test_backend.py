"""The backend switch: resolution, env var, errors, conversions, and no CuPy on import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import gpudiff
from gpudiff.backend import (
    Backend,
    available_backends,
    cupy_status,
    get_backend,
    resolve_backend,
    use_backend,
)
from gpudiff.errors import BackendUnavailableError, GpudiffError, InvalidInputError


def test_import_does_not_import_cupy():
    # A fresh interpreter: importing gpudiff (and resolving the numpy backend) must not
    # pull in CuPy, so gpudiff works on machines where CuPy is broken or absent.
    code = (
        "import sys, gpudiff; gpudiff.get_backend('numpy'); "
        "import gpudiff.image, gpudiff.backend; "
        "print('cupy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_numpy_backend_fields():
    be = get_backend("numpy")
    assert isinstance(be, Backend)
    assert be.name == "numpy" and be.xp is np and not be.is_gpu
    import scipy.fft
    import scipy.ndimage

    assert be.fft is scipy.fft and be.ndimage is scipy.ndimage and be.linalg is np.linalg
    with pytest.raises(Exception):
        be.name = "cupy"  # frozen


def test_backend_is_cached_and_case_insensitive():
    assert get_backend("NumPy") is get_backend("numpy")


def test_unknown_backend_name():
    with pytest.raises(InvalidInputError, match="unknown gpudiff backend 'tpu'"):
        get_backend("tpu")


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("GPUDIFF_BACKEND", "numpy")
    assert get_backend().name == "numpy"
    monkeypatch.setenv("GPUDIFF_BACKEND", "bogus")
    with pytest.raises(InvalidInputError, match="GPUDIFF_BACKEND"):
        get_backend()


def test_auto_falls_back_to_numpy_when_no_gpu(caplog):
    ok, _ = cupy_status()
    if ok:
        pytest.skip("a GPU is present: auto resolves to cupy")
    import logging

    from gpudiff.backend import core

    core._build.cache_clear()
    with caplog.at_level(logging.INFO, logger="gpudiff.backend"):
        be = get_backend("auto")
    assert be.name == "numpy"
    assert any("resolved to 'numpy'" in r.getMessage() for r in caplog.records)


def test_cupy_unavailable_raises_clear_error():
    ok, reason = cupy_status()
    if ok:
        pytest.skip("CuPy runs here")
    with pytest.raises(BackendUnavailableError) as info:
        get_backend("cupy")
    assert isinstance(info.value, GpudiffError)
    assert "cupy" in str(info.value) and "numpy" in str(info.value)
    assert available_backends() == ["numpy"]


def test_use_backend_context_and_resolve():
    be = get_backend("numpy")
    with use_backend("numpy") as active:
        assert active is be
        assert get_backend() is be
    assert resolve_backend(be) is be
    assert resolve_backend("numpy") is be


def test_asarray_converts_big_endian(backend):
    a = np.arange(12, dtype=">f4").reshape(3, 4)
    d = backend.asarray(a)
    h = backend.asnumpy(d)
    assert h.dtype.isnative and h.dtype == np.float32
    np.testing.assert_array_equal(h, np.arange(12, dtype=np.float32).reshape(3, 4))
    # dtype conversion and the original left untouched
    d64 = backend.asarray(a, dtype=np.float64)
    assert backend.asnumpy(d64).dtype == np.float64
    assert a.dtype == np.dtype(">f4")
    backend.synchronize()


@pytest.mark.gpu
def test_cupy_round_trip():
    be = get_backend("cupy")
    a = np.random.default_rng(1).normal(size=(64, 64)).astype(np.float32)
    d = be.asarray(a)
    assert type(d).__module__.startswith("cupy")
    np.testing.assert_array_equal(be.asnumpy(d), a)
    # numpy backend accepts device arrays too (brings them to the host)
    np.testing.assert_array_equal(get_backend("numpy").asarray(d), a)


def test_version_string():
    assert isinstance(gpudiff.__version__, str) and gpudiff.__version__
