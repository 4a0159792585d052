"""Machine faults: GPU out-of-memory falls back (row bands, then the CPU with a warning),
and every output is written atomically (an interrupted write leaves no partial file).

There is no GPU in CI, so a fake "cupy" backend stands in for the device: NumPy arrays,
the registered kernels' NumPy twins, and an FFT module that raises an exception shaped
like CuPy's ``cupy.cuda.memory.OutOfMemoryError`` for any transform larger than a set
number of pixels, as a device with little free memory would.  Since the fake device
computes exactly what NumPy computes, a CPU re-run must equal a plain NumPy run bit for bit.
"""

from __future__ import annotations

import logging
import os
import types
import warnings

import numpy as np
import pytest
import scipy.fft
import scipy.ndimage
from astropy.io import fits
from astropy.table import Table

import gpudiff.backend.kernels as kernels
from gpudiff.backend import get_backend
from gpudiff.backend.core import Backend
from gpudiff.backend.fallback import free_device_memory, is_out_of_memory, with_memory_fallback
from gpudiff.cli import main
from gpudiff.errors import (
    DeviceMemoryError,
    FitsWriteError,
    GpudiffFallbackWarning,
    InvalidInputError,
)
from gpudiff.image import GaussianPsf, read_exposure
from gpudiff.image.atomic import atomic_write
from gpudiff.image.fitsio import write_psf
from gpudiff.ops.convolution import process_in_row_bands
from gpudiff.tasks import AlardLuptonSubtractConfig, AlardLuptonSubtractTask
from gpudiff.tasks.model_psf_match import ModelPsfMatchTask

from _lsst_pair import cached_test_image as _cached, lsst_pair as _pair  # tests/_lsst_pair.py

# --------------------------------------------------------------------------------------
# a fake device
# --------------------------------------------------------------------------------------


class OutOfMemoryError(MemoryError):
    """Shaped like CuPy's: the handler recognises it by module and name."""


OutOfMemoryError.__module__ = "cupy.cuda.memory"


class CuFFTError(RuntimeError):
    pass


CuFFTError.__module__ = "cupy_backends.cuda.libs.cufft"


class _LimitedFFT:
    """scipy.fft, except that transforms over more than ``limit`` pixels 'run out of memory'."""

    def __init__(self, limit: int):
        self.limit, self.failures = limit, 0

    def __getattr__(self, name):
        return getattr(scipy.fft, name)

    def rfft2(self, a, s=None, **kw):
        shape = s if s is not None else a.shape[-2:]
        if shape[0] * shape[1] > self.limit:
            self.failures += 1
            raise OutOfMemoryError(f"Out of memory allocating {8 * shape[0] * shape[1]:,} bytes")
        return scipy.fft.rfft2(a, s=s, **kw)


@pytest.fixture
def device(monkeypatch):
    """make(limit) → a fake 'cupy' Backend whose FFTs fail above ``limit`` pixels."""
    monkeypatch.setattr(
        kernels, "get_kernel", lambda name, backend=None: kernels.get_spec(name).numpy_impl
    )

    def make(limit: int) -> Backend:
        return Backend(
            name="cupy",
            xp=np,
            fft=_LimitedFFT(limit),
            ndimage=scipy.ndimage,
            linalg=np.linalg,
            device=0,
        )

    return make


def _assert_identical(a, b):
    for plane in ("image", "variance", "mask"):
        x, y = np.asarray(getattr(a, plane)), np.asarray(getattr(b, plane))
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), plane
    assert a.mask_planes == b.mask_planes and a.bbox == b.bbox


# --------------------------------------------------------------------------------------
# out of memory
# --------------------------------------------------------------------------------------


def test_recognises_device_oom_only():
    assert is_out_of_memory(OutOfMemoryError("x"))
    assert is_out_of_memory(CuFFTError("CUFFT_ALLOC_FAILED"))
    assert not is_out_of_memory(CuFFTError("CUFFT_INVALID_SIZE"))  # a real bug: no retry
    assert not is_out_of_memory(MemoryError("host"))  # host memory is not the device's
    assert not is_out_of_memory(InvalidInputError("x"))


def test_subtraction_falls_back_to_cpu_bit_identical(device, caplog):
    """The full-image FFTs (≥ 286² px) do not fit, the 45² px stamps do: the fit starts on
    the device, fails at the convolution, and the whole task is re-run on the CPU."""
    sci, tmpl, cat = _pair()
    cfg = AlardLuptonSubtractConfig(restrict_kernel_edge_sources=False)
    dev = device(limit=3000)
    with pytest.warns(
        GpudiffFallbackWarning, match=r"AlardLuptonSubtractTask.run: out of GPU memory .* NumPy CPU"
    ):
        with caplog.at_level(logging.WARNING, logger="gpudiff.backend.fallback"):
            got = AlardLuptonSubtractTask(cfg, backend=dev).run(tmpl, sci, cat)
    assert dev.fft.failures == 1 and "freeing the memory pool" in caplog.text
    ref = AlardLuptonSubtractTask(cfg, backend="numpy").run(tmpl, sci, cat)
    assert got.difference.backend.name == "numpy"
    _assert_identical(got.difference.masked_image, ref.difference.masked_image)
    _assert_identical(got.matched_template.masked_image, ref.matched_template.masked_image)


