"""Every layer on every backend for every floating dtype on CPU (float32, float64, float16, bfloat16), NCHW and NHWC,
forward and backward against torch computing in float64; empty batches (N = 0) against torch; and "auto" passing
over a backend that cannot run the input's dtype on its device.

Oracle: the same torch.nn.functional expression in float64 on copies of the inputs (the dropout mask taken from
the reference backend's Philox stream for the same seed, or from the output itself for the torch backend).
float16/bfloat16 results must stay within 2x torch's own error in that dtype plus the dtype's tolerance
(helpers.check); float32 and float64 within the dtype's tolerance.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import fusedcnn
from fusedcnn import backends
from helpers import backend_params, check, randn

FN = fusedcnn.functional
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
P = 0.4          # dropout probability
EPS, MOMENTUM = 1e-5, 0.1


def _name(dtype) -> str:
    return str(dtype).split(".")[-1]


# ------------------------------------------------------------------------------------------- the layers
class Case:
    """One layer: make(n, dtype) -> {name: tensor} (float tensors requiring grad are the differentiated inputs;
    running statistics are updated in place), ours(t, backend) -> output, theirs(t, keep) -> torch's output
    (keep: the dropout mask as a bool tensor of the output's shape, or None)."""

    def __init__(self, name, make, ours, theirs, *, four_d=True, dropout=False, scale=1.0):
        self.name, self.make, self.ours, self.theirs = name, make, ours, theirs
        self.four_d, self.dropout, self.scale = four_d, dropout, scale


def _x(n, dtype, c=3, h=6, w=6):
    return randn(n, c, h, w, dtype=dtype) * 1.5 + 0.25


def _param(*shape, dtype, lo=None, hi=None):
    t = torch.empty(*shape).uniform_(lo, hi) if lo is not None else torch.randn(*shape)
    return t.to(dtype).requires_grad_()


def _bn_state(dtype, c=3):
    return dict(rm=torch.randn(c).to(dtype), rv=torch.rand(c).add(0.5).to(dtype),
                bw=_param(c, dtype=dtype, lo=0.5, hi=1.5), bb=_param(c, dtype=dtype, lo=-0.5, hi=0.5))


def _conv_make(c_in, c_out, k, groups=1, bias=True, h=6):
    def make(n, dtype):
        t = dict(x=_x(n, dtype, c_in, h, h), w=_param(c_out, c_in // groups, k, k, dtype=dtype) / (c_in * k) ** 0.5)
        t["w"] = t["w"].detach().requires_grad_()
        if bias:
            t["b"] = _param(c_out, dtype=dtype)
        return t
    return make


def _bn_make(n, dtype):
    return dict(x=_x(n, dtype), **_bn_state(dtype))


def _conv_bn_make(n, dtype):
    t = _conv_make(3, 4, 3)(n, dtype)
    t.update(_bn_state(dtype, 4))
    return t


def _chain_make(n, dtype):
    """Two Conv+BN+ReLU layers (triton: the second applies the first's BatchNorm+ReLU in its input prologue)."""
    t = _conv_bn_make(n, dtype)
    t2 = _conv_make(4, 5, 3, bias=False)(n, dtype)
    t.update(w2=t2["w"], **{k + "2": v for k, v in _bn_state(dtype, 5).items()})
    return t


def _torch_conv_bn_relu(t, x, w, b, sfx="", pool=False):
    y = F.relu(F.batch_norm(F.conv2d(x, w, b, padding=1), t["rm" + sfx], t["rv" + sfx], t["bw" + sfx],
                            t["bb" + sfx], True, MOMENTUM, EPS))
    return F.max_pool2d(y, 2, 2) if pool else y


def _ours_conv_bn_relu(t, x, w, b, backend, sfx="", pool=False, defer=False):
    return FN.conv_bn_relu(x, w, b, t["rm" + sfx], t["rv" + sfx], t["bw" + sfx], t["bb" + sfx], True, MOMENTUM,
                           EPS, 1, 1, pool=pool, defer=defer, backend=backend)


def _masked(y, keep):
    keep = torch.empty_like(y, dtype=torch.bool).copy_(keep)   # y's memory format, as torch's dropout keeps it
    return torch.where(keep, y / (1 - P), torch.zeros((), dtype=y.dtype))


CASES = [
    Case("conv2d", _conv_make(3, 4, 3),
         lambda t, b: FN.conv2d(t["x"], t["w"], t["b"], padding=1, backend=b),
         lambda t, keep: F.conv2d(t["x"], t["w"], t["b"], padding=1)),
    Case("conv2d_tiled", _conv_make(16, 8, 3, bias=False, h=4),   # C_in/groups >= 16: triton's tiled K loop
         lambda t, b: FN.conv2d(t["x"], t["w"], None, padding=1, backend=b),
         lambda t, keep: F.conv2d(t["x"], t["w"], None, padding=1)),
    Case("conv2d_s2_g2_im2col", _conv_make(4, 6, 3, groups=2, h=7),
         lambda t, b: FN.conv2d(t["x"], t["w"], t["b"], stride=2, padding=1, groups=2, backend=b, algo="im2col"),
         lambda t, keep: F.conv2d(t["x"], t["w"], t["b"], stride=2, padding=1, groups=2)),
    Case("batch_norm_train", _bn_make,
         lambda t, b: FN.batch_norm(t["x"], t["rm"], t["rv"], t["bw"], t["bb"], True, MOMENTUM, EPS, backend=b),
         lambda t, keep: F.batch_norm(t["x"], t["rm"], t["rv"], t["bw"], t["bb"], True, MOMENTUM, EPS), scale=4.0),
    Case("batch_norm_eval", _bn_make,
         lambda t, b: FN.batch_norm(t["x"], t["rm"], t["rv"], t["bw"], t["bb"], False, MOMENTUM, EPS, backend=b),
         lambda t, keep: F.batch_norm(t["x"], t["rm"], t["rv"], t["bw"], t["bb"], False, MOMENTUM, EPS)),
    Case("batch_norm_relu_train", _bn_make,
         lambda t, b: FN.batch_norm_relu(t["x"], t["rm"], t["rv"], t["bw"], t["bb"], True, MOMENTUM, EPS, backend=b),
         lambda t, keep: F.relu(F.batch_norm(t["x"], t["rm"], t["rv"], t["bw"], t["bb"], True, MOMENTUM, EPS)),
         scale=4.0),
    Case("relu", lambda n, d: dict(x=_x(n, d)),
         lambda t, b: FN.relu(t["x"], backend=b), lambda t, keep: F.relu(t["x"])),
    Case("max_pool2d", lambda n, d: dict(x=_x(n, d)),
         lambda t, b: FN.max_pool2d(t["x"], 3, 2, 1, backend=b), lambda t, keep: F.max_pool2d(t["x"], 3, 2, 1)),
    Case("avg_pool2d", lambda n, d: dict(x=_x(n, d)),
         lambda t, b: FN.avg_pool2d(t["x"], 3, 2, 1, count_include_pad=False, backend=b),
         lambda t, keep: F.avg_pool2d(t["x"], 3, 2, 1, count_include_pad=False)),
    Case("adaptive_avg_pool2d", lambda n, d: dict(x=_x(n, d)),
         lambda t, b: FN.adaptive_avg_pool2d(t["x"], (4, 3), backend=b),
         lambda t, keep: F.adaptive_avg_pool2d(t["x"], (4, 3))),
    Case("adaptive_max_pool2d", lambda n, d: dict(x=_x(n, d)),
         lambda t, b: FN.adaptive_max_pool2d(t["x"], (4, 3), backend=b),
         lambda t, keep: F.adaptive_max_pool2d(t["x"], (4, 3))),
    Case("global_avg_pool", lambda n, d: dict(x=_x(n, d)),
         lambda t, b: FN.adaptive_avg_pool2d(t["x"], 1, backend=b), lambda t, keep: F.adaptive_avg_pool2d(t["x"], 1)),
    Case("global_max_pool", lambda n, d: dict(x=_x(n, d)),
         lambda t, b: FN.adaptive_max_pool2d(t["x"], 1, backend=b), lambda t, keep: F.adaptive_max_pool2d(t["x"], 1)),
    Case("dropout", lambda n, d: dict(x=_x(n, d)),
         lambda t, b: FN.dropout(t["x"], P, True, backend=b), lambda t, keep: _masked(t["x"], keep), dropout=True),
    Case("conv_bn_relu", _conv_bn_make,
         lambda t, b: _ours_conv_bn_relu(t, t["x"], t["w"], t["b"], b),
         lambda t, keep: _torch_conv_bn_relu(t, t["x"], t["w"], t["b"]), scale=4.0),
    Case("conv_bn_relu_pool", _conv_bn_make,
         lambda t, b: _ours_conv_bn_relu(t, t["x"], t["w"], t["b"], b, pool=True),
         lambda t, keep: _torch_conv_bn_relu(t, t["x"], t["w"], t["b"], pool=True), scale=4.0),
    Case("conv_bn_relu_x2", _chain_make,
         lambda t, b: _ours_conv_bn_relu(t, _ours_conv_bn_relu(t, t["x"], t["w"], t["b"], b, defer=True), t["w2"],
                                         None, b, sfx="2"),
         lambda t, keep: _torch_conv_bn_relu(t, _torch_conv_bn_relu(t, t["x"], t["w"], t["b"]), t["w2"], None,
                                             sfx="2"), scale=8.0),
    Case("linear_relu_dropout",
         lambda n, d: dict(x=randn(n, 8, dtype=d), w=_param(5, 8, dtype=d), b=_param(5, dtype=d)),
         lambda t, b: FN.linear_relu_dropout(t["x"], t["w"], t["b"], P, True, backend=b),
         lambda t, keep: _masked(F.relu(F.linear(t["x"], t["w"], t["b"])), keep), four_d=False, dropout=True),
]


def _layouts(case):
    return [False, True] if case.four_d else [False]


def _params(dtypes):
    out = []
    for case in CASES:
        for cl in _layouts(case):
            for dtype in dtypes:
                for b in backend_params():
                    out.append(pytest.param(case, cl, dtype, b.values[0], marks=b.marks,
                                            id=f"{case.name}-{'nhwc' if cl else 'nchw'}-{_name(dtype)}-{b.values[0]}"))
    return out


# ------------------------------------------------------------------------------------------- running a case
def _copy(t: dict, dtype=None, channels_last=False) -> dict:
    """Fresh leaves (same values, optionally another dtype), x channels_last when asked."""
    out = {}
    for k, v in t.items():
        c = v.detach().clone() if dtype is None else v.detach().to(dtype)
        if k == "x" and channels_last:
            c = c.contiguous(memory_format=torch.channels_last)
        out[k] = c.requires_grad_(v.requires_grad)
    return out


def _leaves(t: dict) -> list[str]:
    return [k for k, v in t.items() if v.requires_grad]


def _forward_backward(fn, t: dict, grad_seed: int):
    """(output, {leaf: gradient}) with a fresh random output gradient (the same for the same seed and shape)."""
    out = fn(t)
    gen = torch.Generator().manual_seed(grad_seed)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.dtype)
    if g.dim() == 4:
        g = g.contiguous(memory_format=torch.channels_last if out.is_contiguous(memory_format=torch.channels_last)
                         and not out.is_contiguous() else torch.contiguous_format)
    names = _leaves(t)
    grads = torch.autograd.grad(out, [t[k] for k in names], g) if names else ()
    return out.detach(), dict(zip(names, grads))


def _keep(case, backend, out, t64, seed):
    """The dropout mask the output used: the reference backend's Philox stream for the same seed (every backend but
    torch), else read off torch's output (kept <=> nonzero, where the pre-dropout value is nonzero)."""
    if not case.dropout:
        return None
    if backend != "torch":
        torch.manual_seed(seed)
        return FN.dropout(torch.ones(out.shape, dtype=torch.float64), P, True, backend="reference") != 0
    pre = t64["x"] if case.name == "dropout" else F.relu(F.linear(t64["x"], t64["w"], t64["b"]))
    return (out != 0) | (pre.detach() == 0)


def _run_pair(case, backend, dtype, channels_last, n):
    """Ours (backend, dtype) and torch's float64 twin on the same values: (ours, t, theirs64, t64, lowp, tl)."""
    base = case.make(n, dtype)
    t = _copy(base, channels_last=channels_last)
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    ours = _forward_backward(lambda d: case.ours(d, backend), t, grad_seed=seed)
    t64 = _copy(base, torch.float64, channels_last)
    keep = _keep(case, backend, ours[0], t64, seed)
    theirs = _forward_backward(lambda d: case.theirs(d, keep), t64, grad_seed=seed)
    lowp = tl = None
    if dtype in (torch.float16, torch.bfloat16):   # torch's own error in that dtype bounds ours
        tl = _copy(base, channels_last=channels_last)
        lowp = _forward_backward(lambda d: case.theirs(d, keep), tl, grad_seed=seed)
    return ours, t, theirs, t64, lowp, tl


def _formats(y):
    return y.is_contiguous(), y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------- every dtype
@pytest.mark.parametrize("case,channels_last,dtype,backend", _params(DTYPES))
def test_forward_backward_matches_torch_float64(case, channels_last, dtype, backend):
    (y, grads), t, (y64, grads64), t64, lowp, tl = _run_pair(case, backend, dtype, channels_last, n=2)
    assert y.dtype == dtype and y.shape == y64.shape
    assert _formats(y) == _formats(y64), f"memory format {_formats(y)} != torch's {_formats(y64)}"
    check(y, y64, lowp[0] if lowp else None, dtype, scale=case.scale, msg="output")
    for k, g64 in grads64.items():
        assert grads[k].dtype == t[k].dtype, f"d{k} dtype"
        check(grads[k], g64, lowp[1][k] if lowp else None, dtype, scale=case.scale, msg=f"d{k}")
    for k in ("rm", "rv", "rm2", "rv2"):   # running statistics updated like torch's
        if k in t:
            check(t[k], t64[k], tl[k] if tl else None, dtype, scale=case.scale, msg=k)


# ------------------------------------------------------------------------------------------- empty batches
@pytest.mark.parametrize("case,channels_last,dtype,backend", _params([torch.float32]))
def test_empty_batch_matches_torch(case, channels_last, dtype, backend):
    """N = 0, forward and backward: torch's output shape, zero parameter gradients, running statistics untouched
    (DDP's uneven last batches)."""
    (y, grads), t, (y64, grads64), t64, _, _ = _run_pair(case, backend, dtype, channels_last, n=0)
    assert y.dtype == dtype and y.shape == y64.shape and y.numel() == 0
    for k, g64 in grads64.items():
        assert grads[k].shape == g64.shape and grads[k].dtype == t[k].dtype, f"d{k}"
        assert torch.equal(grads[k].double(), g64), f"d{k}: {grads[k]} != torch's {g64}"
    for k in ("rm", "rv", "rm2", "rv2"):
        if k in t:
            assert torch.equal(t[k].double(), t64[k]), f"{k}: {t[k]} != torch's {t64[k]}"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bnrelu"])
def test_batchnorm_module_empty_batch(backend, momentum, relu):
    """BatchNorm2d / BatchNormReLU2d in training on an empty batch: torch.nn.BatchNorm2d's buffers afterwards
    (num_batches_tracked counts the call; running statistics untouched), zero gradients."""
    cls = fusedcnn.nn.BatchNormReLU2d if relu else fusedcnn.nn.BatchNorm2d
    ours, theirs = cls(3, momentum=momentum, backend=backend), torch.nn.BatchNorm2d(3, momentum=momentum)
    with torch.no_grad():
        theirs.running_mean.normal_()
        theirs.running_var.uniform_(0.5, 1.5)
        theirs.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())
    for _ in range(2):
        x = randn(0, 3, 4, 4, requires_grad=True)
        y = ours(x)
        y.sum().backward()
        theirs(x.detach()).sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    assert torch.equal(ours.weight.grad, theirs.weight.grad) and torch.equal(ours.bias.grad, theirs.bias.grad)


# ------------------------------------------------------------------------------------------- "auto" and dtypes
def _fake(device_type: str, dtype: torch.dtype):
    """What resolve() reads of a tensor: its device (and is_cpu / is_cuda) and dtype (a CUDA one without a GPU)."""
    return types.SimpleNamespace(device=torch.device(device_type), is_cpu=device_type == "cpu",
                                 is_cuda=device_type == "cuda", dtype=dtype)


def test_auto_skips_a_backend_without_the_dtype(monkeypatch):
    """On CUDA the cpp BatchNorm and pooling kernels take no float64: "auto" neither measures cpp there for float64
    nor puts it first in a static order; float32 does both; a layer whose cpp kernels take float64 (conv) keeps
    cpp."""
    from fusedcnn import autotune
    monkeypatch.setitem(backends._import_errors, "triton", "the triton package is not installed")
    monkeypatch.setitem(backends._import_errors, "cpp", None)
    monkeypatch.setattr(backends, "cpp_built_with_cuda", lambda: True)
    monkeypatch.setitem(backends._AUTO_ORDER, "cuda", ("cpp", "torch"))  # a static order with cpp first
    for family in ("batchnorm", "pooling", "fused"):
        assert backends.static_choice(family, _fake("cuda", torch.float64)) == "torch"
        assert not backends.dtype_supported("cpp", "cuda", family, torch.float64)
        names, rejected = autotune._candidates(family, _fake("cuda", torch.float64))
        assert names == ["torch"] and "no torch.float64 kernels" in rejected["cpp"]
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert backends.static_choice(family, _fake("cuda", dtype)) == "cpp"
            assert autotune._candidates(family, _fake("cuda", dtype))[0] == ["torch", "cpp"]
    assert backends.static_choice("conv", _fake("cuda", torch.float64)) == "cpp"
    # asked for by name it is not skipped: the kernel's own error says what it takes
    assert backends.resolve("cpp", _fake("cuda", torch.float64), "batchnorm") == "cpp"


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_every_backend_takes_every_dtype_on_cpu(dtype):
    """Nothing to skip on CPU: every backend's kernels take every floating dtype there."""
    for b in backends.BACKENDS:
        for family in fusedcnn.ops.FAMILIES:
            assert backends.dtype_supported(b, "cpu", family, dtype), (b, family)


def test_auto_falls_through_to_the_next_backend_and_runs(monkeypatch):
    """A CPU order that puts a backend first, and that backend refusing float16 for conv: "auto" runs the next
    backend in the order, whose result is torch's."""
    if backends.unavailable_reason("cpp", "cpu"):
        pytest.skip(backends.unavailable_reason("cpp", "cpu"))
    monkeypatch.setitem(backends._AUTO_ORDER, "cpu", ("reference", "cpp", "torch"))
    monkeypatch.setitem(backends._UNSUPPORTED_DTYPES, ("reference", "cpu"), {"conv": (torch.float16,)})
    x, w = randn(1, 3, 5, 5, dtype=torch.float16), randn(2, 3, 3, 3, dtype=torch.float16)
    assert backends.resolve(None, x, "conv") == "cpp"
    assert backends.resolve(None, x.float(), "conv") == "reference"
    assert backends.resolve(None, x, "pooling") == "reference"
    check(FN.conv2d(x, w), F.conv2d(x.double(), w.double()), F.conv2d(x, w), msg="conv2d")


# ------------------------------------------------------------------------------------------- Triton float64 specifics
needs_triton = pytest.mark.skipif(backends.unavailable_reason("triton", "cpu") is not None,
                                  reason=f"triton cannot run here: {backends.unavailable_reason('triton', 'cpu')}")


@needs_triton
@pytest.mark.parametrize("limit, cc", [(166_912, 8), (232_448, 9)], ids=["sm_80", "sm_90"])
def test_conv_pruning_float64_tile(monkeypatch, limit, cc):
    """On a GPU, every conv GEMM launch in float64 keeps exactly the one float64 tile (64x64x32, 8 warps: no spills
    in any kernel, hooks on or off), which fits shared memory with its hooks' buffers; no other dtype keeps it. The
    Linear GEMMs run the same tile in float64."""
    from fusedcnn.triton_kernels import conv, fused
    monkeypatch.setattr(conv, "_smem_limit", lambda device: (limit, cc))
    monkeypatch.setattr(fused, "INTERPRET", False)
    for a_grad in (False, True):
        cfg = fused._linear_tiles(4096, 8, a_grad, torch.device("cpu"), m=32, prec="ieee")
        assert (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"], cfg.num_warps) == (64, 64, 32, 8)
        assert conv.smem_bytes(cfg, 8, cc, y_tile=a_grad, staged_a=a_grad, scratch=True) <= limit
    fp64_tile = {(64, 64, 32, 8)}

    def kept(kernel, dtype, m_arg, n_arg, ptr, **hooks):
        args = dict(X_ptr=torch.empty(0, dtype=dtype), G_ptr=torch.empty(0, dtype=dtype), Cout_g=64, Cg=64, Kg=576)
        configs = conv._prune(kernel, m_arg, n_arg, ptr)(conv._GPU_CONFIGS, args, **hooks)
        return configs, {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) for c in configs}

    launches = [("fwd", None, "Cout_g", "X_ptr", dict(MODE=0)), ("fwd", None, "Cout_g", "X_ptr", dict(MODE=1)),
                ("fwd", None, "Cout_g", "X_ptr", dict(MODE=0, PROLOGUE=True, STATS=True)),
                ("dgrad", None, "Cg", "G_ptr", {}), ("dgrad", None, "Cg", "G_ptr", dict(GRAD_AFFINE=True, PROLOGUE=True)),
                ("wgrad", "Cout_g", None, "G_ptr", dict(MODE=0)),
                ("wgrad", "Cout_g", None, "G_ptr", dict(MODE=0, GRAD_AFFINE=True, PROLOGUE=True, DBIAS=True)),
                ("dgrad_col", None, "Kg", "G_ptr", {})]
    for kernel, m_arg, n_arg, ptr, hooks in launches:
        configs, tiles = kept(kernel, torch.float64, m_arg, n_arg, ptr, PREC="ieee", **hooks)
        assert tiles == fp64_tile, (kernel, hooks, tiles)
        assert all(conv.smem_bytes(c, 8, cc, **conv.hook_smem_flags(kernel, hooks)) <= limit for c in configs)
        for dtype, prec in ((torch.float32, "tf32"), (torch.float32, "ieee"), (torch.bfloat16, "ieee")):
            assert not kept(kernel, dtype, m_arg, n_arg, ptr, PREC=prec, **hooks)[1] & fp64_tile, (kernel, dtype)


@needs_triton
def test_triton_float64_takes_float64_vectors():
    """float64 input: the per-channel vectors (bias, scale, shift, statistics) are float64 too -- a float32 one
    would round the float64 result to float32's precision, so it is refused by name."""
    from fusedcnn.triton_kernels import batchnorm, conv, fused
    x, w = randn(2, 3, 5, 5, dtype=torch.float64), randn(4, 3, 3, 3, dtype=torch.float64)
    one = [1, 1]
    with pytest.raises(TypeError, match="bias must be one of torch.float64"):
        conv.conv_bn_relu(x, w, torch.zeros(4), None, None, one, one, one, 1, True)
    y, mean, var = conv.conv_bn_relu(x, w, torch.zeros(4, dtype=torch.float64), None, None, one, one, one, 1, True)
    assert mean.dtype == var.dtype == torch.float64
    ref = F.conv2d(x, w, padding=1)
    check(y, ref, msg="y")
    check(mean, ref.mean((0, 2, 3)), msg="mean")
    check(var, ref.var((0, 2, 3), unbiased=False), msg="var")
    with pytest.raises(TypeError, match="scale must be one of torch.float64"):
        fused.bn_relu_apply(y, torch.ones(4), torch.zeros(4))
    assert batchnorm.batch_norm_stats(x)[0].dtype == torch.float64
