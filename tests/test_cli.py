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
    assert (
        main(["demo", "--out", str(out), "--size", "256", "--seed", "2", "--backend", "numpy"]) == 0
    )
    text = capsys.readouterr().out
    assert "AlardLuptonSubtractTask" in text and "DIA sources" in text
    sci = Exposure.read(out / "science.fits")
    tmpl = Exposure.read(out / "template.fits")
    assert sci.shape[0] >= 128 and tmpl.psf is not None and sci.psf is not None
    assert len(Table.read(out / "dia_sources.ecsv")) >= 1
    truth = Table.read(out / "truth.ecsv")
    assert len(truth) > 0
    diff = Exposure.read(out / "difference.fits")
    assert diff.shape == sci.shape and diff.psf is not None
    # The written difference is noise in units of its own variance plane.
    good = np.isfinite(diff.image) & (diff.mask == 0)
    z = diff.image[good] / np.sqrt(diff.variance[good])
    # Robust σ (1.4826·MAD): the injected transients are real signal in the difference.
    robust = 1.4826 * np.median(np.abs(z - np.median(z)))
    assert good.sum() > 30000 and abs(robust - 1) < 0.1


def test_python_dash_m_and_usage_errors():
    run = subprocess.run(
        [sys.executable, "-m", "gpudiff", "--version"], capture_output=True, text=True
    )
    assert run.returncode == 0 and "gpudiff" in run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "gpudiff", "demo", "--size", "3"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "at least 256" in bad.stderr
    none = subprocess.run([sys.executable, "-m", "gpudiff"], capture_output=True, text=True)
    assert none.returncode == 2


def test_batch_without_distributed_says_how_to_install(tmp_path, monkeypatch, capsys):
    """Without the distributed extra: one line naming the pip command, exit status 1, no
    ModuleNotFoundError traceback (issue 15 item 4)."""
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` now fails
    manifest = tmp_path / "m.csv"
    manifest.write_text("science,template,output\na.fits,b.fits,d.fits\n")
    rc = main(["batch", str(manifest), "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "pip install 'gpudiff[distributed]'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_every_image_command_takes_the_input_options():
    """subtract, match-psf, coadd and match-backgrounds all parse the input-file options."""
    from gpudiff.cli import build_parser

    p = build_parser()
    a = p.parse_args(
        [
            "subtract",
            "s",
            "t",
            "-o",
            "d",
            "--science-psf",
            "p",
            "--template-noise",
            "n",
            "--science-fwhm",
            "3",
        ]
    )
    assert (a.science_psf, a.template_noise, a.science_fwhm, a.mode) == ("p", "n", 3.0, None)
    a = p.parse_args(
        [
            "match-psf",
            "e",
            "-o",
            "o",
            "--reference-fwhm",
            "5",
            "--psf",
            "p",
            "--ivar",
            "w",
            "--mask",
            "m",
            "--mask-bits",
            "BAD=0",
            "--fwhm",
            "4",
        ]
    )
    assert (a.psf, a.ivar, a.mask, a.mask_bits, a.fwhm) == ("p", "w", "m", "BAD=0", 4.0)
    a = p.parse_args(["coadd", "w1", "w2", "-o", "c", "--psf", "p1", "p2", "--fwhm", "4"])
    assert a.psf == ["p1", "p2"] and a.fwhm == [4.0] and a.warps == ["w1", "w2"]
    a = p.parse_args(["match-backgrounds", "w1", "w2", "--out-dir", "o", "--variance", "v"])
    assert a.variance == ["v"] and not hasattr(a, "psf")
