"""Sphinx configuration of the gpudiff documentation (API reference + guide + algorithms).

Build with ``docs/build.sh`` (warnings are errors).  Needs the ``docs`` extra:
``pip install -e '.[docs]'``.
"""

from __future__ import annotations

import os
import sys

# Document the checkout this file sits in, even without an editable install.
sys.path.insert(0, os.path.abspath(".."))

import gpudiff  # noqa: E402

project = "gpudiff"
author = "gpudiff developers"
copyright = "gpudiff developers, BSD-3-Clause"  # noqa: A001
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
