"""`fusedcnn compile-check`: compile every Triton kernel of fusedcnn.triton_kernels (and the CUDA extension's
sources) for sm_80 / sm_90 without a GPU, and report registers, spills and shared memory per compile.

    fusedcnn compile-check --arch sm_80,sm_90 [--json FILE] [--markdown FILE] [--full] [--no-cuda] [--jobs N]
                           [--kernels SUBSTR,...] [--layers 1,2,...] [--dtypes fp32,...] [--smem-limit BYTES]

How the Triton half finds what to compile: it calls the real launchers (conv2d, conv2d_backward, conv_bn_relu,
its backward, bn_relu_*, linear_relu_dropout, batch_norm_*, max_pool2d, relu, dropout, ...) on meta tensors of
VGG16's shapes at batch 32 (224x224, 3 input channels; classifier 25088 -> 4096 -> 4096), for float32, float16
and bfloat16, NCHW and NHWC, and records each kernel launch instead of running it. An autotuned launch is
expanded into the configurations its own pruning keeps on the target GPU (the device's shared-memory limit is
replaced by the architecture's). Each recorded launch is specialised by Triton's own JIT binder for a
GPUTarget("cuda", 80|90, 32) (the int and pointer specialisations a launch on that GPU gets), identical
specialisations are compiled once, and `triton.compile` produces the cubin: registers and local memory per
thread from `cuobjdump -res-usage` (its STACK: the stack frame, where ptxas puts spilled registers -- Triton
kernels hold no local arrays; when it is not 0, ptxas -v with Triton's flags is run on the PTX for the spill
stores in bytes, reported as spill_bytes), shared memory from the compiler's metadata.

CI subset (default) vs --full:
  default  every kernel the launchers use, for every dtype and layout, on three representative VGG16 layers
           (conv1, C_in = 3 at 224x224: the "flat" K loop; conv2, 64 -> 64 at 224x224 and its 2x2 max pool; conv5,
           128 -> 256 at 56x56: the tiled loop) and the 25088 -> 4096 classifier, with torch's default TF32 flags;
           per kernel, variant (constexpr flags), dtype and layout one specialisation, and per autotuned launch one
           configuration: the largest tile its pruning keeps (the worst case for registers and shared memory);
  --full   every VGG16 layer, every configuration the pruning keeps, fp32 with TF32 on and off.
--layers / --dtypes / --kernels narrow either (e.g. --full --layers 1 --kernels _conv_fwd_kernel).
The CUDA half compiles each csrc/*/*.cu as setup.py does (same -gencode, -O3 and include directories) with
`-Xptxas -v` into a temporary folder and parses ptxas' "Used N registers, M bytes smem, K bytes spill stores"
per kernel (results cached in ~/.cache/fusedcnn/compile-check by a hash of the sources and the command).

Exit status 1 on any compile failure, any spill, or shared memory over the architecture's per-block limit
(sm_80 166,912 B; sm_90 232,448 B; --smem-limit overrides both, for tests); 2 on a usage error.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field


LIMITS = {"sm_80": 166_912, "sm_90": 232_448}   # shared memory per block (opt-in maximum): A100, H100
ARCHES = tuple(LIMITS)
BATCH = 32
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
SUBSET_CONVS = (1, 2, 5)       # _conv_layers() numbers: C_in = 3 (flat K loop), 64 -> 64 + pool, 128 -> 256
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------------------------------
# What to compile: launches recorded from the launchers
# ----------------------------------------------------------------------------------------------------
@dataclass
class Launch:
    """One recorded kernel launch: the kernel, its specialisation for one architecture, and where it came from."""
    module: str
    kernel: str
    arch: str
    dtype: str
    layout: str
    config: str
    variant: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    shapes: list = field(default_factory=list)

    def key(self):
        return (self.module, self.kernel, self.arch, repr(sorted(self.signature.items())),
                repr(sorted(self.constexprs.items())), repr(sorted(self.attrs.items())),
                self.options.get("num_warps"), self.options.get("num_stages"))


def _jit_function(fn):
    from triton.runtime.jit import JITFunction
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def _tile_volume(cfg) -> int:
    kw = cfg.kwargs
    return kw.get("BLOCK_M", 1) * kw.get("BLOCK_N", 1) * kw.get("BLOCK_K", 1) * max(cfg.num_stages or 1, 1)


def _describe(fn, constexprs: dict, options) -> tuple[str, str]:
    """(config, variant) labels of a specialisation: the tile sizes, warps and stages; the other constexprs."""
    names = fn.arg_names
    tiles, flags = [], []
    for path, value in sorted(constexprs.items()):
        name = names[path[0]]
        value = getattr(value, "value", value)
        if name.startswith("BLOCK_") or name == "GROUP_M":
            tiles.append(f"{name[6:] if name.startswith('BLOCK_') else name}={value}")
        elif isinstance(value, bool):
            if value:
                flags.append(name)
        elif name in ("MODE", "PREC", "TAPS_H", "TAPS_W", "NC_H", "NC_W"):
            flags.append(f"{name}={value}")
    tiles.append(f"w{options.num_warps}")
    tiles.append(f"s{options.num_stages}")
    return " ".join(tiles), " ".join(flags) or "-"


class _Recorder:
    """While active: JITFunction.run records the launch (nothing runs), Autotuner.run expands a launch into the
    configurations its pruning keeps (all, or the largest), the conv prune sees the architecture's shared-memory
    limit, and the launchers accept meta tensors."""

    def __init__(self, arch: str, full: bool, smem_limit: int | None = None):
        self.arch, self.cc, self.full = arch, int(arch[3:]), full
        self.limit = smem_limit if smem_limit is not None else LIMITS[arch]
        self.launches: dict = {}
        self.representatives: dict = {}
        self.context = ("", "", "")

    @contextlib.contextmanager
    def active(self):
        from triton.compiler import make_backend
        from triton.backends.compiler import GPUTarget
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction
        from fusedcnn.triton_kernels import _common, conv
        self.target = GPUTarget("cuda", self.cc, 32)
        self.backend = make_backend(self.target)
        self.binders = {}
        saved = (JITFunction.run, Autotuner.run, conv._smem_limit, _common.TRACE_META)
        recorder = self

        def jit_run(fn, *args, grid, warmup, **kwargs):
            recorder.record(fn, args, kwargs)

        def autotune_run(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            pruned = tuner.prune_configs(kwargs)
            chosen = pruned if recorder.full else [max(pruned, key=_tile_volume)]
            for cfg in chosen:
                tuner.fn.run(*args, **kwargs, **cfg.all_kwargs())
            tuner.best_config = chosen[0]
            tuner.nargs = None

        JITFunction.run, Autotuner.run = jit_run, autotune_run
        conv._smem_limit = lambda device: (self.limit, self.cc // 10)
        _common.TRACE_META = True
        try:
            yield self
        finally:
            JITFunction.run, Autotuner.run, conv._smem_limit, _common.TRACE_META = saved

    def record(self, fn, args, kwargs):
        from triton import knobs
        from triton.runtime.jit import create_function_from_signature
        if fn not in self.binders:
            self.binders[fn] = create_function_from_signature(fn.signature, fn.params, self.backend)
        kwargs = dict(kwargs, debug=kwargs.get("debug", fn.debug) or knobs.runtime.debug,
                      instrumentation_mode=knobs.compilation.instrumentation_mode)
        bound, specialization, options = self.binders[fn](*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization, options)
        constexprs = {k: (v.value if hasattr(v, "value") and not isinstance(v, (int, float, str)) else v)
                      for k, v in constexprs.items()}
        config, variant = _describe(fn, constexprs, options)
        dtype, layout, shape = self.context
        launch = Launch(fn.fn.__module__, fn.fn.__name__, self.arch, dtype, layout, config, variant, signature,
                        constexprs, attrs, dict(options.__dict__))
        if not self.full:   # the CI subset: one specialisation per kernel, variant, dtype and layout
            first = self.representatives.setdefault((launch.kernel, launch.variant, dtype, layout), launch.key())
            if first != launch.key():
                return
        launch = self.launches.setdefault(launch.key(), launch)
        if layout not in launch.layout.split(","):   # the same specialisation serves both layouts
            launch.layout += "," + layout
        if shape not in launch.shapes:
            launch.shapes.append(shape)


def trace(launch, arch: str = "sm_90") -> list[Launch]:
    """The distinct specialisations launch() (a callable running launchers on meta tensors) compiles for arch:
    e.g. one entry for two dropout calls that differ only in the seed."""
    rec = _Recorder(arch, True)
    with rec.active():
        launch()
    return list(rec.launches.values())


def _conv_layers():
    """(C_in, C_out, H) of VGG16's thirteen 3x3 convs at 224x224 with 3 input channels, and whether a 2x2 max
    pool follows."""
    layers, c, h = [], 3, 224
    for i, v in enumerate(VGG16):
        if v == "M":
            continue
        pool = i + 1 < len(VGG16) and VGG16[i + 1] == "M"
        layers.append((c, v, h, pool))
        c = v
        if pool:
            h //= 2
    return layers


def _drive_conv(rec: _Recorder, dtype, fmt, c_in, c_out, h, pool, first: bool, im2col: bool):
    """The launches of one Conv2d (+BatchNorm+ReLU, +pool) layer: unfused and fused, forward and backward."""
    import torch
    from fusedcnn.triton_kernels import activation, batchnorm, conv, fused, pooling
    meta = dict(device="meta")
    x = torch.empty(BATCH, c_in, h, h, dtype=dtype, **meta).contiguous(memory_format=fmt)
    w = torch.empty(c_out, c_in, 3, 3, dtype=dtype, **meta)
    b = torch.empty(c_out, dtype=dtype, **meta)
    vec = lambda n: torch.empty(n, dtype=torch.float32, **meta)   # noqa: E731
    one = [1, 1]
    for algo in ("implicit_gemm", "im2col") if im2col else ("implicit_gemm",):
        y = conv.conv2d(x, w, b, one, one, one, 1, algo)
        conv.conv2d_backward(y, x, w, one, one, one, 1, [True, True, True], algo)
    # BatchNorm2d + ReLU unfused, and ReLU / max pool alone
    mean, var = batchnorm.batch_norm_stats(y)
    a = batchnorm.batch_norm_apply(y, mean, var, vec(c_out), vec(c_out), True)
    batchnorm.batch_norm_backward_reduce(a, y, mean, var, vec(c_out), vec(c_out), True)
    batchnorm.batch_norm_backward_elemt(a, y, mean, var, vec(c_out), vec(c_out), vec(c_out), vec(c_out), 8.0, True)
    activation.relu_backward(a, activation.relu(y))
    # Fused: Conv -> BN statistics (-> the next conv's prologue), BN+ReLU(+pool) in one pass
    s, t = (None, None) if first else (vec(c_in), vec(c_in))
    y, mean, var = conv.conv_bn_relu(x, w, None, s, t, one, one, one, 1, True)
    conv.conv_bn_relu_backward(y, y, vec(c_out), vec(c_out), mean, x, w, s, t, one, one, one, 1, False, not first)
    if pool:
        pooled, _ = pooling.max_pool2d(y, [2, 2], [2, 2], [0, 0], [1, 1], False, False)
        pooling.max_pool2d_backward(pooled, y, [2, 2], [2, 2], [0, 0], [1, 1], False)
        out = fused.bn_relu_maxpool2d(y, vec(c_out), vec(c_out))
        fused.bn_relu_maxpool2d_backward(out, y, vec(c_out), vec(c_out))
    else:
        out = fused.bn_relu_apply(y, vec(c_out), vec(c_out))
        fused.bn_relu_apply_backward(out, y, vec(c_out), vec(c_out))


def _drive_head(rec: _Recorder, dtype, fmt, layers):
    """The classifier's launches: Linear+ReLU+Dropout fused and unfused (ReLU, dropout), the global pools of the
    "avgpool" / "maxpool" heads."""
    import torch
    from fusedcnn.triton_kernels import activation, dropout, fused, pooling
    meta = dict(device="meta")
    feat = torch.empty(BATCH, 512, 7, 7, dtype=dtype, **meta).contiguous(memory_format=fmt)
    pooling.adaptive_avg_pool2d_backward(pooling.adaptive_avg_pool2d(feat, [1, 1]), feat.shape)
    out, idx = pooling.adaptive_max_pool2d(feat, [1, 1])
    pooling.adaptive_max_pool2d_backward(out, idx, feat.shape)
    dropout.dropout(feat, 0.5, 12345)
    for k, n in layers:
        rec.context = (rec.context[0], "-", f"linear {k}->{n}")
        x = torch.empty(BATCH, k, dtype=dtype, **meta)
        w = torch.empty(n, k, dtype=dtype, **meta)
        y = fused.linear_relu_dropout(x, w, torch.empty(n, dtype=dtype, **meta), 0.5, 2**63 + 12345)
        fused.linear_relu_dropout_backward(y, y, x, w, 0.5, True)
        activation.relu(y)
        dropout.dropout(y, 0.5, -7)


def _tf32_settings(dtype, full: bool):
    """fp32 in the full matrix: TF32 on (cuDNN's and matmul's flags True) and off; else torch's defaults."""
    import torch
    return ((True, False) if full and dtype == torch.float32 else (None,))


