"""fusedcnn compile-check: the CI subset on a couple of kernels (real Triton compiles for sm_80 / sm_90, no GPU),
its JSON rows and exit status, the ptxas log parser, and the one-compile-per-seed property it measures.

The check compiles for real GPUs, which the interpreter this test session runs under (TRITON_INTERPRET=1, read
when triton is imported) forbids in-process: it runs in a subprocess, through the `fusedcnn` console script's
entry point."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from fusedcnn import compile_check

KERNELS = "_relu_fwd_kernel,_bn_combine_kernel"
FIELDS = {"kind", "kernel", "arch", "config", "dtype", "layout", "ok", "regs", "spill_bytes", "smem_bytes"}


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-c", "import sys; from fusedcnn.cli import main; sys.exit(main())",
                           "compile-check", *args], env=_env(), capture_output=True, text=True, timeout=timeout)


def test_subset_json_rows_and_exit_status(tmp_path):
    out = tmp_path / "cc.json"
    r = _cli("--arch", "sm_80,sm_90", "--no-cuda", "--kernels", KERNELS, "--json", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {row["arch"] for row in rows} == {"sm_80", "sm_90"}
    assert {row["kernel"] for row in rows} == set(KERNELS.split(","))
    assert {row["dtype"] for row in rows if row["kernel"] == "_relu_fwd_kernel"} == {"fp32", "fp16", "bf16"}
    for row in rows:
        assert FIELDS <= set(row)
        assert row["kind"] == "triton" and row["ok"] is True
        assert row["regs"] > 0 and row["spill_bytes"] == 0 and 0 <= row["smem_bytes"] <= 166_912
    assert "| triton | _relu_fwd_kernel | sm_90 |" in r.stdout
    assert "0 failing (CI subset" in r.stdout

    # A forced failure: an impossible shared-memory limit (the reduction kernel uses some) -> exit status 1.
    r = _cli("--arch", "sm_90", "--no-cuda", "--kernels", "_bn_combine_kernel", "--smem-limit", "1",
             "--json", str(out))
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(row["smem_bytes"] > 1 for row in rows)
    assert "FAIL: smem" in r.stdout


def test_usage_error():
    r = _cli("--arch", "sm_70", "--no-cuda")
    assert r.returncode == 2 and "--arch" in r.stderr


def test_parse_ptxas():
    log = textwrap.dedent("""\
        ptxas info    : 28 bytes gmem
        ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_80'
        ptxas info    : Function properties for _Z6kernelPf
            0 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
        ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 384 bytes cmem[0]
        ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'
        ptxas info    : Function properties for _Z6kernelPf
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 38 registers, used 0 barriers, 384 bytes cmem[0]
        """)
    rows = compile_check.parse_ptxas(log, os.path.join(compile_check.ROOT, "csrc", "x", "x_cuda.cu"))
    assert [(r["arch"], r["regs"], r["spill_bytes"], r["smem_bytes"]) for r in rows] == [
        ("sm_80", 40, 8, 2048), ("sm_90", 38, 0, 0)]
    assert all(r["kind"] == "cuda" and r["config"] == os.path.join("csrc", "x", "x_cuda.cu") for r in rows)
    limits = compile_check.LIMITS
    assert compile_check.failures(rows[0], limits) == ["spills 8 B"]
    assert compile_check.failures(rows[1], limits) == []
    assert compile_check.failures(dict(rows[1], smem_bytes=232_449), limits) == ["smem 232449 > 232448"]


_SEED_SCRIPT = """
import torch
from fusedcnn import compile_check
from fusedcnn.triton_kernels import dropout, fused
m = dict(device="meta")
x = torch.empty(4, 8, 5, 5, **m)
xc = x.contiguous(memory_format=torch.channels_last)
a, w = torch.empty(8, 32, **m), torch.empty(64, 32, **m)
seeds = [0, 1, 16, 12345, -1, 2**40, 2**63 - 1, 2**63 + 5]
print(len(compile_check.trace(lambda: [dropout.dropout(x, 0.5, s) for s in seeds if s < 2**63])))
print(len(compile_check.trace(lambda: [dropout.dropout(xc, 0.5, s) for s in seeds if s < 2**63])))
print(len(compile_check.trace(lambda: [fused.linear_relu_dropout(a, w, None, 0.5, s) for s in seeds])))
"""


def test_one_compile_serves_every_seed():
    """The seeds of the dropout and Linear kernels are not specialised (uint64, do_not_specialize): seeds that
    are 0, 1, multiples of 16, negative or beyond int32/int64 all map to one compiled kernel on the GPU."""
    r = subprocess.run([sys.executable, "-c", _SEED_SCRIPT], env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["1", "1", "1"]


@pytest.mark.parametrize("n, bucket", [(0, 16), (1, 16), (16, 16), (17, 32), (32 * 224 * 224, 2**21),
                                       (31 * 224 * 224, 2**21), (2**31 - 1, 2**30)])
def test_autotune_bucket(n, bucket):
    from fusedcnn.triton_kernels._common import autotune_bucket
    assert autotune_bucket(n) == bucket


def test_cuda_rows_use_the_build_s_own_nvcc_command():
    """The CUDA half compiles with setup.py's command (same flags and includes), for SASS of the asked
    architectures only, with ptxas' report on."""
    setup = compile_check.build_script()
    if setup is None:   # e.g. the oldest-versions environment: fusedcnn installed from a copy, not this checkout
        pytest.skip("fusedcnn is not imported from a checkout (no setup.py / csrc/ next to it)")
    src = os.path.join(compile_check.ROOT, "csrc", "conv", "conv_cuda.cu")
    cmd = compile_check.nvcc_command(src, "k.o", "/opt/cuda-x", ["sm_80", "sm_90"])
    built = setup.nvcc_command(src, "k.o", arch_list="8.0;9.0", cuda_home="/opt/cuda-x")
    assert cmd == built + ["-Xptxas", "-v"]
    gencode = sorted(f for f in cmd if f.startswith("-gencode"))
    assert gencode == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    assert cmd[0] == "/opt/cuda-x/bin/nvcc" and "-O3" in cmd
