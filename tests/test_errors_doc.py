"""README's "Errors and what they mean" agrees with the exception hierarchy.

The section's table is the output of ``python -m gpudiff.errors --markdown``: one row per
name of ``gpudiff.errors.__all__`` with its bases and docstring's first paragraph.
Regenerate it when a class is added or its docstring changes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import gpudiff
import gpudiff.errors as errors

README = Path(__file__).resolve().parents[1] / "README.md"


def _section() -> str:
    text = README.read_text()
    m = re.search(r"^## Errors and what they mean\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert m, "README.md has no '## Errors and what they mean' section followed by another section"
    return m.group(1)


def test_readme_table_is_the_generated_one():
    section = _section()
    table = "\n".join(line for line in section.splitlines() if line.startswith("|")) + "\n"
    assert table == errors.markdown_table(), "regenerate with: python -m gpudiff.errors --markdown"


def test_every_public_class_is_listed_once_with_its_meaning():
    rows = re.findall(r"^\| `(\w+)` \| (.*?) \| (.*) \|$", _section(), flags=re.M)
    assert [r[0] for r in rows] == list(errors.__all__)
    for name, _, meaning in rows:
        cls = getattr(errors, name)
        assert meaning == errors._first_line(cls) and meaning
        assert getattr(gpudiff, name) is cls  # re-exported at the top level
        assert issubclass(cls, (errors.GpudiffError, Warning))


def test_hierarchy_and_builtin_bases():
    for name in errors.__all__:
        cls = getattr(errors, name)
        if issubclass(cls, Warning):
            # pytest turns gpudiff RuntimeWarnings into errors; a fallback is not one.
            assert issubclass(cls, UserWarning) and not issubclass(cls, RuntimeWarning)
            continue
        assert issubclass(cls, errors.GpudiffError)
        if cls is not errors.GpudiffError:  # every error also has a built-in meaning
            assert issubclass(cls, (ValueError, OSError, RuntimeError, MemoryError)), name


def test_command_line_generator():
    out = subprocess.run(
        [sys.executable, "-m", "gpudiff.errors", "--markdown"],
        capture_output=True,
        text=True,
        check=True,
        cwd=README.parent,
    ).stdout
    assert out == errors.markdown_table()
    bad = subprocess.run(
        [sys.executable, "-m", "gpudiff.errors"], capture_output=True, text=True, cwd=README.parent
    )
    assert bad.returncode == 2 and "usage: python -m gpudiff.errors --markdown" in bad.stderr
