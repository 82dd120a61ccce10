"""Pooling cases: VGG16's five 2x2/2 max pools (and average pools on the same inputs), and the
adaptive pools of a global-pooling head on the last conv output (N, C, R/16, R/16):
global (-> 1x1) and -> (R/32)x(R/32) (7x7 at 224, torchvision's VGG avgpool size).

x: (N, C, H, W) in the case's dtype, NCHW or channels_last. Max-pool inputs hold distinct values
per plane (Spec.distinct) so the argmax, and so the gradient, is unique.
Memory-bound: forward reads x and writes y; the backward of max pools reads grad_out and the
saved x (argmax recomputed; an index tensor would be counted instead if smaller is not
possible), average pools read grad_out only; both write grad_x.
FLOPs per output element: max kh*kw-1 compares (+1 backward), average kh*kw adds + 1 multiply
(+kh*kw backward).
"""
from __future__ import annotations

import torch.nn.functional as F

import fusedcnn
from benchmarks.cases import Case, Shapes, Spec, fmt_shape

FUNCS = {  # layer -> (torch.nn.functional, fusedcnn.functional, is max)
    "max_pool2d": ("max_pool2d", True),
    "avg_pool2d": ("avg_pool2d", False),
    "adaptive_max_pool2d": ("adaptive_max_pool2d", True),
    "adaptive_avg_pool2d": ("adaptive_avg_pool2d", False),
}


def _case(shapes: Shapes, layer: str, name: str, n: int, c: int, h: int, w: int, arg) -> Case:
    fname, is_max = FUNCS[layer]
    adaptive = layer.startswith("adaptive")
    out_hw = (arg, arg) if adaptive else (h // 2, w // 2)
    window = (h // out_hw[0]) * (w // out_hw[1])  # the mean window size (exact when divisible)
    outs = n * c * out_hw[0] * out_hw[1]
    torch_fn, fused_fn = getattr(F, fname), getattr(fusedcnn.functional, fname)

    def build(spec: Spec) -> dict:
        return {"x": spec.distinct(n, c, h, w) if is_max else spec.randn(n, c, h, w)}

    def call(t: dict, backend: str | None):
        if backend is None:
            return torch_fn(t["x"], arg)
        return fused_fn(t["x"], arg, backend=backend)

    fwd = outs * (window - 1 if is_max else window + 1)
    bwd = outs * (1 if is_max else window)
    # the label's first word names the case uniquely within its layer (plots and test ids use it)
    label = f"{name}->{out_hw[0]}x{out_hw[1]} {fmt_shape(n, c, h, w)}" if adaptive else \
        f"{name} {fmt_shape(n, c, h, w)} k2s2"
    return Case(layer=layer, family="pooling", group=shapes.group, bound="memory",
                shape=label, build=build, call=call,
                saved=("x",) if is_max else (), precisions=("float32", "bfloat16", "float16"),
                in_network=not adaptive,  # the global-pooling heads replace the classic head: not summed
                flops=lambda mode: float(fwd if mode == "fwd" else fwd + bwd),
                meta={"N": n, "C": c, "H": h, "W": w, "output": list(out_hw) if adaptive else None,
                      "kernel": None if adaptive else 2})


def cases(shapes: Shapes) -> list[Case]:
    out = []
    for layer in ("max_pool2d", "avg_pool2d"):
        out += [_case(shapes, layer, name, *dims, 2) for name, *dims in shapes.pools()]
    names, _, (n, c, h, w) = shapes.activations()[-1]
    sizes = [1] + ([h // 2] if h // 2 > 1 else [])
    for layer in ("adaptive_max_pool2d", "adaptive_avg_pool2d"):
        out += [_case(shapes, layer, names.split("/")[-1], n, c, h, w, s) for s in sizes]
    return out
