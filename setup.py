"""Builds fusedcnn._C: C++ kernels always, CUDA kernels when nvcc is found.

Environment:
  FUSEDCNN_BUILD_CUDA=0|1   force the CUDA sources off / on (default: on when nvcc
                            and a CUDA build of torch are present; a GPU is NOT needed)
  TORCH_CUDA_ARCH_LIST      GPU targets (default "8.0;9.0": Ampere and Hopper)
  MAX_JOBS                  parallel compile jobs (ninja)
  DEBUG=1                   -O0 -g, and -G for device code
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    """The toolkit root (the folder whose lib64/ holds libcudart).

    On our machines the `nvcc` on PATH is a wrapper script outside the toolkit,
    so torch's guess (the parent of nvcc's folder) is wrong; `nvcc --dryrun`
    prints the real root as TOP=.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.isdir(os.environ[var]):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60)
        m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
        if m:
            return os.path.realpath(m.group(1))
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


cuda_home = find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

flag = os.environ.get("FUSEDCNN_BUILD_CUDA", "").strip()
if flag not in ("", "0", "1"):
    raise SystemExit(f"FUSEDCNN_BUILD_CUDA must be 0 or 1, got {flag!r}")
can_cuda = cuda_home is not None and torch.version.cuda is not None
if flag == "1" and not can_cuda:
    raise SystemExit(
        "FUSEDCNN_BUILD_CUDA=1 but no CUDA toolkit was found "
        f"(CUDA_HOME={cuda_home!r}, torch.version.cuda={torch.version.cuda!r})"
    )
build_cuda = can_cuda if flag == "" else flag == "1"

debug = os.environ.get("DEBUG", "0") == "1"
cxx_flags = ["-O0", "-g"] if debug else ["-O3", "-fopenmp-simd"]
# No -std flag: torch.utils.cpp_extension picks the standard its headers need (C++17 / C++20).
nvcc_flags = ["-O0", "-g", "-G"] if debug else ["-O3", "--use_fast_math", "-lineinfo"]
nvcc_flags += ["--expt-relaxed-constexpr"]

cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/*/*.cu")) if build_cuda else []


def pip_cuda_include_dirs():
    """Headers of the CUDA libraries torch was installed with (nvidia-* wheels).

    ATen's CUDA headers include cusparse.h and cublas_v2.h, which a bare toolkit
    install (like ours: compiler and runtime only) may lack.
    """
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


include_dirs = [os.path.join(ROOT, "csrc")] + (pip_cuda_include_dirs() if build_cuda else [])
define_macros = [("FUSEDCNN_WITH_CUDA", "1")] if build_cuda else []

Extension = CUDAExtension if build_cuda else CppExtension
ext = Extension(
    name="fusedcnn._C",
    sources=cpp_sources + cuda_sources,
    include_dirs=include_dirs,
    define_macros=define_macros,
    extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if build_cuda else {"cxx": cxx_flags},
    py_limited_api=False,
)
print(f"fusedcnn: building _C with {'C++ and CUDA' if build_cuda else 'C++ only'} "
      f"(CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
