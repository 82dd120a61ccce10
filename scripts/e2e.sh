#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: the end-to-end VGG16/MNIST speed-and-accuracy
# comparison of every available backend against torch. Preset "cpu" (default without a GPU)
# finishes in minutes on a 2-core machine; "gpu" is the full 224x224 run. Extra arguments go to
# benchmarks/e2e_mnist.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
preset=$(.venv/bin/python -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")
exec .venv/bin/python benchmarks/e2e_mnist.py --preset "$preset" "$@"
