"""Benchmark cases: what each layer is run on, how each backend is called, and the FLOP/byte floors.

A `Case` is one layer on one shape. The harness (benchmarks/kernels.py) runs it at a
precision ("float32", "tf32", "bfloat16", "float16"), a layout ("nchw", "channels_last")
and a mode ("fwd", "fwdbwd") for torch and every fusedcnn backend.

One module per layer family (fusedcnn.ops.FAMILIES: activation, batchnorm, conv, dropout, fused, pooling),
named like the family, each with `cases(shapes: Shapes) -> list[Case]`. Shapes come from the VGG16 layer table
(`vgg16_shapes`) at the groups in `GROUPS`.

Minimum bytes (the floor the output's GB/s and %peak are measured against): the forward reads
each input once and writes each output once; the backward (a separate call, as under
autograd) reads grad_out plus what it must keep from the forward (`Case.saved`, stated per
layer) and writes each gradient once; fwd+bwd is the sum.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from fusedcnn.ops import FAMILIES  # noqa: F401  (the one list of layer families)

# Precision modes: the tensor dtype and whether TF32 is allowed for float32 matmul/conv.
PRECISIONS = {"float32": torch.float32, "tf32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = ("nchw", "channels_last")
MODES = ("fwd", "fwdbwd")

# A backend's result is flagged WRONG when its max relative error against torch exceeds this.
# Error = max |a - b| / max |b| over the output and every gradient (normwise, infinity norm).
# Two correct implementations differ by rounding only (~1e-6 fp32, ~1e-3 tf32, ~1e-2 bf16);
# an indexing or reduction bug shows errors of order 1.
TOLERANCES = {"float32": 2e-4, "tf32": 5e-3, "float16": 1e-2, "bfloat16": 3e-2}


@contextlib.contextmanager
def precision(name: str):
    """Set TF32 for float32 matmul/conv on ("tf32") or off (every other mode); restore afterwards."""
    tf32 = name == "tf32"
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@dataclass
class Spec:
    """How one input set is built: device, activation dtype, layout, random generator."""
    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    gen: torch.Generator

    def randn(self, *shape, dtype=None, scale: float = 1.0, fmt: bool = True) -> torch.Tensor:
        """Fresh normal data (never zeros); 4-D tensors go channels_last when the spec says so and fmt."""
        t = torch.randn(*shape, generator=self.gen, device=self.gen.device, dtype=torch.float32) * scale
        t = t.to(device=self.device, dtype=dtype or self.dtype)
        if fmt and self.channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def distinct(self, n: int, c: int, h: int, w: int) -> torch.Tensor:
        """(n, c, h, w) values all distinct within each (n, c) plane: max pooling has no ties to break.

        Ties are common in bfloat16 (8 significant bits) and a backend may route a tied
        gradient to another, equally valid, element; distinct values make the argmax unique.
        Values: a random permutation of the normal (non-denormal) numbers of a 16-bit type,
        which are exact in every tested dtype; falls back to randn if a plane is larger.
        """
        gdev = self.gen.device
        table = _distinct_table(torch.float16 if self.dtype == torch.float16 else torch.bfloat16).to(gdev)
        p = table.numel()
        if h * w > p:
            return self.randn(n, c, h, w)
        perm = table[torch.randperm(p, generator=self.gen, device=gdev)]
        a = int(torch.randint(1, p, (1,), generator=self.gen, device=gdev)) | 1
        while _gcd(a, p) != 1:
            a += 2
        # index of position i in a plane: (a*i + offset) mod p; a coprime with p, so distinct
        # positions get distinct indices (int32: every term stays below 2p).
        posa = (torch.arange(h * w, device=gdev, dtype=torch.int64) * a % p).to(torch.int32).view(1, -1)
        off = torch.randint(0, p, (n * c, 1), generator=self.gen, device=gdev, dtype=torch.int32)
        idx = torch.remainder(posa + off, p)
        t = perm[idx].view(n, c, h, w).to(device=self.device, dtype=self.dtype)
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last else t


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


_TABLES: dict[torch.dtype, torch.Tensor] = {}


def _distinct_table(dtype: torch.dtype) -> torch.Tensor:
    """All normal finite values of a 16-bit float type, as float32 (CPU)."""
    if dtype not in _TABLES:
        bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
        v = bits.view(dtype).float()
        tiny = torch.finfo(dtype).tiny
        _TABLES[dtype] = v[torch.isfinite(v) & (v.abs() >= tiny)]
    return _TABLES[dtype]


@dataclass
class Case:
    """One layer on one shape.

    build(spec) -> dict of named tensors (one input set; `leaves` get requires_grad in fwd+bwd).
    call(tensors, backend) -> output tensor; backend None is the torch baseline
    (torch.nn.functional directly: cuDNN / oneDNN), otherwise fusedcnn.functional with backend=.
    saved: names of the tensors the backward must read besides grad_out ("out" = the forward output).
    flops(mode): floating-point operations counted for the mode (see each family's docstring).
    check(out, ref, tensors, grads, ref_grads) -> error, for layers whose result cannot be compared
    elementwise with torch's (dropout: different random streams).
    """
    layer: str
    family: str
    shape: str
    group: str
    bound: str  # "compute" (TFLOP/s against the matmul peak) or "memory" (GB/s against the copy peak)
    build: Callable[[Spec], dict]
    call: Callable[[dict, str | None], torch.Tensor]
    flops: Callable[[str], float]
    leaves: tuple[str, ...] = ("x",)
    saved: tuple[str, ...] = ("x",)
    inputs: tuple[str, ...] | None = None  # the forward's inputs (default: every built tensor)
    mutable: tuple[str, ...] = ()  # tensors the op updates in place (running statistics)
    count: int = 1  # how many layers of the network have this shape
    in_network: bool = True  # part of VGG16's layer stack (summed into the whole-network totals)
    check: Callable | None = None
    precisions: tuple[str, ...] = tuple(PRECISIONS)
    meta: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.layer}|{self.group}|{self.shape}"

    def min_bytes(self, mode: str, tensors: dict, out: torch.Tensor) -> float:
        """The fewest bytes the mode must move (module docstring): inputs once, outputs once."""
        names = self.inputs if self.inputs is not None else tuple(tensors)
        fwd = sum(tensors[n].nbytes for n in names) + out.nbytes
        if mode == "fwd":
            return float(fwd)
        saved = sum(out.nbytes if n == "out" else tensors[n].nbytes for n in self.saved)
        grads = sum(tensors[n].nbytes for n in self.leaves)
        return float(fwd + out.nbytes + saved + grads)  # + grad_out read, saved read, grads written


# ---------------------------------------------------------------- shapes
# VGG16 ("D"): 13 convs 3x3/pad 1, BN+ReLU after each, 2x2/2 max pool after each stage.
VGG16 = [("conv1_1", 64), ("conv1_2", 64), "M", ("conv2_1", 128), ("conv2_2", 128), "M",
         ("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256), "M",
         ("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512), "M",
         ("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512), "M"]


@dataclass(frozen=True)
class Shapes:
    """The layer shapes of a VGG16 at one batch size, resolution, width and input channel count."""
    group: str
    batch: int
    resolution: int
    width: float = 1.0
    in_channels: int = 3
    hidden: int = 4096  # the classic head's hidden size (dropout acts on (batch, hidden))

    def convs(self):
        """[(names, count, (N, Cin, Cout, H, W))]: identical shapes merged (conv3_2/conv3_3, ...)."""
        out, c, h = [], self.in_channels, self.resolution
        for item in VGG16:
            if item == "M":
                h //= 2
                continue
            name, cout = item
            cout = max(1, int(round(cout * self.width)))
            _merge(out, name, (self.batch, c, cout, h, h))
            c = cout
        return out

    def activations(self):
        """[(names, count, (N, C, H, W))]: the conv outputs that BatchNorm and ReLU see."""
        out = []
        for names, _, (n, _, cout, h, w) in self.convs():
            for name in names.split("/"):
                _merge(out, name, (n, cout, h, w))
        return out

    def pools(self):
        """[(name, N, C, H, W)]: the inputs of the five 2x2 max pools."""
        out, stage, c, h = [], 1, self.in_channels, self.resolution
        for item in VGG16:
            if item == "M":
                out.append((f"pool{stage}", self.batch, c, h, h))
                stage, h = stage + 1, h // 2
            else:
                c = max(1, int(round(item[1] * self.width)))
        return out


def _merge(out: list, name: str, shape: tuple) -> None:
    for i, (names, count, s) in enumerate(out):
        if s == shape:
            out[i] = (f"{names}/{name}", count + 1, s)
            return
    out.append((name, 1, shape))


# Shape groups. "vgg16-bN": the 13 VGG16 layer shapes at 224x224 (3 input channels, as
# torchvision's); "small": VGG16 at CIFAR scale (32x32), where launch overhead matters;
# "mini": the width-1/8, 32x32, 1-channel VGG16 of the e2e cpu preset; "tiny": smoke tests.
GROUPS = {
    "vgg16-b128": Shapes("vgg16-b128", 128, 224),
    "vgg16-b32": Shapes("vgg16-b32", 32, 224),
    "small": Shapes("small", 32, 32),
    "mini": Shapes("mini", 8, 32, width=1 / 8, in_channels=1, hidden=512),
    "tiny": Shapes("tiny", 2, 32, width=1 / 32, in_channels=1, hidden=64),
}


def family_module(family: str):
    return importlib.import_module(f"benchmarks.cases.{family}")


def all_cases(groups, layers=None) -> list[Case]:
    """Every case of the given shape groups (names in GROUPS), optionally only some layers."""
    out = []
    for g in groups:
        shapes = GROUPS[g]
        for family in FAMILIES:
            for case in family_module(family).cases(shapes):
                if layers is None or case.layer in layers:
                    out.append(case)
    return out


def all_layers() -> list[str]:
    seen = []
    for case in all_cases(["tiny"]):
        if case.layer not in seen:
            seen.append(case.layer)
    return seen


def fmt_shape(*dims) -> str:
    return "x".join(str(d) for d in dims)


def mult(count: int) -> str:
    return f" (x{count})" if count > 1 else ""
