"""Sphinx configuration of the gpudiff documentation (API reference + guide + algorithms).

Build with ``docs/build.sh`` (warnings are errors).  Needs the ``docs`` extra:
``pip install -e '.[docs]'``.
"""

from __future__ import annotations

import os
import re
import sys

# Document the checkout this file sits in, even without an editable install.
sys.path.insert(0, os.path.abspath(".."))

import gpudiff

project = "gpudiff"
author = "gpudiff developers"
copyright = "gpudiff developers, BSD-3-Clause"
release = gpudiff.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
]

# The guide and the algorithm description are Markdown so that they read the same on
# GitHub; the API pages are reStructuredText.
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "build.sh", "check_refs.py"]

# Stable section anchors in algorithms.md are raw HTML (<a id="s4-2"></a>), which GitHub
# and MyST both render; headings also get MyST slugs for in-page links.
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

# autodoc: only what a module lists in __all__; type hints live in the numpydoc sections,
# the signatures stay short.
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "none"
autodoc_class_signature = "mixed"
# CuPy is optional and never imported by ``import gpudiff``; mock it so that nothing in
# autodoc can pull it in on a machine without CUDA.
autodoc_mock_imports = ["cupy", "cupyx"]

# numpydoc renders the Parameters/Returns sections.  Class members are documented by
# autodoc (members=True) once; numpydoc's own member tables would list them twice.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

html_theme = "alabaster"
html_title = f"gpudiff {release}"
html_static_path: list[str] = []


# --- Docstrings write |x| for an absolute value -------------------------------------------
# reStructuredText reads "|x|" as a substitution reference, so docstrings such as
# "|psf_flux| ≥ fraction" or "mean |filter|²" fail the -W build ("Undefined substitution
# referenced").  Rather than change how the code's docstrings are written, the bars are
# escaped when autodoc reads a docstring -- outside inline literals, roles, literal
# blocks and tables -- so they render as the absolute-value bars they mean.
_LITERAL_SPAN = re.compile(r"(``.*?``|`[^`]*`)")
_BAR = re.compile(r"(?<!\\)\|")  # a bar not already escaped


def _escape_abs_bars(app, what, name, obj, options, lines):
    literal_indent = None  # indentation of the paragraph that opened a literal block
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if literal_indent is not None:
            if stripped and indent <= literal_indent:
                literal_indent = None
            else:
                continue
        # A line opening a block with "|" or "+" is a line block or a table: leave it.
        opens_block = i == 0 or not lines[i - 1].strip()
        if "|" in line and not (opens_block and stripped.startswith(("|", "+"))):
            parts = _LITERAL_SPAN.split(line)
            lines[i] = "".join(p if k % 2 else _BAR.sub(r"\\|", p) for k, p in enumerate(parts))
        if stripped.endswith("::"):
            literal_indent = indent


# --- Section anchors of algorithms.md -------------------------------------------------------
# The Markdown pages carry plain-HTML anchors (<a id="s4-2"></a>) because GitHub renders
# those and not MyST's "(s4-2)=" targets.  For Sphinx the same lines become MyST targets,
# so that links such as [§4.2](../algorithms.md#s4-2) resolve (and are checked by -W).
_HTML_ANCHOR = re.compile(r'^<a id="([A-Za-z][\w-]*)"></a>\s*$', re.MULTILINE)


def _anchors_to_targets(app, docname, source):
    if app.env.doc2path(docname).suffix == ".md":
        source[0] = _HTML_ANCHOR.sub(r"(\1)=", source[0])


def setup(app):
    app.connect("autodoc-process-docstring", _escape_abs_bars)
    app.connect("source-read", _anchors_to_targets)