@contextlib.contextmanager
def _tf32(on):
    import torch
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if on is not None:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def record(arch: str, full: bool, smem_limit: int | None = None, layers=None, dtypes=None) -> list[Launch]:
    """Every launch of the VGG16 matrix (or the CI subset) for one architecture, specialised, deduplicated;
    layers: conv layer numbers (1..13) instead of all / the subset's; dtypes: names ("fp32", ...) to keep."""
    import torch
    rec = _Recorder(arch, full, smem_limit)
    convs = _conv_layers()
    picks = layers or (range(1, len(convs) + 1) if full else SUBSET_CONVS)
    heads = [(25088, 4096), (4096, 4096)] if full else [(25088, 4096)]
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    layouts = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
    with rec.active():
        for dtype, dname in names.items():
            if dtypes and dname not in dtypes:
                continue
            for tf32, (lname, fmt) in ((t, lf) for t in _tf32_settings(dtype, full) for lf in layouts.items()):
                with _tf32(tf32):
                    for i in picks:
                        c_in, c_out, h, pool = convs[i - 1]
                        rec.context = (dname, lname, f"conv{i} {c_in}->{c_out} {h}x{h}")
                        _drive_conv(rec, dtype, fmt, c_in, c_out, h, pool, i == 1, im2col=full or i == picks[0])
                    rec.context = (dname, lname, "head 512x7x7")
                    _drive_head(rec, dtype, fmt, heads if lname == "NHWC" else [])
    return list(rec.launches.values())


