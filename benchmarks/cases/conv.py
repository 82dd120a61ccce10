"""Conv2d cases: the VGG16 convolutions (3x3, stride 1, padding 1, bias).

x: (N, Cin, H, W), weight: (Cout, Cin, 3, 3), bias: (Cout,), all in the case's dtype
(as under autocast); channels_last puts x and the weight in NHWC (as model.to(channels_last)).
FLOPs (compute-bound: TFLOP/s against the matmul peak of the precision):
  fwd    2*N*Cout*Ho*Wo*Cin*Kh*Kw (multiply-adds x2) + N*Cout*Ho*Wo (bias)
  fwdbwd fwd + dgrad (the same 2*...) + wgrad (the same 2*...) + N*Cout*Ho*Wo (dbias)
Backward saves x and weight.
"""
from __future__ import annotations

import math

import torch.nn.functional as F

import fusedcnn
from benchmarks.cases import Case, Shapes, Spec, fmt_shape, mult

K, PAD = 3, 1


def _case(shapes: Shapes, names: str, count: int, n: int, cin: int, cout: int, h: int, w: int) -> Case:
    macs = n * cout * h * w * cin * K * K
    bias = n * cout * h * w

    def build(spec: Spec) -> dict:
        return {"x": spec.randn(n, cin, h, w),
                "weight": spec.randn(cout, cin, K, K, scale=math.sqrt(2.0 / (cin * K * K))),
                "bias": spec.randn(cout, scale=0.1)}

    def call(t: dict, backend: str | None):
        if backend is None:
            return F.conv2d(t["x"], t["weight"], t["bias"], 1, PAD)
        return fusedcnn.functional.conv2d(t["x"], t["weight"], t["bias"], 1, PAD, backend=backend)

    return Case(layer="conv2d", family="conv", group=shapes.group, bound="compute",
                shape=f"{names}{mult(count)} {fmt_shape(n, cin, h, w)}->{cout}",
                build=build, call=call, leaves=("x", "weight", "bias"), saved=("x", "weight"), count=count,
                flops=lambda mode: float(2 * macs + bias if mode == "fwd" else 6 * macs + 2 * bias),
                meta={"N": n, "Cin": cin, "Cout": cout, "H": h, "W": w, "kernel": K, "padding": PAD})


def cases(shapes: Shapes) -> list[Case]:
    return [_case(shapes, names, count, *dims) for names, count, dims in shapes.convs()]
