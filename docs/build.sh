#!/usr/bin/env bash
# Build the documentation with warnings as errors, and check the §-references of the code.
#
#   docs/build.sh [OUTDIR]        (default OUTDIR: docs/_build/html)
#
# Needs the docs extra: pip install -e '.[docs]'.  Exit status is non-zero when a section
# cited by the code is missing from docs/algorithms.md or when Sphinx warns.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/_build/html}"
python "$here/check_refs.py"
# -W: warnings are errors; --keep-going: report all of them, not just the first; -E: a fresh
# environment.  (Add -n to also check cross-references to objects outside the public API.)
python -m sphinx -W --keep-going -E -b html "$here" "$out"
echo "documentation built in $out"
