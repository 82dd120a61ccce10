"""Compile the implicit-GEMM conv kernels for sm_80 and sm_90 without a GPU; report registers, spills and shared
memory per autotune configuration against the per-block limits (H100 232,448 B; A100 166,912 B).

    .venv/bin/python scripts/compile_check.py [--quick] [--jobs N] [--no-baseline]

For each kernel of triton_kernels/conv.py (forward, dgrad, wgrad), with its fusion hooks off (the conv2d path)
and on (the conv_bn_relu path: every hook of that kernel), for float32 and bfloat16 operands, MODE 0 ("tiled"),
and for every configuration in _GEMM_CONFIGS: triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)),
with the argument specialisation the JIT would give a VGG16 layer in channels_last (N=8, C=128, 56x56, 3x3,
stride 1, padding 1: unit strides become constexpr 1, multiples of 16 get the divisibility hint).

Columns: regs / spills (per thread: registers and local-memory spill bytes, from cuobjdump -res-usage), smem
(bytes Triton allocates), est (conv.smem_bytes with the kernel's hooks: what the autotuner's prune compares
with the device limit), kept (the prune keeps it on that GPU), fits (smem <= limit). A kept config that does
not fit would fail at launch: the script exits 1 if there is one.

Unless --no-baseline, the hooks-off kernels are also compiled from the newest committed triton_kernels/conv.py
without the hooks, and their PTX compared with the merged kernels' (ignoring the parameter list, which gains
the hook pointers, and source-line debug info): "same" = identical; "same instructions, reordered" = the same
multiset of PTX instructions, registers and shared memory (the longer parameter list reorders the parameter
loads); anything else is reported as DIFFERENT.
Must run without TRITON_INTERPRET=1 (it is removed from the environment here).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)   # before triton is imported: compile for real GPUs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMITS = {80: 166_912, 90: 232_448}        # shared memory per block (opt-in maximum), A100 / H100
GEO = dict(N=8, C=128, H=56, W=56, Cout=128, KH=3, KW=3)
KERNELS = ("fwd", "dgrad", "wgrad")
DTYPES = {"fp32": 4, "bf16": 2}


def _unwrap(fn):
    from triton.runtime.jit import JITFunction
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def _int_spec(v):
    """The JIT's specialisation of an int argument: 1 -> constexpr, multiple of 16 -> divisibility hint."""
    return ("constexpr", 1) if v == 1 else ("i32", 16 if v % 16 == 0 else None)


