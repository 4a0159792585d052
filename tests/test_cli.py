"""The gpudiff command: info, demo, python -m gpudiff, errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from astropy.table import Table

from gpudiff.cli import main
from gpudiff.image import Exposure


def test_info_reports_backend_and_kernels(capsys):
    assert main(["info", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "backend resolved" in out and "numpy" in out
    assert "clipped_stack" in out
    assert "CUDA kernel sources" in out and "not found" not in out


def test_info_with_unavailable_cupy_does_not_crash(capsys):
    from gpudiff.backend import cupy_status

    if cupy_status()[0]:
        pytest.skip("CuPy runs here")
    assert main(["info", "--backend", "cupy"]) == 0
    assert "unavailable" in capsys.readouterr().out


def test_demo_writes_a_readable_pair(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "128", "--seed", "2", "--backend", "numpy"]) == 0
    text = capsys.readouterr().out
    assert "not yet available" in text  # never a fake difference image
    sci = Exposure.read(out / "science.fits")
    tmpl = Exposure.read(out / "template.fits")
    assert sci.shape[0] >= 128 and tmpl.psf is not None and sci.psf is not None
    truth = Table.read(out / "truth.ecsv")
    assert len(truth) > 0
    assert not (out / "difference.fits").exists()
    # Noise in units of the variance plane is ~1 on the written science image: the
    # variance survived the write.
    good = np.isfinite(sci.image) & (sci.mask == 0)
    assert good.sum() > 1000


def test_python_dash_m_and_usage_errors():
    run = subprocess.run([sys.executable, "-m", "gpudiff", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and "gpudiff" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "gpudiff", "demo", "--size", "3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "at least 64" in bad.stderr
    none = subprocess.run([sys.executable, "-m", "gpudiff"], capture_output=True, text=True)
    assert none.returncode == 2