def test_no_fallback_when_memory_suffices(device):
    sci, tmpl, cat = _pair()
    cfg = AlardLuptonSubtractConfig(restrict_kernel_edge_sources=False)
    dev = device(limit=10**9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GpudiffFallbackWarning)
        got = AlardLuptonSubtractTask(cfg, backend=dev).run(tmpl, sci, cat)
    assert dev.fft.failures == 0 and got.difference.backend is dev


def test_model_psf_match_retries_in_row_bands(device, caplog):
    """148² px does not fit, a quarter of the rows (52 × 148 px) does: the convolution
    finishes on the device in 4 bands, without a CPU fallback."""
    exp, _ = _cached(psf_size=2.0, x_size=128, y_size=128)
    dev = device(limit=10000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GpudiffFallbackWarning)
        with caplog.at_level(logging.WARNING, logger="gpudiff.backend.fallback"):
            got = (
                ModelPsfMatchTask(backend=dev).run(exp, GaussianPsf(fwhm=7.0)).psf_matched_exposure
            )
    assert dev.fft.failures == 1 and "finished in 4 row bands" in caplog.text
    ref = ModelPsfMatchTask(backend="numpy").run(exp, GaussianPsf(fwhm=7.0)).psf_matched_exposure
    assert got.backend is dev
    np.testing.assert_array_equal(got.mask, ref.mask)
    # Float32 FFTs of other sizes round differently: ~1e-7 of the image's dynamic range
    # per term, a few terms summed; 1e-5 of the peak leaves a margin and is far below
    # any real error (a wrong band offset would be off by whole stars).
    scale = float(np.nanmax(np.abs(ref.image)))
    np.testing.assert_allclose(got.image, ref.image, rtol=0, atol=1e-5 * scale)
    vmax = float(ref.variance[np.isfinite(ref.variance)].max())
    np.testing.assert_allclose(got.variance, ref.variance, rtol=1e-4, atol=1e-5 * vmax)


def test_model_psf_match_falls_back_to_cpu_when_bands_fail(device):
    """Even the most bands possible (6, as a band must be as tall as the 21-px kernel: 41 ×
    148 px) do not fit in 3000 px: the convolution runs on the CPU
    (the fit stays on the device), with a warning; bit-identical to a NumPy run."""
    exp, _ = _cached(psf_size=2.0, x_size=128, y_size=128)
    dev = device(limit=3000)
    with pytest.warns(
        GpudiffFallbackWarning, match=r"ModelPsfMatchTask.apply_kernel: .*banded processing failed"
    ):
        got = ModelPsfMatchTask(backend=dev).run(exp, GaussianPsf(fwhm=7.0)).psf_matched_exposure
    assert dev.fft.failures == 3  # whole image, 4 bands, 16 (→ 6) bands
    ref = ModelPsfMatchTask(backend="numpy").run(exp, GaussianPsf(fwhm=7.0)).psf_matched_exposure
    _assert_identical(got.masked_image, ref.masked_image)


def test_device_memory_error_when_everything_fails():
    dev = Backend(name="cupy", xp=np, fft=scipy.fft, ndimage=scipy.ndimage, linalg=np.linalg)

    def run(be):
        raise OutOfMemoryError("device full") if be.is_gpu else MemoryError("host full")

    with pytest.warns(GpudiffFallbackWarning):
        with pytest.raises(
            DeviceMemoryError,
            match=r"stage X: out of memory on the GPU .*device full.*CPU fallback \(host full\)",
        ):
            with_memory_fallback("stage X", run, dev, banded=lambda be, n: run(be))


def test_other_errors_pass_through_untouched():
    dev = Backend(name="cupy", xp=np, fft=scipy.fft, ndimage=scipy.ndimage, linalg=np.linalg)
    calls = []

    def run(be):
        calls.append(be.name)
        raise InvalidInputError("bad input")

    with pytest.raises(InvalidInputError, match="bad input"):
        with_memory_fallback("stage", run, dev)
    assert calls == ["cupy"]  # not retried anywhere
    cpu_calls = []
    with pytest.raises(OutOfMemoryError):  # on the CPU backend nothing is retried
        with_memory_fallback(
            "stage",
            lambda be: cpu_calls.append(1) or (_ for _ in ()).throw(OutOfMemoryError()),
            get_backend("numpy"),
        )
    assert cpu_calls == [1]


def test_free_device_memory_releases_pools():
    freed = []
    pool = types.SimpleNamespace(free_all_blocks=lambda: freed.append("pool"))
    pinned = types.SimpleNamespace(free_all_blocks=lambda: freed.append("pinned"))
    cache = types.SimpleNamespace(clear=lambda: freed.append("plans"))
    xp = types.SimpleNamespace(
        get_default_memory_pool=lambda: pool,
        get_default_pinned_memory_pool=lambda: pinned,
        fft=types.SimpleNamespace(config=types.SimpleNamespace(get_plan_cache=lambda: cache)),
    )
    free_device_memory(Backend(name="cupy", xp=xp, fft=None, ndimage=None, linalg=None))
    assert freed == ["pool", "pinned", "plans"]
    free_device_memory(get_backend("numpy"))  # a no-op, no error