def _args(kernel: str, dt: str, hooks: bool, baseline: bool):
    """(name -> ("*dtype" | "i32" | "constexpr", value or hint)) for a VGG layer, channels_last, in call order."""
    g = GEO
    M_out = g["N"] * g["H"] * g["W"]
    hw, whc = g["H"] * g["W"] * g["C"], g["W"] * g["C"]
    nhwc = [hw, 1, whc, g["C"]]                      # x, y, grad_out strides (C = Cout here)
    w_cl = [g["C"] * 9, 1, 3 * g["C"], g["C"]]       # channels_last weight strides
    conv = dict(sh=1, sw=1, ph=1, pw=1, dh=1, dw=1)
    p = "*" + dt
    f32 = "*fp32"
    dummy = p                                        # hooks off: the launchers pass a tensor of x's dtype
    hook = (lambda: f32) if hooks else (lambda: dummy)
    a = {}
    if kernel == "fwd":
        ptrs = dict(X_ptr=p, W_ptr=p, B_ptr=f32 if hooks else p, COL_ptr=p, Y_ptr=p)
        if not baseline:
            ptrs.update(S_ptr=hook(), T_ptr=hook(), PSUM_ptr=hook(), PM2_ptr=hook())
        ints = dict(M=M_out, H=g["H"], W=g["W"], P=g["H"], Q=g["W"], Cg=g["C"], Cout_g=g["Cout"], KH=3, KW=3,
                    Kg=g["C"] * 9, Ktot=g["C"] * 9)
        strides = ["s_xn", "s_xc", "s_xh", "s_xw"], ["s_wo", "s_wc", "s_wh", "s_ww"], ["s_yn", "s_yc", "s_yh", "s_yw"]
        vals = [nhwc, w_cl, nhwc]
        const = dict(HAS_BIAS=True, MODE=0, PREC="tf32" if dt == "fp32" else "ieee")
        if not baseline:
            const.update(PROLOGUE=hooks, STATS=hooks)
    elif kernel == "dgrad":
        ptrs = dict(G_ptr=p, W_ptr=p, DX_ptr=p)
        if not baseline:
            ptrs.update(Y_ptr=p, GA_ptr=hook(), GB_ptr=hook(), X_ptr=p, S_ptr=hook(), T_ptr=hook(),
                        PDS_ptr=f32 if hooks else p, PDT_ptr=f32 if hooks else p)
        ints = dict(M=M_out, H=g["H"], W=g["W"], P=g["H"], Q=g["W"], Cg=g["C"], Cout_g=g["Cout"], KH=3, KW=3)
        strides = [["s_gn", "s_gc", "s_gh", "s_gw"], ["s_wo", "s_wc", "s_wh", "s_ww"], ["s_dn", "s_dc", "s_dh", "s_dw"]]
        vals = [nhwc, w_cl, nhwc]
        if not baseline:
            strides += [["s_yn", "s_yc", "s_yh", "s_yw"], ["s_xn", "s_xc", "s_xh", "s_xw"]]
            vals += [nhwc, nhwc]
        const = dict(PREC="tf32" if dt == "fp32" else "ieee")
        if not baseline:
            const.update(GRAD_AFFINE=hooks, PROLOGUE=hooks)
    else:
        ptrs = dict(G_ptr=p, X_ptr=p, COL_ptr=p, WS_ptr=f32)
        if not baseline:
            ptrs.update(Y_ptr=p, GA_ptr=hook(), GB_ptr=hook(), S_ptr=hook(), T_ptr=hook(), DB_ptr=f32)
        ints = dict(M=M_out, H=g["H"], W=g["W"], P=g["H"], Q=g["W"], Cg=g["C"], Cout_g=g["Cout"], KH=3, KW=3,
                    Kg=g["C"] * 9, Ktot=g["C"] * 9, k_chunk=M_out // 4)
        strides = [["s_gn", "s_gc", "s_gh", "s_gw"], ["s_xn", "s_xc", "s_xh", "s_xw"]]
        vals = [nhwc, nhwc]
        if not baseline:
            strides += [["s_yn", "s_yc", "s_yh", "s_yw"]]
            vals += [nhwc]
        const = dict(MODE=0, PREC="tf32" if dt == "fp32" else "ieee")
        if not baseline:
            const.update(GRAD_AFFINE=hooks, PROLOGUE=hooks, DBIAS=hooks)
    for k, v in ptrs.items():
        a[k] = (v, 16)
    for k, v in ints.items():
        a[k] = _int_spec(v)
    for names, vs in zip(strides, vals):
        for k, v in zip(names, vs):
            a[k] = _int_spec(v)
    for k, v in conv.items():
        a[k] = _int_spec(v)
    return a, const


def _compile(job):
    """One compile -> dict of figures (or the error)."""
    kernel, dt, hooks, cc, cfg_i, baseline = job
    import triton
    from triton.backends.compiler import GPUTarget
    mod = _baseline_module() if baseline else _conv_module()
    fn = _unwrap(getattr(mod, {"fwd": "_conv_fwd_kernel", "dgrad": "_conv_dgrad_kernel",
                               "wgrad": "_conv_wgrad_kernel"}[kernel]))
    cfg = mod._GEMM_CONFIGS[cfg_i]
    args, const = _args(kernel, dt, hooks, baseline)
    const = dict(const, **cfg.kwargs)
    if kernel == "fwd":
        const["EVEN_C"] = GEO["C"] % cfg.kwargs["BLOCK_K"] == 0
    elif kernel == "dgrad":
        const["EVEN_CO"] = GEO["Cout"] % cfg.kwargs["BLOCK_K"] == 0
    else:
        const["EVEN_C"] = GEO["C"] % cfg.kwargs["BLOCK_N"] == 0
        const["EVEN_CO"] = GEO["Cout"] % cfg.kwargs["BLOCK_M"] == 0
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            signature[name] = "constexpr"
            continue
        ty, spec = args[name]
        if ty == "constexpr":
            signature[name], const[name] = "constexpr", spec
        else:
            signature[name] = ty
            if spec == 16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=const, attrs=attrs)
    out = dict(kernel=kernel, dt=dt, hooks=hooks, cc=cc, cfg=cfg_i, baseline=baseline)
    try:
        k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    except Exception as e:   # noqa: BLE001 — report and go on
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return out
    regs, local = _resource_usage(k.asm["cubin"])
    out.update(regs=regs, spills=local, smem=k.metadata.shared, ptx=_ptx_body(k.asm["ptx"]))
    return out


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local memory bytes per thread) of a cubin, from cuobjdump -res-usage: what a loaded
    kernel's n_regs / n_spills report (those need a GPU driver). Local memory here is register spill space."""
    from triton.backends.nvidia.compiler import get_ptxas
    cuobjdump = os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "-res-usage", f.name], check=True, capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    local = int(re.search(r"LOCAL:(\d+)", text).group(1))
    return regs, local


def _ptx_body(ptx: str) -> str:
    """The PTX instructions after the .entry's parameter list: parameter names normalised, source-line debug
    information (.loc, .file, the debug sections) dropped, since the merged file's line numbers differ."""
    body = ptx[ptx.index(")", ptx.index(".entry")):]
    body = body.split(".section", 1)[0]
    body = "\n".join(line for line in body.splitlines() if not re.match(r"\s*(\.loc|\.file|\$L__tmp|\$L__func)", line))
    return re.sub(r"_param_\d+", "_param_N", body)


_MODS = {}


def _conv_module():
    if "conv" not in _MODS:
        sys.path.insert(0, os.path.join(ROOT, "python"))
        from fusedcnn.triton_kernels import conv
        _MODS["conv"] = conv
    return _MODS["conv"]


