"""BatchNorm2d and fused BatchNorm2d+ReLU cases, training mode (batch statistics, running stats updated).

x: (N, C, H, W) in the case's dtype, NCHW or channels_last; weight, bias, running_mean,
running_var: (C,) float32 (as under autocast, where BatchNorm keeps float32 parameters).
Memory-bound: GB/s against the copy peak. The minimum bytes count one read of x and one write
of y for the forward (a two-pass kernel that re-reads x for the statistics moves 1.5x that);
the backward reads grad_out and x (the saved input) and writes grad_x (+ C-sized gradients).
FLOPs counted per element: forward 5 (sum, sum of squares, one multiply-add) + 1 for ReLU;
backward 8 (two reductions, one fused update) + 1 for the ReLU mask.
"""
from __future__ import annotations

import torch.nn.functional as F

import fusedcnn
from benchmarks.cases import Case, Shapes, Spec, fmt_shape, mult

MOMENTUM, EPS = 0.1, 1e-5


def _case(shapes: Shapes, layer: str, names: str, count: int, n: int, c: int, h: int, w: int) -> Case:
    relu = layer == "batch_norm_relu"
    elems = n * c * h * w

    def build(spec: Spec) -> dict:
        import torch
        f32 = torch.float32
        return {"x": spec.randn(n, c, h, w, scale=2.0) + 0.5,
                "running_mean": spec.randn(c, dtype=f32, scale=0.1),
                "running_var": spec.randn(c, dtype=f32, scale=0.1).abs() + 1.0,
                "weight": spec.randn(c, dtype=f32, scale=0.2) + 1.0,
                "bias": spec.randn(c, dtype=f32, scale=0.2)}

    def call(t: dict, backend: str | None):
        args = (t["x"], t["running_mean"], t["running_var"], t["weight"], t["bias"], True, MOMENTUM, EPS)
        if backend is None:
            y = F.batch_norm(*args)
            return F.relu(y) if relu else y
        fn = fusedcnn.functional.batch_norm_relu if relu else fusedcnn.functional.batch_norm
        return fn(*args, backend=backend)

    per_elem = (6, 15) if relu else (5, 13)  # (fwd, fwd+bwd) FLOPs per element
    return Case(layer=layer, family="batchnorm", group=shapes.group, bound="memory",
                shape=f"{names} out{mult(count)} {fmt_shape(n, c, h, w)}", build=build, call=call,
                leaves=("x", "weight", "bias"), saved=("x",), mutable=("running_mean", "running_var"),
                count=count, precisions=("float32", "bfloat16", "float16"),
                flops=lambda mode: float(elems * per_elem[0 if mode == "fwd" else 1]),
                meta={"N": n, "C": c, "H": h, "W": w, "training": True})


def cases(shapes: Shapes) -> list[Case]:
    return [_case(shapes, layer, names, count, *dims)
            for layer in ("batch_norm", "batch_norm_relu") for names, count, dims in shapes.activations()]
