"""Fused-family cases: VGG16's Conv2d -> BatchNorm2d -> ReLU runs, training mode, as FusedSequential calls them.

x: (N, Cin, H, W), weight: (Cout, Cin, 3, 3), no conv bias (VGG16-BN's), all in the case's dtype; BatchNorm
weight, bias, running_mean, running_var: (Cout,) float32. torch (the baseline) runs F.conv2d, F.batch_norm and
F.relu one after the other; a fusedcnn backend runs fusedcnn.functional.conv_bn_relu (triton: one implicit-GEMM
conv with the statistics in its epilogue plus one BN+ReLU pass; other backends: their own composition).
FLOPs: the conv's (see conv.py) + 6 per output element forward (statistics, normalize, ReLU), 9 more backward.
Minimum bytes: x and the weight read, the activation written (forward); backward as conv + BatchNorm (the saved
x and the raw conv output read, grads written).
"""
from __future__ import annotations

import math

import torch.nn.functional as F

import fusedcnn
from benchmarks.cases import Case, Shapes, Spec, fmt_shape, mult

K, PAD, MOMENTUM, EPS = 3, 1, 0.1, 1e-5


def _case(shapes: Shapes, names: str, count: int, n: int, cin: int, cout: int, h: int, w: int) -> Case:
    macs = n * cout * h * w * cin * K * K
    elems = n * cout * h * w

    def build(spec: Spec) -> dict:
        import torch
        f32 = torch.float32
        return {"x": spec.randn(n, cin, h, w),
                "weight": spec.randn(cout, cin, K, K, scale=math.sqrt(2.0 / (cin * K * K))),
                "running_mean": spec.randn(cout, dtype=f32, scale=0.1),
                "running_var": spec.randn(cout, dtype=f32, scale=0.1).abs() + 1.0,
                "bn_weight": spec.randn(cout, dtype=f32, scale=0.2) + 1.0,
                "bn_bias": spec.randn(cout, dtype=f32, scale=0.2)}

    def call(t: dict, backend: str | None):
        bn = (t["running_mean"], t["running_var"], t["bn_weight"], t["bn_bias"], True, MOMENTUM, EPS)
        if backend is None:
            return F.relu(F.batch_norm(F.conv2d(t["x"], t["weight"], None, 1, PAD), *bn))
        return fusedcnn.functional.conv_bn_relu(t["x"], t["weight"], None, *bn, 1, PAD, backend=backend)

    return Case(layer="conv_bn_relu", family="fused", group=shapes.group, bound="compute",
                shape=f"{names}{mult(count)} {fmt_shape(n, cin, h, w)}->{cout}", build=build, call=call,
                leaves=("x", "weight", "bn_weight", "bn_bias"), saved=("x", "weight"),
                mutable=("running_mean", "running_var"), count=count, in_network=False,
                flops=lambda mode: float(2 * macs + 6 * elems if mode == "fwd" else 6 * macs + 15 * elems),
                meta={"N": n, "Cin": cin, "Cout": cout, "H": h, "W": w, "kernel": K, "padding": PAD,
                      "training": True})


def cases(shapes: Shapes) -> list[Case]:
    return [_case(shapes, names, count, *dims) for names, count, dims in shapes.convs()]
