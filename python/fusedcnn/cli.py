"""The `fusedcnn` console script.

    fusedcnn train [options]      train VGG16 (python -m fusedcnn.train; --help for options)
    fusedcnn bench kernels [...]  benchmarks/kernels.py: layer microbenchmarks against torch
    fusedcnn bench e2e [...]      benchmarks/e2e_mnist.py: end-to-end VGG16 training, every backend
    fusedcnn bench overhead [...] benchmarks/overhead.py: per-call cost on a tiny tensor against torch
    fusedcnn bench step [...]     benchmarks/step_time.py: training-step time of every run, interleaved
    fusedcnn compile-check [...]  compile every Triton kernel (and the CUDA sources) for sm_80 / sm_90 without a
                                  GPU: registers, spills, shared memory (fusedcnn.compile_check; --help)

The benchmarks live in the repository (benchmarks/ next to python/), not in the installed package:
they are found from the editable install's source tree, or from $FUSEDCNN_REPO.
"""
from __future__ import annotations

import importlib.util
import os
import sys

BENCHMARKS = {"kernels": "kernels.py", "e2e": "e2e_mnist.py", "overhead": "overhead.py", "step": "step_time.py"}
USAGE = ("usage: fusedcnn {train,bench,compile-check} ...\n"
         "  fusedcnn train [options]        train VGG16 on MNIST (fusedcnn train --help)\n"
         "  fusedcnn bench kernels [...]    layer microbenchmarks (benchmarks/kernels.py)\n"
         "  fusedcnn bench e2e [...]        end-to-end VGG16 training benchmark (benchmarks/e2e_mnist.py)\n"
         "  fusedcnn bench overhead [...]   per-call cost of each layer on a tiny tensor (benchmarks/overhead.py)\n"
         "  fusedcnn bench step [...]       training-step time of every run, interleaved (benchmarks/step_time.py)\n"
         "  fusedcnn compile-check [...]    compile every kernel for sm_80/sm_90 without a GPU "
         "(fusedcnn compile-check --help)\n")


def benchmarks_dir() -> str:
    """The repository's benchmarks/ folder: $FUSEDCNN_REPO/benchmarks, else <repo>/benchmarks for the
    editable install (this file is <repo>/python/fusedcnn/cli.py)."""
    repo = os.environ.get("FUSEDCNN_REPO") or os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    return os.path.join(repo, "benchmarks")


def _run_benchmark(which: str, argv: list[str]) -> int:
    folder = benchmarks_dir()
    path = os.path.join(folder, BENCHMARKS[which])
    if not os.path.isfile(path):
        sys.stderr.write(
            f"fusedcnn bench {which}: {path} not found. The benchmarks ship with the source repository, not the "
            f"installed package: install from a git checkout (pip install --no-build-isolation -e .) or set "
            f"FUSEDCNN_REPO to the checkout's root.\n")
        return 2
    if folder not in sys.path:
        sys.path.insert(0, folder)  # the scripts import their siblings (e.g. cases/)
    spec = importlib.util.spec_from_file_location(f"fusedcnn_bench_{which}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "main"):
        sys.stderr.write(f"fusedcnn bench {which}: {path} has no main(argv)\n")
        return 2
    return module.main(argv) or 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from fusedcnn.train import main as train_main
        return train_main(rest, prog="fusedcnn train")
    if command == "bench":
        if not rest or rest[0] not in BENCHMARKS:
            sys.stderr.write(f"fusedcnn bench: expected one of {', '.join(BENCHMARKS)}, got "
                             f"{rest[0] if rest else 'nothing'!r}\n" + USAGE)
            return 2
        return _run_benchmark(rest[0], rest[1:])
    if command == "compile-check":
        # A fresh interpreter: the check compiles for real GPUs, which TRITON_INTERPRET=1 (read when triton is
        # imported) would forbid in this one.
        import subprocess
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "fusedcnn.compile_check", *rest], env=env).returncode
    sys.stderr.write(f"fusedcnn: unknown command {command!r}\n" + USAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main())