def _baseline_commit() -> str:
    """The newest commit whose triton_kernels/conv.py has no fusion hooks (the conv2d kernels before the merge)."""
    log = subprocess.run(["git", "log", "--format=%H", "--", "triton_kernels/conv.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.split()
    for commit in log:
        src = subprocess.run(["git", "show", f"{commit}:triton_kernels/conv.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        if "PROLOGUE" not in src:
            return commit
    raise RuntimeError("no commit of triton_kernels/conv.py without the fusion hooks")


def _baseline_module():
    """triton_kernels/conv.py before the fusion hooks, imported as a sibling of today's _common (a temporary
    package)."""
    if "base" not in _MODS:
        d = tempfile.mkdtemp(prefix="conv_head_")
        pkg = os.path.join(d, "conv_head_pkg")
        os.makedirs(pkg)
        src = subprocess.run(["git", "show", f"{_baseline_commit()}:triton_kernels/conv.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        with open(os.path.join(pkg, "conv.py"), "w") as f:
            f.write(src)
        with open(os.path.join(ROOT, "triton_kernels", "_common.py")) as f, \
                open(os.path.join(pkg, "_common.py"), "w") as g:
            g.write(f.read())
        open(os.path.join(pkg, "__init__.py"), "w").close()
        sys.path.insert(0, d)
        sys.path.insert(0, os.path.join(ROOT, "python"))
        import conv_head_pkg.conv as base
        _MODS["base"] = base
    return _MODS["base"]


def _jobs(quick: bool, baseline: bool):
    n_cfg = len(_conv_module()._GEMM_CONFIGS)
    cfgs = [0, 6] if quick else range(n_cfg)
    jobs = [(k, dt, hooks, cc, i, False) for k in KERNELS for dt in DTYPES for hooks in (False, True)
            for cc in (80, 90) for i in cfgs]
    if baseline:
        jobs += [(k, dt, False, cc, i, True) for k in KERNELS for dt in DTYPES for cc in (80, 90) for i in cfgs]
    return jobs


def _same(r, b) -> str:
    """How the merged kernel's PTX compares with the pre-hooks kernel's."""
    if "error" in b:
        return "error"
    if b["ptx"] == r["ptx"]:
        return "same"
    ops = [collections.Counter(re.findall(r"^\s+([a-z][\w.]*)\s", x["ptx"], re.M)) for x in (r, b)]
    if ops[0] == ops[1] and (r["regs"], r["smem"]) == (b["regs"], b["smem"]):
        return "same instructions, reordered"
    return f"DIFFERENT (before: {b['regs']} regs, {b['smem']} B)"


def _report(results) -> int:
    conv = _conv_module()
    base = {(r["kernel"], r["dt"], r["cc"], r["cfg"]): r for r in results if r["baseline"]}
    bad = 0
    print("| kernel | hooks | dtype | sm | config (BMxBNxBK, warps, stages) | regs | spills | smem B | est B "
          "| limit B | kept | fits | vs pre-hooks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted((r for r in results if not r["baseline"]),
                    key=lambda r: (KERNELS.index(r["kernel"]), r["hooks"], r["dt"], r["cc"], r["cfg"])):
        c = conv._GEMM_CONFIGS[r["cfg"]]
        kw = c.kwargs
        name = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}, {c.num_warps}, {c.num_stages}"
        names = {"fwd": ("PROLOGUE", "STATS"), "dgrad": ("GRAD_AFFINE", "PROLOGUE"),
                 "wgrad": ("GRAD_AFFINE", "PROLOGUE", "DBIAS")}[r["kernel"]]
        flags = conv.hook_smem_flags(r["kernel"], {h: r["hooks"] for h in names})
        est = conv.smem_bytes(c, DTYPES[r["dt"]], r["cc"] // 10, **flags)
        limit = LIMITS[r["cc"]]
        kept = est <= limit
        hooks = "on" if r["hooks"] else "off"
        if "error" in r:
            print(f"| {r['kernel']} | {hooks} | {r['dt']} | {r['cc']} | {name} | - | - | - | {est} | {limit} | "
                  f"{'yes' if kept else 'no'} | ERROR {r['error']} | |")
            bad += kept
            continue
        fits = r["smem"] <= limit
        b = base.get((r["kernel"], r["dt"], r["cc"], r["cfg"]))
        same = "" if r["hooks"] or b is None else _same(r, b)
        print(f"| {r['kernel']} | {hooks} | {r['dt']} | {r['cc']} | {name} | {r['regs']} | {r['spills']} | "
              f"{r['smem']} | {est} | {limit} | {'yes' if kept else 'no'} | {'yes' if fits else 'NO'} | {same} |")
        bad += kept and not fits
    print(f"\nkept configs over the shared-memory limit: {bad}")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two configs (one Hopper, one Ampere) instead of all")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-baseline", action="store_true", help="skip the comparison with the pre-hooks kernels")
    args = ap.parse_args()
    jobs = _jobs(args.quick, not args.no_baseline)
    with ProcessPoolExecutor(max_workers=args.jobs) as ex:
        results = list(ex.map(_compile, jobs))
    return _report(results)


if __name__ == "__main__":
    sys.exit(main())
