"""ReLU cases: the VGG16 conv outputs (in VGG16-BN ReLU follows BatchNorm; as a layer of its own it
runs on these shapes).

x: (N, C, H, W) in the case's dtype, NCHW or channels_last. Memory-bound: forward reads x and
writes y; backward reads grad_out and the saved output (the mask) and writes grad_x.
FLOPs: 1 per element forward, 1 more backward.
"""
from __future__ import annotations

import torch.nn.functional as F

import fusedcnn
from benchmarks.cases import Case, Shapes, fmt_shape, mult


def _case(shapes: Shapes, names: str, count: int, n: int, c: int, h: int, w: int) -> Case:
    elems = n * c * h * w

    def call(t: dict, backend: str | None):
        if backend is None:
            return F.relu(t["x"])
        return fusedcnn.functional.relu(t["x"], backend=backend)

    return Case(layer="relu", family="activation", group=shapes.group, bound="memory",
                shape=f"{names} out{mult(count)} {fmt_shape(n, c, h, w)}",
                build=lambda spec: {"x": spec.randn(n, c, h, w)}, call=call, saved=("out",), count=count,
                precisions=("float32", "bfloat16", "float16"),
                flops=lambda mode: float(elems * (1 if mode == "fwd" else 2)),
                meta={"N": n, "C": c, "H": h, "W": w})


def cases(shapes: Shapes) -> list[Case]:
    return [_case(shapes, names, count, *dims) for names, count, dims in shapes.activations()]
