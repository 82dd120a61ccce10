"""Fused layers (Triton backend): ConvBNReLU2d, LinearReLUDropout, FusedSequential and fuse_chain().

ConvBNReLU2d == Sequential(Conv2d, BatchNorm2d, ReLU) in training and eval (same state_dict keys as a
Conv2d + BatchNorm2d pair held as `conv` and `bn`: conv.weight, conv.bias, bn.weight, bn.bias,
bn.running_mean, bn.running_var, bn.num_batches_tracked), computed as
    y = conv(x) with the batch statistics reduced in the conv's epilogue, then relu(y*scale + shift).

Pending normalization. The normalized activation relu(y*scale + shift) need never be written when the
next layer can apply it while loading y. `ConvBNReLU2d.forward_pending(x)` returns a `PendingBN`
record (raw conv output y, per-channel fp32 scale and shift) instead of the activation; the consumer
decides how to materialize it:
  * another ConvBNReLU2d: its forward_pending / forward accept a PendingBN and apply it in the conv's
    input prologue (the activation is never stored, in forward or backward);
  * a 2x2/stride-2 MaxPool2d: PendingBN.maxpool() reads y once and writes the pooled activation;
  * anything else: PendingBN.materialize() (one elementwise pass).
`FusedSequential` (a torch.nn.Sequential) threads PendingBN records through its children that way.
Plain `forward()` of each module stays drop-in: it always returns the normalized activation.

Slot layout. A fused module takes the slot of the first layer it replaces and nn.Identity fills the slots
of the others: Sequential(Conv2d, BatchNorm2d, ReLU, ...) -> FusedSequential(ConvBNReLU2d, Identity,
Identity, ...); Conv2d, BatchNormReLU2d -> ConvBNReLU2d, Identity; Linear, ReLU[, Dropout] ->
LinearReLUDropout, Identity[, Identity]. So slot indices match the unfused model, and FusedSequential
renames the state_dict keys of each ConvBNReLU2d at slot i followed by an Identity at slot j to their
home keys: i.conv.* <-> i.*, i.bn.* <-> j.* (saving gives the unfused model's keys, loading takes either
form); parameters come in the same order in both layouts, so optimizer state dicts carry over too.
`fused_slots()` finds the fusable runs (for fuse_chain() and fusedcnn.convert()); vgg16(backend="triton")
builds the same layout directly.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.nn.modules.utils import _pair

from fusedcnn import backends
from fusedcnn.nn.batchnorm import BatchNormReLU2d
from fusedcnn.ops.fused import bn_relu_apply, bn_relu_maxpool2d, conv_bn_relu_raw, linear_relu_dropout


def _check_triton(x: Tensor, what: str) -> None:
    why = backends.unavailable_reason("triton", x.device.type)
    if why is not None:
        raise RuntimeError(f"fusedcnn: {what} runs on the triton backend only, which cannot run on "
                           f"{x.device.type} tensors: {why}")


class PendingBN:
    """A BatchNorm + ReLU not yet applied: the activation is relu(raw * scale[c] + shift[c]).

    raw: (N, C, H, W) conv output (float32|float16|bfloat16, NCHW or NHWC); scale, shift: (C,) float32
    (differentiable: they carry the gradients of BatchNorm's gamma, beta and batch statistics).
    """

    __slots__ = ("raw", "scale", "shift")

    def __init__(self, raw: Tensor, scale: Tensor, shift: Tensor):
        self.raw, self.scale, self.shift = raw, scale, shift

    def materialize(self) -> Tensor:
        """The activation, in one elementwise pass (read raw, write the activation)."""
        return bn_relu_apply(self.raw, self.scale, self.shift)

    def maxpool(self) -> Tensor:
        """max_pool2d(activation, 2, 2), reading raw once; the full-size activation is never written."""
        return bn_relu_maxpool2d(self.raw, self.scale, self.shift)


def _conv_padding(padding, kernel_size, dilation):
    """Conv2d's padding (int, tuple, "valid", "same") as a symmetric (ph, pw)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
            if any(t % 2 for t in total):
                raise NotImplementedError("ConvBNReLU2d: padding='same' with an even effective kernel size "
                                          "needs asymmetric padding, which the fused kernels do not take")
            return (total[0] // 2, total[1] // 2)
        raise ValueError(f"Invalid padding string '{padding}', should be one of {{'valid', 'same'}}")
    return _pair(padding)


class ConvBNReLU2d(torch.nn.Module):
    """relu(BatchNorm2d(Conv2d(x))) with the BatchNorm folded into the convolutions (Triton).

    Arguments are Conv2d's followed by BatchNorm2d's (num_features = out_channels). groups must be 1
    and padding_mode "zeros". forward(x) accepts a Tensor (N, C_in, H, W) or a PendingBN from a
    previous ConvBNReLU2d and returns the activation; forward_pending(x) returns a PendingBN.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                                    padding_mode, device=device, dtype=dtype)
        self.bn = torch.nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, device=device,
                                       dtype=dtype)
        self._check_supported()

    def _check_supported(self) -> None:
        if self.conv.groups != 1:
            raise NotImplementedError("ConvBNReLU2d: groups > 1 is not fused; use Conv2d + BatchNorm2d")
        if self.conv.padding_mode != "zeros":
            raise NotImplementedError(f"ConvBNReLU2d: padding_mode={self.conv.padding_mode!r} is not fused "
                                      "(only 'zeros')")
        if self.bn.num_features != self.conv.out_channels:
            raise ValueError(f"BatchNorm2d has {self.bn.num_features} features but the conv has "
                             f"{self.conv.out_channels} output channels")
        self._padding = _conv_padding(self.conv.padding, self.conv.kernel_size, self.conv.dilation)

    @classmethod
    def from_modules(cls, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> "ConvBNReLU2d":
        """A ConvBNReLU2d that holds `conv` and `bn` themselves (weights and buffers shared, not copied)."""
        if not isinstance(conv, torch.nn.Conv2d) or not isinstance(bn, torch.nn.BatchNorm2d):
            raise TypeError("from_modules expects a torch.nn.Conv2d and a torch.nn.BatchNorm2d")
        self = cls.__new__(cls)
        torch.nn.Module.__init__(self)
        self.conv, self.bn = conv, bn
        self._check_supported()
        self.train(conv.training)
        return self

    def to_modules(self) -> torch.nn.Sequential:
        """The inverse of from_modules: Sequential(conv, bn, ReLU()) sharing this module's conv and bn."""
        return torch.nn.Sequential(self.conv, self.bn, torch.nn.ReLU())

    # ---- BatchNorm's (C,)-vector arithmetic, exactly as torch.nn.modules.batchnorm._BatchNorm.forward
    def _scale_shift(self, y: Tensor, mean: Optional[Tensor], var: Optional[Tensor]):
        bn = self.bn
        factor = 0.0 if bn.momentum is None else bn.momentum
        if self.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        if mean is not None:  # batch statistics
            count = y.numel() // y.shape[1]
            if self.training and bn.track_running_stats:
                with torch.no_grad():
                    unbiased = var * (count / (count - 1))
                    bn.running_mean.copy_(bn.running_mean.float() * (1 - factor) + mean * factor)
                    bn.running_var.copy_(bn.running_var.float() * (1 - factor) + unbiased * factor)
        else:
            mean, var = bn.running_mean.float(), bn.running_var.float()
        scale = torch.rsqrt(var + bn.eps)
        if bn.affine:
            scale = scale * bn.weight.float()
            shift = bn.bias.float() - mean * scale
        else:
            shift = -mean * scale
        return scale, shift

    def forward_pending(self, input: Union[Tensor, PendingBN]) -> PendingBN:
        """Conv + batch statistics; returns the BatchNorm + ReLU as a PendingBN (not applied)."""
        pending = input if isinstance(input, PendingBN) else None
        x = pending.raw if pending is not None else input
        if not isinstance(x, Tensor):
            raise TypeError(f"conv2d() received an invalid combination of arguments - got ({type(x).__name__}, ...)")
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        _check_triton(x, "ConvBNReLU2d")
        bn = self.bn
        use_batch_stats = self.training or (bn.running_mean is None and bn.running_var is None)
        conv = self.conv
        y, mean, var = conv_bn_relu_raw(x, conv.weight, conv.bias, pending.scale if pending else None,
                                        pending.shift if pending else None, conv.stride, self._padding,
                                        conv.dilation, use_batch_stats)
        if use_batch_stats and y.numel() // max(y.shape[1], 1) <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {y.shape}")
        scale, shift = self._scale_shift(y, mean, var)
        return PendingBN(y, scale, shift)

    def forward(self, input: Union[Tensor, PendingBN]) -> Tensor:
        return self.forward_pending(input).materialize()


class LinearReLUDropout(torch.nn.Linear):
    """dropout(relu(linear(x)), p) in one GEMM (Triton); torch.nn.Linear's parameters and state_dict keys.

    The mask is DESIGN.md's Philox stream (keep iff u(seed, i) > p, i the row-major output index), the seed
    drawn per call from torch's default CPU generator; the mask is never stored (backward reads the output).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, p: float = 0.5,
                 device=None, dtype=None):
        if p < 0 or p > 1:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        super().__init__(in_features, out_features, bias, device, dtype)
        self.p = float(p)

    @classmethod
    def from_modules(cls, linear: torch.nn.Linear, dropout: Optional[torch.nn.Dropout] = None) -> "LinearReLUDropout":
        """Built from a Linear (+ the Dropout that follows its ReLU), sharing the Linear's parameters."""
        self = cls.__new__(cls)
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.p = float(dropout.p) if dropout is not None else 0.0
        self.train(linear.training)
        return self

    def extra_repr(self) -> str:
        return super().extra_repr() + f", p={self.p}"

    def forward(self, input: Tensor) -> Tensor:
        _check_triton(input, "LinearReLUDropout")
        return linear_relu_dropout(input, self.weight, self.bias, self.p, self.training)


def _is_pool2x2(m: torch.nn.Module) -> bool:
    return (isinstance(m, torch.nn.MaxPool2d) and _pair(m.kernel_size) == (2, 2)
            and _pair(m.stride if m.stride is not None else m.kernel_size) == (2, 2)
            and _pair(m.padding) == (0, 0) and _pair(m.dilation) == (1, 1)
            and not m.ceil_mode and not m.return_indices)


def _home_key(rel: str, homes: dict[str, str]) -> str:
    """A key relative to a FusedSequential, fused -> home: "0.conv.weight" -> "0.weight", "0.bn.bias" -> "1.bias"."""
    slot, _, rest = rel.partition(".")
    sub, _, leaf = rest.partition(".")
    if slot in homes and sub in ("conv", "bn"):
        return f"{slot if sub == 'conv' else homes[slot]}.{leaf}"
    return rel


def _fused_key(rel: str, homes: dict[str, str], conv_of: dict[str, str]) -> str:
    """The inverse of _home_key (conv_of: {Identity slot j: ConvBNReLU2d slot i}); fused keys pass unchanged."""
    slot, _, rest = rel.partition(".")
    if slot in homes and not rest.startswith(("conv.", "bn.")):
        return f"{slot}.conv.{rest}"
    if slot in conv_of:
        return f"{conv_of[slot]}.bn.{rest}"
    return rel


class FusedSequential(torch.nn.Sequential):
    """A Sequential that passes PendingBN records from a ConvBNReLU2d to the next layer that can fuse them
    (ConvBNReLU2d: input prologue; 2x2/s2 MaxPool2d: fused BN-ReLU-pool; nn.Identity: passed on unchanged)
    and materializes them otherwise. state_dict keys are those of the unfused layout (module docstring)."""

    def forward(self, input):
        cur = input
        for m in self:
            if isinstance(m, ConvBNReLU2d):
                cur = m.forward_pending(cur)
            elif isinstance(cur, PendingBN) and _is_pool2x2(m):
                cur = cur.maxpool()
            elif isinstance(cur, PendingBN) and type(m) is torch.nn.Identity:
                pass  # the slot of a layer fused into the ConvBNReLU2d before it
            else:
                if isinstance(cur, PendingBN):
                    cur = cur.materialize()
                cur = m(cur)
        return cur.materialize() if isinstance(cur, PendingBN) else cur

    # ---- state_dict keys: fused <i>.conv.* / <i>.bn.* <-> home <i>.* / <j>.* (module docstring)
    def _bn_homes(self) -> dict[str, str]:
        """{slot i of a ConvBNReLU2d: slot j of the nn.Identity right after it, where its BatchNorm lives}."""
        names = [n for n, m in self._modules.items() if m is not None]
        return {i: j for i, j in zip(names, names[1:])
                if isinstance(self._modules[i], ConvBNReLU2d) and type(self._modules[j]) is torch.nn.Identity}

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        if len(args) > 1:  # torch.nn.Module's deprecated positional form (destination, prefix, keep_vars)
            prefix = args[1]
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        homes = self._bn_homes()
        if homes:
            # this module's entries are the last ones written: pop and re-add them renamed, order kept
            mine = [k for k in out if k.startswith(prefix)]
            renamed = [(prefix + _home_key(k[len(prefix):], homes), out.pop(k)) for k in mine]
            out.update(renamed)
            meta = getattr(out, "_metadata", None)
            if meta is not None:  # per-module versions (BatchNorm's), filed under the home slots too
                for i, j in homes.items():
                    for sub, home in (("conv", i), ("bn", j)):
                        if f"{prefix}{i}.{sub}" in meta:
                            meta[prefix + home] = meta.pop(f"{prefix}{i}.{sub}")
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Runs before the children are loaded (they read their keys from this same dict): home keys ->
        # fused keys, in place; fused keys pass unchanged.
        homes = self._bn_homes()
        conv_of = {j: i for i, j in homes.items()}
        for k in [k for k in state_dict if k.startswith(prefix)]:
            new = prefix + _fused_key(k[len(prefix):], homes, conv_of)
            if new != k:
                state_dict[new] = state_dict.pop(k)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _fusable_conv(conv: torch.nn.Module, bn: torch.nn.Module) -> bool:
    if not (isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d)):
        return False
    if conv.groups != 1 or conv.padding_mode != "zeros" or bn.num_features != conv.out_channels:
        return False
    if getattr(bn, "sync", False):  # the fused kernels reduce statistics on this process only
        return False
    try:
        _conv_padding(conv.padding, conv.kernel_size, conv.dilation)
    except NotImplementedError:  # padding="same" that needs asymmetric padding
        return False
    return True


def _fusable_run(mods: Sequence[Optional[torch.nn.Module]], i: int, ok: Callable[[torch.nn.Module], bool]) -> int:
    """How many of mods[i:] one fused module replaces (0: none), each layer passing ok():
    Conv2d, BatchNormReLU2d (2) or Conv2d, BatchNorm2d, ReLU (3) -> ConvBNReLU2d;
    Linear, ReLU (2) or Linear, ReLU, Dropout (3) -> LinearReLUDropout."""
    a, b, c = (list(mods[i:i + 3]) + [None, None])[:3]
    if a is None or b is None or not (ok(a) and ok(b)):
        return 0
    third = c is not None and ok(c)
    if _fusable_conv(a, b):
        if isinstance(b, BatchNormReLU2d):
            return 2
        return 3 if third and isinstance(c, torch.nn.ReLU) else 0
    if isinstance(a, torch.nn.Linear) and not isinstance(a, LinearReLUDropout) and isinstance(b, torch.nn.ReLU):
        return 3 if third and isinstance(c, torch.nn.Dropout) else 2
    return 0


def fused_slots(mods: Sequence[Optional[torch.nn.Module]], ok: Callable[[torch.nn.Module], bool] = lambda m: True,
                hold: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m) -> tuple[list, dict[str, int]]:
    """The fused slot layout (module docstring) of a Sequential's children `mods`: a list of the same length
    and the counts {"conv": ConvBNReLU2d made, "linear": LinearReLUDropout made}.

    ok(m): may layer m be fused (convert() refuses subclasses and modules used twice); hold(m): the module a
    ConvBNReLU2d holds for the conv / BatchNorm m (convert() passes plain torch.nn copies sharing m's tensors).
    Parameters and buffers are shared with `mods`, never copied; training mode is kept.
    """
    out, counts, i = list(mods), {"conv": 0, "linear": 0}, 0
    while i < len(mods):
        n = _fusable_run(mods, i, ok)
        if n == 0:
            i += 1
            continue
        a, b = mods[i], mods[i + 1]
        if isinstance(a, torch.nn.Conv2d):
            out[i] = ConvBNReLU2d.from_modules(hold(a), hold(b))
            counts["conv"] += 1
        else:
            out[i] = LinearReLUDropout.from_modules(a, mods[i + 2] if n == 3 else None)
            counts["linear"] += 1
        for k in range(i + 1, i + n):
            out[k] = torch.nn.Identity().train(mods[k].training)
        i += n
    return out, counts


def fuse_chain(seq: torch.nn.Sequential) -> FusedSequential:
    """FusedSequential from seq in the fused slot layout (module docstring): Conv2d, BatchNorm2d, ReLU ->
    ConvBNReLU2d, Identity, Identity; Linear, ReLU[, Dropout] -> LinearReLUDropout, Identity[, Identity];
    everything else kept. Parameters and buffers are shared with seq (not copied); state_dict keys unchanged."""
    fused, _ = fused_slots(list(seq._modules.values()))
    out = FusedSequential(OrderedDict(zip(seq._modules, fused)))
    out.train(seq.training)
    return out