def test_row_bands_match_one_piece_convolution():
    """process_in_row_bands with the real spatially varying convolution, on NumPy."""
    exp, _ = _cached(psf_size=2.0, x_size=128, y_size=128)
    kernel = ModelPsfMatchTask(backend="numpy").run(exp, GaussianPsf(fwhm=6.0)).psf_matching_kernel
    one = kernel.convolve(exp.masked_image, do_normalize=True)
    h = kernel.shape[0] // 2
    for n in (3, 7):
        banded = process_in_row_bands(
            exp.masked_image, lambda b: kernel.convolve(b, do_normalize=True), n, (h, h)
        )
        np.testing.assert_array_equal(banded.mask, one.mask)
        np.testing.assert_allclose(
            banded.image, one.image, rtol=0, atol=1e-5 * float(np.nanmax(np.abs(one.image)))
        )


# --------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------


def _partial_writer(exc):
    """An HDUList.writeto that writes a few kB, then fails as a full disk or Ctrl-C would."""

    def writeto(self, f, *args, **kwargs):
        f.write(b"SIMPLE  =                    T" + b" " * 4000)
        raise exc

    return writeto


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_fits_write_leaves_no_partial_file(tmp_path, monkeypatch, exc, existing):
    sci, _, _ = _pair()
    out = tmp_path / "diff.fits"
    if existing:
        out.write_bytes(b"the old file")
    monkeypatch.setattr(fits.HDUList, "writeto", _partial_writer(exc))
    expected = FitsWriteError if isinstance(exc, Exception) else KeyboardInterrupt
    with pytest.raises(expected):
        sci.write(out, overwrite=True)
    with pytest.raises(expected):
        write_psf(tmp_path / "psf.fits", GaussianPsf(fwhm=3.0))
    # No temporary litter; the old file, if any, is intact.
    assert sorted(p.name for p in tmp_path.iterdir()) == (["diff.fits"] if existing else [])
    if existing:
        assert out.read_bytes() == b"the old file"


def test_atomic_write_any_format(tmp_path):
    """The helper the CLI and batch layers use for tables and PNGs."""
    t = Table({"x": [1.0, 2.0]})
    atomic_write(tmp_path / "t.ecsv", lambda f: t.write(f, format="ascii.ecsv"), text=True)
    assert Table.read(tmp_path / "t.ecsv")["x"].tolist() == [1.0, 2.0]

    def fail(f):
        f.write(b"half a table")
        raise ValueError("boom")

    with pytest.raises(FitsWriteError, match=r"t\.ecsv: write failed \(ValueError: boom\)"):
        atomic_write(tmp_path / "t.ecsv", fail, overwrite=True, text=False)
    assert [p.name for p in tmp_path.iterdir()] == ["t.ecsv"]
    assert Table.read(tmp_path / "t.ecsv")["x"].tolist() == [1.0, 2.0]


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults_cli")
    sci, tmpl, _ = _pair()
    sci.write(d / "sci.fits")
    tmpl.write(d / "tmpl.fits")
    return d


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_cli_interrupted_write_leaves_nothing(pair_files, tmp_path, monkeypatch, capsys, exc):
    d = pair_files
    monkeypatch.setattr(fits.HDUList, "writeto", _partial_writer(exc))
    argv_sub = [
        "subtract",
        str(d / "sci.fits"),
        str(d / "tmpl.fits"),
        "-o",
        str(tmp_path / "diff.fits"),
        "--no-detect",
    ]
    argv_mpm = [
        "match-psf",
        str(d / "sci.fits"),
        "-o",
        str(tmp_path / "m.fits"),
        "--reference-fwhm",
        "7",
    ]
    for argv in (argv_sub, argv_mpm):
        if isinstance(exc, Exception):
            assert main(argv) == 1
            assert "No space left on device" in capsys.readouterr().err
        else:
            with pytest.raises(KeyboardInterrupt):
                main(argv)
    assert list(tmp_path.iterdir()) == []


def test_cli_interrupted_run_leaves_nothing(pair_files, tmp_path, monkeypatch):
    """Ctrl-C in the middle of the subtraction: no output file at all."""
    d = pair_files

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(AlardLuptonSubtractTask, "_fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(
            [
                "subtract",
                str(d / "sci.fits"),
                str(d / "tmpl.fits"),
                "-o",
                str(tmp_path / "diff.fits"),
            ]
        )
    assert list(tmp_path.iterdir()) == []
    assert read_exposure(d / "sci.fits").shape == (256, 256)  # inputs untouched
    assert not any(p.name.endswith(".tmp") for p in d.iterdir()) and os.path.isdir(d)
