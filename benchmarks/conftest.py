"""pytest-benchmark over the kernel harness's cases (`pytest benchmarks --benchmark-only`).

Kept out of the default test run (pyproject's testpaths is tests/). Which cases: the kernel
harness's own options, passed as one string, e.g.

    pytest benchmarks --benchmark-only --kernels-args="--preset small --layers conv2d --backends triton"

Default: preset "small" (bf16/fp32 on CIFAR-scale VGG16 shapes) on a GPU, the "cpu" preset's
float32 NCHW fwd+bwd cases on CPU. Each test checks correctness against the float64 golden first (a WRONG
result fails the test); a backend that cannot run the case skips with the reason.
"""
from __future__ import annotations

import shlex

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--kernels-args", default=None,
                     help="options of benchmarks/kernels.py selecting the cases (see its --help)")


def _selection(config):
    from benchmarks import kernels
    text = config.getoption("--kernels-args")
    if text is None:
        text = ("--preset small" if torch.cuda.is_available() else
                "--preset cpu --layouts nchw --modes fwdbwd --precisions float32")
    args = kernels.parse_args(shlex.split(text))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = kernels.PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    if device.type == "cpu" and (args.threads or preset.get("threads")):
        torch.set_num_threads(args.threads or preset.get("threads"))
    configs = kernels.expand(preset, args, device)
    backends, unavailable = kernels.choose_backends(args, device)
    return args, device, configs, backends, unavailable


def pytest_generate_tests(metafunc):
    if "kernel_case" not in metafunc.fixturenames:
        return
    args, device, configs, backends, unavailable = _selection(metafunc.config)
    params = []
    for case, prec, layout, mode, _ in configs:
        for backend in ["torch", *backends, *unavailable]:
            marks = ()
            if backend in unavailable:
                marks = pytest.mark.skip(reason=unavailable[backend])
            elif backend == "reference" and not kernels_reference_on(case, args):
                marks = pytest.mark.skip(reason="reference backend: small shapes only by default")
            pid = f"{case.layer}-{case.group}-{case.shape.split(' ')[0]}-{prec}-{layout}-{mode}-{backend}"
            params.append(pytest.param((case, prec, layout, mode, backend, device), id=pid, marks=marks))
    metafunc.parametrize("kernel_case", params)


def kernels_reference_on(case, args) -> bool:
    from benchmarks import kernels
    return kernels.reference_on(case, args)
