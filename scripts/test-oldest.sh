#!/usr/bin/env bash
# Set up .venv-oldest (scripts/setup-oldest.sh: the oldest supported torch / torchvision / Triton / NumPy) and
# run the test suite there. Extra arguments go to pytest (e.g. -m "not slow", -x, a test file).
#
# The tests import the fusedcnn INSTALLED in .venv-oldest (site-packages, built against torch 2.13), never the
# checkout's python/fusedcnn (that one's _C is .venv's, built against torch 2.14): python/ is not on sys.path
# (the editable finder lives only in .venv), which the check below makes sure of.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FUSEDCNN_OLDEST_VENV:-.venv-oldest}
bash scripts/setup-oldest.sh
"$VENV/bin/python" - "$VENV" <<'EOF'
import os, sys
import fusedcnn, fusedcnn._C
venv = os.path.realpath(sys.argv[1])
for mod in (fusedcnn, fusedcnn._C):
    assert os.path.realpath(mod.__file__).startswith(venv + os.sep), f"{mod.__name__} imported from {mod.__file__}"
EOF
# Deselected here, not a version matter: the test's last line checks that an EDITABLE install finds the
# checkout's benchmarks/ (cli.benchmarks_dir()); this environment installs fusedcnn non-editable (see above).
exec "$VENV/bin/python" -m pytest tests -p no:cacheprovider \
  --deselect tests/test_train.py::test_cli_bench_finds_the_repository_benchmarks "$@"
