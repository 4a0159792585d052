"""Start-up cost: ``import gpudiff`` and the command line's parser import no heavy module.

Whole-process import time is measured by ``bench``-style runs, not here (a timing test on a
shared machine would be flaky).  What a test can check is *what* gets imported: astropy
(io.fits, table, units: ~0.5–1 s), SciPy's ndimage/fft/spatial (~0.3 s) and CuPy (seconds,
and a CUDA context) must wait until a function that needs them runs.  Measured on the
2-core machine (min CPU seconds of 7 runs, machine loaded): ``import gpudiff`` 1.56 → 0.24 s,
``gpudiff --help`` 1.80 → 0.33 s (NumPy alone: 0.19 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Top-level packages and submodules that ``import gpudiff`` / the parser must not import.
HEAVY = ("astropy", "scipy", "cupy", "cupyx", "importlib.metadata", "gpudiff.image")


def _run(code: str) -> tuple[set[str], set[str]]:
    """(modules named by ``-X importtime``, ``sys.modules`` at the end) of ``code`` run in a
    fresh interpreter from the repository root."""
    env = dict(os.environ)
    env.pop("GPUDIFF_BACKEND", None)
    probe = code + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", probe],
        cwd=str(ROOT),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    timed = {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    timed.discard(
        "package"
    )  # the header line: "import time: self [us] | cumulative | imported package"
    return timed, set(json.loads(proc.stdout.strip().splitlines()[-1]))


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_import_gpudiff_imports_no_heavy_module():
    timed, loaded = _run("import gpudiff")
    assert "gpudiff" in timed and "numpy" in loaded  # the probe itself works
    assert not _heavy(timed), _heavy(timed)
    assert not _heavy(loaded), _heavy(loaded)
    for name in ("astropy.table", "scipy.ndimage", "cupy"):  # the named culprits of issue 16
        assert name not in loaded


def test_lazy_public_names_still_resolve():
    import gpudiff
    import gpudiff.image as image

    for name in gpudiff._LAZY:
        assert getattr(gpudiff, name) is getattr(image, name)
    assert set(gpudiff._LAZY) <= set(gpudiff.__all__) <= set(dir(gpudiff))
    assert isinstance(gpudiff.__version__, str) and gpudiff.__version__


def test_unknown_attribute_is_an_attribute_error():
    import gpudiff

    with pytest.raises(AttributeError, match="no_such_name"):
        gpudiff.no_such_name  # noqa: B018


def test_command_line_parser_imports_no_heavy_module():
    # `gpudiff --help` builds this parser: every subcommand's options, nothing it runs.
    timed, loaded = _run("from gpudiff.cli import build_parser\nbuild_parser()")
    assert "gpudiff.cli" in timed
    assert not _heavy(loaded), _heavy(loaded)
