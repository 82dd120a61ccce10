"""Builds fusedcnn._C: C++ kernels always, CUDA kernels when nvcc is found.

Environment:
  FUSEDCNN_BUILD_CUDA=0|1   force the CUDA sources off / on (default: on when nvcc
                            and a CUDA build of torch are present; a GPU is NOT needed)
  TORCH_CUDA_ARCH_LIST      GPU targets, used as given (default "8.0;9.0+PTX": SASS for Ampere and
                            Hopper, plus compute_90 PTX that the driver JIT-compiles on newer GPUs
                            instead of failing with "no kernel image is available")
  MAX_JOBS                  parallel compile jobs (ninja)
  DEBUG=1                   -O0 -g, and -G for device code

Importable without building (the build runs only as a script, `__name__ == "__main__"`): tools that
compile csrc/ the way the build does (`fusedcnn compile-check`: nvcc -Xptxas -v per .cu and architecture)
take the flags from here, so they cannot drift from the build:
  find_cuda_home()                       the toolkit root
  cuda_arch_list()                       TORCH_CUDA_ARCH_LIST or DEFAULT_CUDA_ARCH_LIST
  cuda_arch_flags(arch_list)             its -gencode flags (torch's own translation)
  nvcc_flags(debug)                      the extension's extra nvcc flags
  nvcc_command(source, output, ...)      the whole nvcc argv the build runs for one .cu file
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
EXTENSION_NAME = "fusedcnn._C"
# SASS for sm_80 (A100) and sm_90 (H100/H200); "+PTX" also embeds compute_90 PTX, the forward-compatible form
# a newer GPU (Blackwell, ...) JIT-compiles at load time.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


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


def cuda_arch_list(env=None):
    """The architecture list the build compiles for: TORCH_CUDA_ARCH_LIST as the user gave it, else the default."""
    value = (os.environ if env is None else env).get("TORCH_CUDA_ARCH_LIST", "").strip()
    return value or DEFAULT_CUDA_ARCH_LIST


def _fallback_arch_flags(arch_list):
    flags = []
    for arch in arch_list.replace(" ", ";").split(";"):
        if not arch:
            continue
        version = arch.split("+")[0]
        if not re.fullmatch(r"\d+\.\d+a?", version):
            raise ValueError(f"Unknown CUDA arch ({arch})")
        num = version.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return sorted(set(flags))


def _cpp_extension():
    """torch.utils.cpp_extension, imported with CUDA_HOME pointing at the real toolkit (it reads it at import)."""
    if "torch.utils.cpp_extension" not in sys.modules:
        cuda_home = find_cuda_home()
        if cuda_home:
            os.environ.setdefault("CUDA_HOME", cuda_home)
    from torch.utils import cpp_extension
    return cpp_extension


def cuda_arch_flags(arch_list=None):
    """-gencode flags for `arch_list` ("8.0;9.0+PTX"; default cuda_arch_list()), exactly as the build passes
    them: torch.utils.cpp_extension translates TORCH_CUDA_ARCH_LIST (named arches included), so it is asked."""
    arch_list = arch_list or cuda_arch_list()
    try:
        _get_cuda_arch_flags = _cpp_extension()._get_cuda_arch_flags
    except AttributeError:  # a torch without the helper: the same translation for "X.Y[a][+PTX]" entries
        return _fallback_arch_flags(arch_list)
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        return _get_cuda_arch_flags()
    finally:
        if saved is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def debug_build(env=None):
    return (os.environ if env is None else env).get("DEBUG", "0") == "1"


def cxx_flags(debug=None):
    debug = debug_build() if debug is None else debug
    # No -std flag: torch.utils.cpp_extension picks the standard its headers need (C++17 / C++20).
    return ["-O0", "-g"] if debug else ["-O3", "-fopenmp-simd"]


def nvcc_flags(debug=None):
    """The extension's own nvcc flags (extra_compile_args["nvcc"]); torch adds its common ones and the arch flags."""
    debug = debug_build() if debug is None else debug
    flags = ["-O0", "-g", "-G"] if debug else ["-O3", "--use_fast_math", "-lineinfo"]
    return flags + ["--expt-relaxed-constexpr"]


def cpp_sources():
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) +
                  glob.glob(os.path.join(ROOT, "csrc", "*", "*.cpp")))


def cuda_sources():
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*", "*.cu")))


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


def include_dirs(with_cuda):
    return [os.path.join(ROOT, "csrc")] + (pip_cuda_include_dirs() if with_cuda else [])


def define_macros(with_cuda):
    return [("FUSEDCNN_WITH_CUDA", "1")] if with_cuda else []


def nvcc_command(source, output, arch_list=None, extra_flags=(), cuda_home=None, debug=None):
    """The nvcc argv the build runs to compile one .cu file into `output` (an object file), for `arch_list`
    (default: cuda_arch_list(); e.g. "9.0" for sm_90 alone), with `extra_flags` appended (e.g. ["-Xptxas", "-v"]):
    torch.utils.cpp_extension's composition -- defines and includes, its COMMON_NVCC_FLAGS, -fPIC, the
    extension's nvcc_flags(), TORCH_API_INCLUDE_EXTENSION_H / TORCH_EXTENSION_NAME, the -gencode flags and the
    C++ standard (-std=c++20, as torch appends it when no -std is given)."""
    import sysconfig

    cpp_extension = _cpp_extension()
    cuda_home = cuda_home or find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    incs = include_dirs(True) + cpp_extension.include_paths("cpu") + [os.path.join(cuda_home, "include")]
    if sys.exec_prefix != sys.base_exec_prefix:  # build_ext adds a virtual environment's include/ ...
        incs.append(os.path.join(sys.exec_prefix, "include"))
    incs.append(sysconfig.get_paths()["include"])  # ... and Python's headers
    defines = [f"-D{k}={v}" for k, v in define_macros(True)]
    name = EXTENSION_NAME.split(".")[-1]
    flags = (getattr(cpp_extension, "COMMON_NVCC_FLAGS", []) + ["--compiler-options", "-fPIC"] + nvcc_flags(debug) +
             ["-DTORCH_API_INCLUDE_EXTENSION_H", f"-DTORCH_EXTENSION_NAME={name}"] + cuda_arch_flags(arch_list))
    if not any(f.startswith("-std=") for f in flags):
        flags.append("-std=c++20")
    return ([os.path.join(cuda_home, "bin", "nvcc")] + defines + [f"-I{d}" for d in incs] +
            ["-c", os.fspath(source), "-o", os.fspath(output)] + flags + list(extra_flags))


def main():
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    arch_list = cuda_arch_list()
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # read by torch.utils.cpp_extension when it compiles
    if "+PTX" not in arch_list:
        print(f"fusedcnn: note: TORCH_CUDA_ARCH_LIST={arch_list!r} embeds no PTX: GPUs newer than the listed "
              "architectures will fail with 'no kernel image is available' (append +PTX to the newest)",
              file=sys.stderr)

    import torch
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

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

    Extension = CUDAExtension if build_cuda else CppExtension
    ext = Extension(
        name=EXTENSION_NAME,
        sources=cpp_sources() + (cuda_sources() if build_cuda else []),
        include_dirs=include_dirs(build_cuda),
        define_macros=define_macros(build_cuda),
        extra_compile_args={"cxx": cxx_flags(), "nvcc": nvcc_flags()} if build_cuda else {"cxx": cxx_flags()},
        py_limited_api=False,
    )
    print(f"fusedcnn: building _C with {'C++ and CUDA' if build_cuda else 'C++ only'} "
          f"(CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={arch_list})")

    setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})


if __name__ == "__main__":
    main()