# ----------------------------------------------------------------------------------------------------
# Compiling (worker processes)
# ----------------------------------------------------------------------------------------------------
def _cuobjdump() -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    return os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump")


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack frame bytes) per thread of a cubin, from cuobjdump -res-usage. Register spills live in
    the stack frame (cuobjdump's STACK; its LOCAL stays 0 for them)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], check=True, capture_output=True,
                              text=True).stdout
    return int(re.search(r"REG:(\d+)", text).group(1)), int(re.search(r"STACK:(\d+)", text).group(1))


def _ptxas_spills(ptx: str, cc: int, options: dict) -> int:
    """Spill-store bytes ptxas -v reports for Triton's PTX, with the flags Triton's own ptxas call uses."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory(prefix="fusedcnn-ptx-") as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        fmad = [] if options.get("enable_fp_fusion", True) else ["--fmad=false"]
        cmd = [get_ptxas(cc).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(cc)}", src, "-o", os.path.join(tmp, "k.cubin")]
        out = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"(\d+) bytes spill stores", out.stdout + out.stderr)
    return int(m.group(1)) if m else -1


def _compile(launch: Launch) -> dict:
    """Compile one specialisation -> its row."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    row = dict(kind="triton", kernel=launch.kernel, arch=launch.arch, config=launch.config, dtype=launch.dtype,
               layout=launch.layout, variant=launch.variant, shapes=launch.shapes, ok=False, regs=None,
               spill_bytes=None, smem_bytes=None)
    try:
        fn = _jit_function(getattr(importlib.import_module(launch.module), launch.kernel))
        src = triton.compiler.ASTSource(fn=fn, signature=launch.signature, constexprs=launch.constexprs,
                                        attrs=launch.attrs)
        k = triton.compile(src, target=GPUTarget("cuda", int(launch.arch[3:]), 32), options=launch.options)
        regs, stack = _resource_usage(k.asm["cubin"])
        # A stack frame holds spills (Triton kernels have no local arrays): ptxas -v then gives their bytes.
        spills = _ptxas_spills(k.asm["ptx"], int(launch.arch[3:]), launch.options) if stack else 0
        row.update(ok=True, regs=regs, spill_bytes=spills if spills >= 0 else stack, stack_bytes=stack,
                   smem_bytes=int(k.metadata.shared))
    except Exception as e:   # noqa: BLE001 -- a failed compile is a row, not a crash
        msg = str(e).strip().splitlines()
        row["error"] = f"{type(e).__name__}: {msg[0][:300] if msg else ''}"
    return row


