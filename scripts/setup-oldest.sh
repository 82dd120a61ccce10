#!/usr/bin/env bash
# Sets up .venv-oldest: the OLDEST versions fusedcnn supports (pyproject's lower bounds), for
# scripts/test-oldest.sh: torch 2.13.0+cpu, torchvision 0.28.0, Triton 3.6.0, NumPy < 2.4 (Triton 3.6's
# interpreter breaks under NumPy 2.4), plus the [test,data,bench] extras, as scripts/setup.sh does for .venv.
#
# fusedcnn is installed NON-editable, built from a copy of the source tree kept in .venv-oldest/src (C++ only:
# the +cpu torch has no CUDA). .venv's editable install builds python/fusedcnn/_C*.so in the checkout against
# torch 2.14; building here in place would overwrite that library with one linked against torch 2.13. The copy
# keeps its build/ folder, so ninja recompiles only the C++ files that changed.
# Idempotent: a second run reinstalls only when setup.py, pyproject.toml, csrc/, python/ or triton_kernels/
# changed (python-only changes: no recompile).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FUSEDCNN_OLDEST_VENV:-.venv-oldest}
# The oldest tested versions; keep in sync with pyproject.toml's lower bounds and the README's matrix.
PINS=("torch==2.13.0+cpu" "torchvision==0.28.0" "triton==3.6.0" "numpy<2.4")

if [ ! -x "$VENV/bin/python" ]; then
  echo "fusedcnn setup-oldest: creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip() { nice -n 10 "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
printf '%s\n' "${PINS[@]}" > "$VENV/pins.txt"

if ! "$VENV/bin/python" - "${PINS[@]}" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
from packaging.requirements import Requirement
for spec in sys.argv[1:]:
    r = Requirement(spec)
    assert r.specifier.contains(version(r.name), prereleases=True), (spec, version(r.name))
EOF
then
  echo "fusedcnn setup-oldest: installing ${PINS[*]} (a few minutes)"
  pip install -q "${PINS[@]}" packaging "setuptools>=64" wheel ninja 2>&1 | grep -v "^WARNING: Location" || true
fi

# The only torchvision 0.28.0 wheel here is the CUDA build: its C++ ops (_C.so: nms, roi_align, ...; image.so)
# link libtorch_cuda and cannot load with the +cpu torch. torchvision then runs on its Python code alone (models,
# datasets, transforms: all fusedcnn uses), except that 0.28's _meta_registrations.py registers fakes for
# torchvision::nms/qnms without the `_has_ops()` guard its other registrations have, so `import torchvision`
# fails ("operator torchvision::nms does not exist"). Add that guard (idempotent; only in this environment).
"$VENV/bin/python" - <<'EOF'
import pathlib, sysconfig
path = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchvision" / "_meta_registrations.py"
src = path.read_text()
if "fusedcnn setup-oldest" not in src:
    old = '@torch.library.register_fake("torchvision::'
    assert src.count(old) == 2, "torchvision's _meta_registrations.py is not the one this patch expects"
    helper = ('# fusedcnn setup-oldest: without the C++ ops (CUDA wheel, +cpu torch) there is no op to register.\n'
              'def _register_fake_if_ops(name):\n'
              '    return torch.library.register_fake(name) if torchvision.extension._has_ops() else (lambda fn: fn)\n'
              '\n\n')
    i = src.index(old)
    src = src[:i] + helper + src[i:].replace(old, '@_register_fake_if_ops("torchvision::')
    path.write_text(src)
    print("fusedcnn setup-oldest: torchvision's nms/qnms fake registrations guarded by _has_ops()")
EOF
"$VENV/bin/python" -c "import torch, torchvision, triton, numpy" # fail loudly if that did not work

# The files the build reads (tracked, plus new files git does not ignore: others' uncommitted work included).
mapfile -t files < <(git ls-files -co --exclude-standard -- setup.py pyproject.toml README.md LICENSE csrc python \
  triton_kernels | while read -r f; do [ -f "$f" ] && echo "$f"; done)
stamp="$VENV/.fusedcnn-build-stamp"
want=$( (printf '%s\n' "${PINS[@]}" "${files[@]}"; cat "${files[@]}") | sha1sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] \
   || ! (cd "$VENV" && bin/python -c "import fusedcnn._C") 2>/dev/null; then
  echo "fusedcnn setup-oldest: building fusedcnn (C++ only) from a copy of the tree in $VENV/src"
  src="$VENV/src"
  mkdir -p "$src"
  # Fresh copy of the sources (deleted files disappear), keeping build/ for ninja's incremental rebuild;
  # tar keeps the mtimes, so unchanged sources are not recompiled.
  find "$src" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
  tar -cf - "${files[@]}" | tar -xf - -C "$src"
  FUSEDCNN_BUILD_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} pip install --no-build-isolation -c "$VENV/pins.txt" \
    "./$src[test,data,bench]" 2>&1 | grep -v -e "^WARNING: Location" -e "^ *warnings.warn" \
    | tee "$VENV/build.log" | grep -E "^(fusedcnn:|Successfully|ERROR|error)" || true
  # Import from outside the checkout: the installed package, never python/fusedcnn.
  (cd "$VENV" && bin/python -c "import fusedcnn._C") \
    || { echo "fusedcnn setup-oldest: the build failed (see $VENV/build.log)"; exit 1; }
  echo "$want" > "$stamp"
fi
(cd "$VENV" && bin/python -c "
import fusedcnn, numpy, torch, torchvision, triton
print('fusedcnn (oldest) ready:', 'torch', torch.__version__, '/ torchvision', torchvision.__version__,
      '/ triton', triton.__version__, '/ numpy', numpy.__version__, '; backends:', fusedcnn.available_backends())")
