#!/usr/bin/env python3
"""Check that every section the code cites exists in docs/algorithms.md.

Source comments, docstrings and tests cite the algorithm description by section number:
``spec §4.2 step 9.2`` (the older form), ``docs/algorithms.md §4.2`` (the current one), and
bare ``§5.3`` or ranges ``§7.9–§7.10`` inside such sentences.  Every ``§N[.M...]`` found in
the scanned trees is checked against the sections of ``docs/algorithms.md``, which are the
``<a id="sN-M"></a>`` anchors placed before its numbered headings.  The anchors and the
heading numbers are also checked against each other, so a renumbered heading cannot leave a
stale anchor behind.  A reference with steps (``§4.2 step 9.2``, ``§4.2 steps 2, 4 and 11``)
must also name steps that exist: numbered list items of that section (``9.`` at the margin,
``2.`` indented under it).

Usage::

    python docs/check_refs.py            # scan gpudiff/ tests/ bench/ docs/ README.md
    python docs/check_refs.py PATH ...   # scan these files or folders instead
    python docs/check_refs.py --list     # also print the sections and the citation counts

Exit status: 0 when every cited section exists, 1 otherwise (each missing reference is
printed as ``file:line: §X.Y``), 2 when docs/algorithms.md itself is inconsistent.
Only the standard library is used, so CI can run it before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALGORITHMS = ROOT / "docs" / "algorithms.md"
DEFAULT_PATHS = ("gpudiff", "tests", "bench", "docs", "README.md")
SUFFIXES = {".py", ".md", ".rst", ".txt", ".toml", ".cu", ".cuh", ".sh", ".cfg", ".ini"}

#: A section reference: "§" then dot-separated numbers ("§4", "§4.2", "§10.5").  A trailing
#: sentence dot is not part of it ("§9.1)." → 9.1).
SECTION_REF = re.compile(r"§\s?(\d+(?:\.\d+)*)")
#: An explicit citation of the algorithm description, for the counts of --list.
EXPLICIT_REF = re.compile(r"(?:\bspec|docs/algorithms\.md)\s+§\s?\d", re.IGNORECASE)
ANCHOR = re.compile(r'<a id="s(\d+(?:-\d+)*)"></a>')
#: Steps named right after a section reference: "step 9.2", "steps 2, 4 and 11", "step 7–8".
STEPS = re.compile(r"\s*,?\s+steps?\s+(\d+(?:\.\d+)?(?:\s*(?:,|and|–|-)\s*\d+(?:\.\d+)?)*)")
LIST_ITEM = re.compile(r"^( *)(\d+)\.\s")
HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s")


def defined_sections(path: Path = ALGORITHMS) -> tuple[set[str], list[str], dict[str, set[str]]]:
    """The section numbers of ``path``, a list of inconsistencies (anchor vs heading), and
    the numbered steps of each section ("9", "9.2", ...).

    Each anchor must be followed, after blank lines only, by a heading with the same
    number; each numbered heading must have its anchor.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    sections: set[str] = set()
    steps: dict[str, set[str]] = {}
    problems: list[str] = []
    pending: tuple[str, int] | None = None
    current, top, fence = None, None, False
    for no, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            fence = not fence
        item = None if fence else LIST_ITEM.match(line)
        if item and current is not None:
            if not item.group(1):
                top = item.group(2)
                steps[current].add(top)
            elif top is not None:
                steps[current].add(f"{top}.{item.group(2)}")
        m = ANCHOR.search(line)
        if m:
            if pending:
                problems.append(f"{path.name}:{pending[1]}: anchor s{pending[0]} has no heading")
            pending = (m.group(1).replace("-", "."), no)
            continue
        h = HEADING.match(line)
        if h:
            num = h.group(1)
            if pending is None:
                problems.append(f"{path.name}:{no}: heading §{num} has no <a id> anchor")
            elif pending[0] != num:
                problems.append(f"{path.name}:{no}: heading §{num} follows anchor s{pending[0]}")
            else:
                sections.add(num)
            current, top = num, None
            steps.setdefault(num, set())
            pending = None
        elif line.strip() and pending is not None:
            problems.append(
                f"{path.name}:{pending[1]}: anchor s{pending[0]} not followed by a heading"
            )
            pending = None
    if pending:
        problems.append(f"{path.name}:{pending[1]}: anchor s{pending[0]} at the end of the file")
    return sections, problems, steps


def _section_key(sec: str) -> tuple[int, ...]:
    return tuple(int(x) for x in sec.split("."))


def iter_files(paths: list[Path]):
    """Text files under ``paths`` with a suffix in SUFFIXES (caches and venvs skipped)."""
    for p in paths:
        if p.is_file():
            yield p
        elif p.is_dir():
            for f in sorted(p.rglob("*")):
                skip = any(
                    part.startswith(".") or part in ("__pycache__", "_build") for part in f.parts
                )
                if f.is_file() and f.suffix in SUFFIXES and not skip:
                    yield f


def find_references(files) -> list[tuple[Path, int, str, bool, tuple[str, ...]]]:
    """(file, line, section, explicit, steps) for every "§N[.M...]" in ``files``."""
    refs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for no, line in enumerate(text.splitlines(), 1):
            explicit = bool(EXPLICIT_REF.search(line))
            for m in SECTION_REF.finditer(line):
                st = STEPS.match(line, m.end())
                named = tuple(re.findall(r"\d+(?:\.\d+)?", st.group(1))) if st else ()
                refs.append((f, no, m.group(1), explicit, named))
    return refs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "paths",
        nargs="*",
        help="files or folders to scan (default: %(default)s)",
        default=list(DEFAULT_PATHS),
    )
    ap.add_argument("--list", action="store_true", help="print the sections and citation counts")
    args = ap.parse_args(argv)

    sections, problems, steps = defined_sections()
    if problems:
        print("docs/algorithms.md is inconsistent:", *problems, sep="\n  ", file=sys.stderr)
        return 2
    paths = [Path(p) if Path(p).is_absolute() else ROOT / p for p in args.paths]
    refs = find_references(iter_files(paths))
    missing = []
    for f, no, sec, _, named in refs:
        if sec not in sections:
            missing.append((f, no, f"§{sec}"))
        for step in named:
            if step not in steps.get(sec, ()):
                missing.append((f, no, f"§{sec} step {step}"))
    if args.list:
        counts = Counter(r[2] for r in refs)
        print(f"{len(sections)} sections in docs/algorithms.md:")
        for sec in sorted(sections | set(counts), key=_section_key):
            state = "" if sec in sections else "   MISSING"
            anchor = "#s" + sec.replace(".", "-")
            print(f"  §{sec:<6} {anchor:<10} cited {counts.get(sec, 0):>3}×{state}")
        n_explicit = sum(1 for r in refs if r[3])
        print(f"{len(refs)} references ({n_explicit} on lines that name spec/docs/algorithms.md)")
    if missing:
        print(
            f"{len(missing)} reference(s) to sections or steps missing from docs/algorithms.md:",
            file=sys.stderr,
        )
        for f, no, what in missing:
            rel = f.relative_to(ROOT) if f.is_relative_to(ROOT) else f
            print(f"  {rel}:{no}: {what}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