# ----------------------------------------------------------------------------------------------------
# The CUDA extension: nvcc -Xptxas -v as setup.py builds it
# ----------------------------------------------------------------------------------------------------
def build_script():
    """The checkout's setup.py, imported by path (it builds nothing on import): the nvcc command, toolkit root and
    -gencode flags come from the build itself, so this check cannot drift from it. None outside a checkout (an
    installed fusedcnn has no csrc/ to compile either)."""
    import importlib.util
    path = os.path.join(ROOT, "setup.py")
    if not os.path.exists(path) or not os.path.isdir(os.path.join(ROOT, "csrc")):
        return None
    spec = importlib.util.spec_from_file_location("_fusedcnn_setup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nvcc_command(source: str, obj: str, cuda_home: str, arches) -> list[str]:
    """setup.py's nvcc command for one source and these architectures (SASS only: "sm_90" -> "9.0"), with
    -Xptxas -v."""
    arch_list = ";".join(f"{a[3:-1]}.{a[-1]}" for a in arches)
    return build_script().nvcc_command(source, obj, arch_list=arch_list, extra_flags=["-Xptxas", "-v"],
                                       cuda_home=cuda_home)


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")


def parse_ptxas(log: str, source: str) -> list[dict]:
    """ptxas -v's per-kernel figures: registers, shared memory, spill stores (bytes) of each entry function."""
    rows, cur = [], None
    for line in log.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            cur = dict(kind="cuda", kernel=m.group(1), arch=m.group(2), config=os.path.relpath(source, ROOT),
                       dtype="-", layout="-", variant="-", shapes=[], ok=True, regs=None, spill_bytes=0,
                       smem_bytes=0)
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes spill stores", line)
        if m:
            cur["spill_bytes"] = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem_bytes"] = int(s.group(1)) if s else 0
    return rows


def _demangle(rows: list[dict], cuda_home: str) -> None:
    """Readable kernel names (cu++filt, namespaces and parameter lists dropped)."""
    tool = os.path.join(cuda_home, "bin", "cu++filt")
    tool = tool if os.path.exists(tool) else shutil.which("c++filt")
    if not rows or not tool:
        return
    out = subprocess.run([tool], input="\n".join(r["kernel"] for r in rows), capture_output=True, text=True)
    names = out.stdout.splitlines()
    if len(names) == len(rows):
        for r, n in zip(rows, names):
            n = re.sub(r"\(anonymous namespace\)::|fusedcnn::|c10::|at::", "", n).split("(")[0]
            r["kernel"] = n.removeprefix("void ").strip() or r["kernel"]


def _compile_cuda(job) -> list[dict]:
    source, arches, cuda_home, cache_dir = job
    with tempfile.TemporaryDirectory(prefix="fusedcnn-cc-") as tmp:
        cmd = nvcc_command(source, os.path.join(tmp, "k.o"), cuda_home, arches)
        h = hashlib.sha256(" ".join(cmd[1:]).replace(tmp, "").encode())   # the source, flags and includes
        for dep in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.*"), recursive=True)):
            if dep.endswith((".cu", ".h", ".cuh")):
                with open(dep, "rb") as f:
                    h.update(dep.encode() + f.read())
        cached = os.path.join(cache_dir, h.hexdigest() + ".json")
        if os.path.exists(cached):
            with open(cached) as f:
                rows = json.load(f)
            _demangle(rows, cuda_home)
            return rows
        out = subprocess.run(cmd, capture_output=True, text=True)
    rows = parse_ptxas(out.stdout + out.stderr, source)
    if out.returncode != 0 or not rows:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return rows + [dict(kind="cuda", kernel=os.path.basename(source), arch=",".join(arches),
                            config=os.path.relpath(source, ROOT), dtype="-", layout="-", variant="-", shapes=[],
                            ok=False, regs=None, spill_bytes=None, smem_bytes=None,
                            error=f"nvcc exit {out.returncode}: {' | '.join(tail)[:300]}")]
    os.makedirs(cache_dir, exist_ok=True)
    with open(cached + ".tmp", "w") as f:   # mangled names: the cache does not depend on the demangler
        json.dump(rows, f)
    os.replace(cached + ".tmp", cached)
    _demangle(rows, cuda_home)
    return rows


def cuda_jobs(arches) -> list:
    setup = build_script()
    if setup is None:
        sys.stderr.write("fusedcnn compile-check: no setup.py / csrc/ next to this fusedcnn (not a checkout): "
                         "CUDA rows skipped\n")
        return []
    cuda_home = setup.find_cuda_home()
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return []
    cache = os.path.join(os.path.expanduser("~"), ".cache", "fusedcnn", "compile-check")
    return [(s, tuple(arches), cuda_home, cache) for s in sorted(glob.glob(os.path.join(ROOT, "csrc", "*", "*.cu")))]


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------
def failures(row: dict, limits: dict) -> list[str]:
    """Why a row fails the check (empty: it passes)."""
    if not row["ok"]:
        return [row.get("error", "compile failed")]
    why = []
    if row["spill_bytes"]:
        why.append(f"spills {row['spill_bytes']} B")
    if row["smem_bytes"] > limits[row["arch"]]:
        why.append(f"smem {row['smem_bytes']} > {limits[row['arch']]}")
    return why


def markdown(rows: list[dict], limits: dict) -> str:
    lines = ["| kind | kernel | arch | dtype | layout | variant | config | regs | spill B | smem B | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        why = failures(r, limits)
        lines.append(f"| {r['kind']} | {r['kernel']} | {r['arch']} | {r['dtype']} | {r['layout']} | {r['variant']} "
                     f"| {r['config']} | {r['regs'] if r['regs'] is not None else '-'} "
                     f"| {r['spill_bytes'] if r['spill_bytes'] is not None else '-'} "
                     f"| {r['smem_bytes'] if r['smem_bytes'] is not None else '-'} "
                     f"| {'ok' if not why else 'FAIL: ' + '; '.join(why)} |")
    return "\n".join(lines) + "\n"


def summary(rows: list[dict], limits: dict) -> str:
    out = []
    for arch in sorted({r["arch"] for r in rows}):
        for kind in ("triton", "cuda"):
            rs = [r for r in rows if r["arch"] == arch and r["kind"] == kind]
            if not rs:
                continue
            ok = [r for r in rs if r["ok"]]
            out.append(f"{arch} {kind}: {len(rs)} rows, {len(rs) - len(ok)} compile failures, "
                       f"{sum(1 for r in ok if r['spill_bytes'])} spilling, "
                       f"{sum(1 for r in ok if r['smem_bytes'] > limits[arch])} over {limits[arch]} B smem; "
                       f"max smem {max((r['smem_bytes'] for r in ok), default=0)} B, "
                       f"max regs {max((r['regs'] or 0 for r in ok), default=0)}")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def _parse(argv):
    ap = argparse.ArgumentParser(prog="fusedcnn compile-check", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_80,sm_90", help="comma-separated: sm_80, sm_90 (default both)")
    ap.add_argument("--json", metavar="FILE", help="write {'rows': [...]} here")
    ap.add_argument("--markdown", metavar="FILE", help="write the table here")
    ap.add_argument("--full", action="store_true", help="every VGG16 layer and every kept autotune config")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA extension's sources")
    ap.add_argument("--kernels", help="only Triton kernels whose name contains one of these (comma-separated)")
    ap.add_argument("--layers", help="VGG16 conv layers to drive, 1..13 (comma-separated; default: all with "
                                     "--full, else 1,2,5)")
    ap.add_argument("--dtypes", help="only these of fp32,fp16,bf16 (comma-separated)")
    ap.add_argument("--smem-limit", type=int, help="shared-memory limit for every architecture (tests)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.arches = [a.strip() for a in args.arch.split(",") if a.strip()]
    try:
        args.layer_list = [int(v) for v in args.layers.split(",")] if args.layers else None
    except ValueError:
        ap.error(f"--layers: expected comma-separated numbers 1..13, got {args.layers!r}")
    if args.layer_list and not all(1 <= v <= 13 for v in args.layer_list):
        ap.error(f"--layers: expected numbers 1..13, got {args.layers!r}")
    args.dtype_list = [d.strip() for d in args.dtypes.split(",")] if args.dtypes else None
    if args.dtype_list and not set(args.dtype_list) <= {"fp32", "fp16", "bf16"}:
        ap.error(f"--dtypes: expected a subset of fp32,fp16,bf16, got {args.dtypes!r}")
    bad = [a for a in args.arches if a not in LIMITS]
    if bad or not args.arches:
        ap.error(f"--arch: expected a comma-separated subset of {', '.join(ARCHES)}, got {args.arch!r}")
    return args


def _run_jobs(fn, jobs, n_workers, progress: bool, desc: str) -> list:
    if not jobs:
        return []
    from tqdm import tqdm
    with ProcessPoolExecutor(max_workers=max(1, min(n_workers, len(jobs)))) as ex:
        it = ex.map(fn, jobs)
        return list(tqdm(it, total=len(jobs), desc=desc, disable=not progress, file=sys.stderr))


def main(argv: list[str] | None = None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    # Compile for real GPUs: the interpreter flag must be off before triton is imported (in this process and in
    # the workers it forks). Done here, not at import: importing this module must not change the process.
    os.environ.pop("TRITON_INTERPRET", None)
    from fusedcnn.triton_kernels import _common
    if _common.INTERPRET:
        sys.stderr.write("fusedcnn compile-check: the Triton kernels were imported under TRITON_INTERPRET=1; run it "
                         "in a fresh process (the `fusedcnn compile-check` command does)\n")
        return 2
    limits = {a: (args.smem_limit if args.smem_limit is not None else LIMITS[a]) for a in ARCHES}
    t0 = time.time()
    launches = []
    for arch in args.arches:
        launches += record(arch, args.full, args.smem_limit, args.layer_list, args.dtype_list)
    if args.kernels:
        wanted = [k.strip() for k in args.kernels.split(",") if k.strip()]
        launches = [la for la in launches if any(w in la.kernel for w in wanted)]
    progress = not args.no_progress and sys.stderr.isatty()
    rows = _run_jobs(_compile, launches, args.jobs, progress, "triton")
    if not args.no_cuda:
        for rs in _run_jobs(_compile_cuda, cuda_jobs(args.arches), args.jobs, progress, "nvcc"):
            rows += rs
    rows.sort(key=lambda r: (r["kind"] != "triton", r["arch"], r["kernel"], r["dtype"], r["layout"],
                             r["variant"], r["config"]))
    table = markdown(rows, limits)
    sys.stdout.write(table)
    text = summary(rows, limits)
    bad = [r for r in rows if failures(r, limits)]
    sys.stdout.write(f"\n{text}\n{len(rows)} rows, {len(bad)} failing ({'full matrix' if args.full else 'CI subset'}, "
                     f"{time.time() - t0:.0f} s)\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"full": args.full, "arches": args.arches, "limits": limits, "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"{text}\n\n{table}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
