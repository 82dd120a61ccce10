#!/usr/bin/env bash
# Sets up .venv with everything fusedcnn needs on a fresh machine (Python 3.11, no GPU needed):
# torch 2.14.1 + torchvision 0.29.1 (pinned: they install from this machine's local disk),
# build tools, and fusedcnn itself (editable) with its C++ extension (+ CUDA kernels when nvcc exists).
# Idempotent: a second run only rebuilds the extension when csrc/ or setup.py changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FUSEDCNN_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "fusedcnn setup: creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  echo "fusedcnn setup: installing torch==2.14.1 torchvision==0.29.1 (a few minutes)"
  pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import torch, torchvision" # fail loudly if that did not work
fi

stamp="$VENV/.fusedcnn-build-stamp"
want=$(cat setup.py pyproject.toml $(find csrc -type f | sort) | sha1sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$VENV/bin/python" -c "import fusedcnn._C" 2>/dev/null; then
  echo "fusedcnn setup: building and installing fusedcnn (C++ extension; CUDA kernels if nvcc is found)"
  pip install -q "setuptools>=64" wheel ninja 2>&1 | grep -v "^WARNING: Location" || true
  MAX_JOBS=${MAX_JOBS:-2} pip install --no-build-isolation -e ".[test,data,bench]" 2>&1 \
    | grep -v -e "^WARNING: Location" -e "^ *warnings.warn" || true
  "$VENV/bin/python" -c "import fusedcnn._C" || { echo "fusedcnn setup: the build failed (see above)"; exit 1; }
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c "import fusedcnn; print('fusedcnn ready; backends on this machine:', fusedcnn.available_backends())"
