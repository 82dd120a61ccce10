"""Dropout cases (p = 0.5, training): the classifier's (N, hidden) activations, as in VGG16's head,
and the largest conv output, where bandwidth shows.

x in the case's dtype. fusedcnn's dropout draws its mask from the Philox stream (docs/ARCHITECTURE.md),
torch from its own generator, so results are not compared elementwise with torch: `check`
verifies that each output element is 0 or x/(1-p), that the kept fraction is within 6 sigma
of 1-p, and that grad_x = grad_out * (y != 0) / (1-p).
Memory-bound: forward reads x and writes y; backward reads grad_out and writes grad_x (the mask
is regenerated; torch's stores a 1-byte mask, counted against it only in its own time).
FLOPs: 1 per element forward (the multiply), 1 backward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import fusedcnn
from benchmarks.cases import Case, Shapes, fmt_shape

P = 0.5


def check(out: torch.Tensor, tensors: dict, grad_out: torch.Tensor | None, grads: list | None) -> float:
    """Max relative error of a dropout result against its own mask (inf if the kept fraction is off)."""
    x = tensors["x"].detach().float()
    y = out.detach().float()
    kept = y != 0
    scale = 1.0 / (1.0 - P)
    ref = torch.where(kept, x * scale, torch.zeros_like(x))
    err = ((y - ref).abs().max() / (x * scale).abs().max().clamp_min(1e-30)).item()
    n = x.numel()
    frac = kept.float().mean().item()
    if abs(frac - (1 - P)) > 6 * math.sqrt(P * (1 - P) / n) + 1e-12:
        return float("inf")
    if grads is not None:
        g = grad_out.float()
        gref = torch.where(kept, g * scale, torch.zeros_like(g))
        gerr = ((grads[0].float() - gref).abs().max() / (g * scale).abs().max().clamp_min(1e-30)).item()
        err = max(err, gerr)
    return err


def _case(shapes: Shapes, name: str, dims: tuple, count: int = 1, in_network: bool = True) -> Case:
    elems = math.prod(dims)

    def call(t: dict, backend: str | None):
        if backend is None:
            return F.dropout(t["x"], P, True)
        return fusedcnn.functional.dropout(t["x"], P, True, backend=backend)

    return Case(layer="dropout", family="dropout", group=shapes.group, bound="memory",
                shape=f"{name} {fmt_shape(*dims)}", build=lambda spec: {"x": spec.randn(*dims)}, call=call,
                saved=(), check=check, count=count, in_network=in_network, precisions=("float32", "bfloat16", "float16"),
                flops=lambda mode: float(elems * (1 if mode == "fwd" else 2)), meta={"shape": list(dims), "p": P})


def cases(shapes: Shapes) -> list[Case]:
    names, _, dims = shapes.activations()[0]
    return [_case(shapes, "fc6/fc7 (x2)", (shapes.batch, shapes.hidden), 2),
            _case(shapes, f"{names} out", dims, in_network=False)]  # not in VGG16: a bandwidth case
