"""pytest-benchmark suite over the kernel cases (benchmarks/conftest.py chooses them).

One test per (case, precision, layout, mode, backend): correctness against the float64 golden first, then the
timing of one call (forward, or forward + autograd backward) on rotating input sets. On a GPU
each timed call ends with a device synchronisation, so pytest-benchmark's host clock sees the
whole kernel time (plus a launch and sync, a few microseconds: use benchmarks/kernels.py for
CUDA-event and CUDA-graph numbers).
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.cases import TOLERANCES, precision
from benchmarks.kernels import Prepared


def test_kernel(benchmark, kernel_case):
    case, prec, layout, mode, backend, device = kernel_case
    name = None if backend == "torch" else backend
    with precision(prec):
        prep = Prepared(case, prec, layout, mode, device)
        try:
            err = prep.check(name)
        except NotImplementedError as e:
            pytest.skip(f"n/a ({str(e).strip().splitlines()[0] if str(e).strip() else 'not implemented'})")
        assert err <= TOLERANCES[prec], f"WRONG: max relative error {err:.3g} against the golden > {TOLERANCES[prec]}"
        fn = prep.fn(name)
        if device.type == "cuda":
            def timed():
                fn()
                torch.cuda.synchronize(device)
        else:
            timed = fn
        benchmark.group = f"{case.layer} {case.group} {case.shape.split(' ')[0]} {prec} {layout} {mode}"
        benchmark.extra_info.update(backend=backend, flops=case.flops(mode), min_bytes=prep.min_bytes,
                                    max_rel_err=err, shape=case.shape, bound=case.bound)
        timed()  # warm-up (compilation, autotuning) outside the measurement
        benchmark.pedantic(timed, rounds=20 if device.type == "cuda" else 5, iterations=5 if device.type == "cuda"
                           else 1, warmup_rounds=2)
