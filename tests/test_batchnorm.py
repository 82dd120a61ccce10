"""BatchNorm2d and BatchNormReLU2d: every backend against torch.nn (BatchNorm2d, BatchNorm2d + ReLU) and the reference."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

import fusedcnn
from fusedcnn.ops._registry import op
from helpers import assert_close, backend_params, randn

COMPILED = [b for b in ("triton", "cpp") if b in fusedcnn.available_backends("cpu")]
SHAPE = (2, 3, 5, 7)  # odd H, W; N = 2


def dtypes_of(backend):
    """What each backend takes on CPU: cpp also float64, the Triton interpreter float32/bf16/fp16."""
    if backend == "cpp":
        return [torch.float32, torch.float64, torch.bfloat16]
    return [torch.float32, torch.bfloat16, torch.float16]


CASES = [pytest.param(b.values[0], d, id=f"{b.values[0]}-{str(d).split('.')[-1]}", marks=b.marks)
         for b in backend_params() for d in dtypes_of(b.values[0])]


def make_pair(relu, backend, c=3, **kw):
    """(fusedcnn module, torch module(s) computing the same thing), same parameters."""
    torch_bn = torch.nn.BatchNorm2d(c, **kw)
    if torch_bn.weight is not None:
        with torch.no_grad():
            torch_bn.weight.uniform_(0.5, 1.5)
            torch_bn.bias.uniform_(-0.5, 0.5)
    cls = fusedcnn.nn.BatchNormReLU2d if relu else fusedcnn.nn.BatchNorm2d
    ours = cls(c, backend=backend, **kw)
    ours.load_state_dict(torch_bn.state_dict())
    theirs = torch.nn.Sequential(torch_bn, torch.nn.ReLU()) if relu else torch.nn.Sequential(torch_bn)
    return ours, theirs


def run(module, x, grad):
    """Forward + backward: (y, dx, dweight, dbias)."""
    x = x.detach().clone().requires_grad_()
    y = module(x)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(y, [x] + params, grad)
    return (y.detach(),) + tuple(grads)


def assert_all_close(got, want, dtype, scale=1.0, what=("y", "dx", "dweight", "dbias")):
    for g, w, name in zip(got, want, what):
        assert_close(g, w.to(g.dtype), dtype, scale=scale, msg=name)


# ----------------------------------------------------------------- forward/backward vs torch and reference
@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bnrelu"])
def test_train_step_matches_torch_and_reference(backend, dtype, channels_last, relu):
    ours, theirs = make_pair(relu, backend)
    ref, _ = make_pair(relu, "reference")
    ref.load_state_dict(ours.state_dict())
    x = randn(*SHAPE, dtype=dtype, channels_last=channels_last) * 2 + 0.5
    grad = randn(*SHAPE, dtype=dtype, channels_last=channels_last)
    got = run(ours, x, grad)
    low = dtype in (torch.float16, torch.bfloat16)
    # torch in float64: the truth for every dtype
    theirs64 = copy.deepcopy(theirs).double()
    assert_all_close(got, run(theirs64, x.double(), grad.double()), dtype, scale=2.0 if low else 1.0)
    # torch in the same dtype (not float16: torch's CPU kernel rounds differently there)
    if dtype != torch.float16:
        same = copy.deepcopy(theirs).to(dtype) if dtype == torch.float64 else copy.deepcopy(theirs)
        assert_all_close(got, run(same, x, grad), dtype, scale=2.0 if low else 1.0)
    # the reference backend in the same dtype
    ref = copy.deepcopy(ref).to(dtype) if dtype == torch.float64 else ref
    assert_all_close(got, run(ref, x, grad), dtype, scale=2.0 if low else 1.0)
    y = got[0]
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert got[1].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # running statistics after one step
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(ours, name).double(), getattr(theirs64[0], name).double(), torch.float32, msg=name)


# The cpp NHWC kernels handle rows of C channels in tiles of C * ceil(64 / C) values, the rows left over in a
# shorter run: channel counts that divide 64 or not, row counts that fill whole tiles or not.
@pytest.mark.parametrize("c,shape", [(1, (3, 5, 7)), (5, (3, 5, 7)), (8, (2, 4, 4)), (8, (3, 5, 7)),
                                     (24, (3, 5, 7)), (64, (2, 3, 3)), (100, (3, 5, 7)), (8, (4, 30, 41))],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"c{v}")
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bnrelu"])
def test_cpp_nhwc_tiles_match_torch(c, shape, relu):
    pytest.importorskip("fusedcnn._C")
    n, h, w = shape
    ours, theirs = make_pair(relu, "cpp", c=c)
    x = randn(n, c, h, w, channels_last=True) * 2 + 0.5
    grad = randn(n, c, h, w, channels_last=True)
    got = run(ours, x, grad)
    assert_all_close(got, run(copy.deepcopy(theirs).double(), x.double(), grad.double()), torch.float32)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    # one step from running_var = 1, momentum 0.1: 0.9 + 0.1 * the batch's unbiased variance
    want_var = 0.9 + 0.1 * x.double().transpose(0, 1).reshape(c, -1).var(dim=1, unbiased=True)
    assert_close(ours.running_var.double(), want_var, torch.float32, msg="running_var")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bnrelu"])
def test_running_stats_over_steps_then_eval(backend, momentum, relu):
    ours, theirs = make_pair(relu, backend, momentum=momentum)
    for step in range(3):
        x = randn(*SHAPE) * (step + 1) + step
        assert_close(ours(x), theirs(x), msg=f"step {step}")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(ours, name).double(), getattr(theirs[0], name).double(), torch.float32, msg=name)
    ours.eval()
    theirs.eval()
    x = randn(*SHAPE, channels_last=True)
    grad = randn(*SHAPE)
    assert_all_close(run(ours, x, grad), run(theirs, x, grad), torch.float32)
    assert int(ours.num_batches_tracked) == 3  # eval does not count


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)],
                         ids=["no-affine", "no-tracking", "neither"])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bnrelu"])
def test_affine_and_tracking_off(backend, affine, track, relu):
    ours, theirs = make_pair(relu, backend, affine=affine, track_running_stats=track)
    x, grad = randn(*SHAPE), randn(*SHAPE)
    what = ("y", "dx", "dweight", "dbias") if affine else ("y", "dx")
    assert_all_close(run(ours, x, grad), run(theirs, x, grad), torch.float32, what=what)
    ours.eval()
    theirs.eval()  # without tracking, eval still normalizes with batch statistics (as torch)
    assert_all_close(run(ours, x, grad), run(theirs, x, grad), torch.float32, what=what)
    assert (ours.weight is None) == (not affine) and (ours.running_mean is None) == (not track)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bnrelu"])
def test_nan_propagates_like_torch(backend, relu):
    ours, theirs = make_pair(relu, backend)
    x = randn(*SHAPE)
    x[1, 1, 2, 3] = float("nan")
    x[0, 2, 0, 0] = float("inf")
    got, want = ours(x), theirs(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert_close(got, want)
    assert torch.isnan(ours.running_mean[1]) and torch.isnan(ours.running_var[2])


MULTI_BLOCK_CASES = [pytest.param(b.values[0], programs, id=f"{b.values[0]}-{programs}progs", marks=b.marks)
                     for b in backend_params() if b.values[0] != "torch"
                     for programs in ((64, 1) if b.values[0] == "triton" else (None,))]


@pytest.mark.parametrize("backend,programs", MULTI_BLOCK_CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_multi_block_statistics_are_stable(backend, programs, channels_last, monkeypatch):
    """Values 1e3 standard deviations off zero, over many tiles/blocks/programs: results as float64's
    (a sum-of-squares variance, E[x^2] - E[x]^2 in float32, would be off by ~10%)."""
    if backend == "triton":  # shrink the tiles so the interpreter runs many tiles and programs
        import fusedcnn.triton_kernels.batchnorm as tk
        monkeypatch.setattr(tk, "NCHW_BLOCK_R", 16)
        monkeypatch.setattr(tk, "NHWC_TILE", 32)
        monkeypatch.setattr(tk, "COMBINE_BLOCK_Q", 4)
        # 64: many programs, each a chunk of rows; 1: one program looping over several planes
        monkeypatch.setattr(tk, "INTERPRETER_PROGRAMS", programs)
        shape = (3, 2, 9, 11)
    else:
        shape = (3, 2, 47, 49)  # cpp: planes of 2,303 > one 2,048-value block; NHWC: several row chunks
    x = randn(*shape, channels_last=channels_last) * 0.1 + 100.0
    # plain BN: with a ReLU, float32 rounding of y near 0 would flip mask bits against float64's
    ours = fusedcnn.nn.BatchNorm2d(2, backend=backend)
    theirs = torch.nn.BatchNorm2d(2).double()
    grad = randn(*shape)
    got = run(ours, x, grad)
    want = run(theirs, x.double(), grad.double())
    assert_all_close(got, want, torch.float32, scale=100.0)  # float32 x - mean: ulp(100) / 0.1 ~ 8e-5 per value
    assert_close(ours.running_var.double(), theirs.running_var, torch.float32, scale=10.0, msg="running_var")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5), (2, 3, 2, 3, 2)], ids=["2d", "3d", "5d"])
def test_functional_other_ranks(backend, shape):
    x = randn(*shape)
    rm, rv = torch.zeros(3), torch.ones(3)
    rm2, rv2 = rm.clone(), rv.clone()
    w, b = randn(3), randn(3)
    got = fusedcnn.functional.batch_norm_relu(x, rm, rv, w, b, True, 0.2, 1e-3, backend=backend)
    assert_close(got, F.relu(F.batch_norm(x, rm2, rv2, w, b, True, 0.2, 1e-3)))
    assert_close(rm, rm2)
    assert_close(rv, rv2)


# ----------------------------------------------------------------- the compiled ops themselves
def _op_samples(dtype=torch.float32):
    for channels_last in (False, True):
        x = randn(*SHAPE, dtype=dtype, channels_last=channels_last)
        g = randn(*SHAPE, dtype=dtype)
        mean, invstd = randn(3), torch.rand(3) + 0.5
        w, b = randn(3), randn(3)
        sdy, sdyx = randn(3), randn(3)
        yield "batch_norm_stats", (x,)
        yield "batch_norm_apply", (x, mean, invstd, w, b, True)
        yield "batch_norm_apply", (x, mean, invstd, None, None, False)
        yield "batch_norm_backward_reduce", (g, x, mean, invstd, w, b, True)
        yield "batch_norm_backward_elemt", (g, x, mean, invstd, w, b, sdy, sdyx, 70.0, True)
        yield "batch_norm_backward_elemt", (g, x, mean, invstd, None, None, None, None, 70.0, False)


@pytest.mark.parametrize("backend", COMPILED)
def test_opcheck(backend):
    for name, args in _op_samples():
        torch.library.opcheck(op(backend, name), args)


CPP = pytest.mark.skipif("cpp" not in COMPILED, reason="fusedcnn._C not built")


@CPP
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [SHAPE, (2, 3, 50, 50), (4, 2, 256, 300)],
                         ids=["small", "multi-block", "channel-over-cache"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cpp_train_ops_match_the_four_op_composition(dtype, shape, channels_last):
    """batch_norm_train_forward/_backward (one call each; on CPU a channel in cache is read once per pass
    from memory) give what stats -> apply and reduce -> elemt give, and pass opcheck."""
    c = shape[1]
    x = randn(*shape, dtype=dtype, channels_last=channels_last) * 2 + 0.5
    g = randn(*shape, dtype=dtype, channels_last=channels_last)
    w, b = randn(c), randn(c)
    fwd, bwd = op("cpp", "batch_norm_train_forward"), op("cpp", "batch_norm_train_backward")
    for relu in (False, True):
        # running stats of x's dtype (or float32 beside bfloat16 input, as AMP keeps them)
        stats_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        running = [randn(c, dtype=stats_dtype), torch.rand(c, dtype=stats_dtype) + 0.5]
        if relu:  # a strided running_var: updated outside the CPU kernel's channel loop
            running[1] = (torch.rand(2 * c, dtype=stats_dtype) + 0.5)[::2]
        running2 = [t.clone() for t in running]
        y, mean, var, invstd = fwd(x, w, b, *running, 0.3, 1e-5, relu)
        mean2, var2 = op("cpp", "batch_norm_stats")(x)
        invstd2 = torch.rsqrt(var2 + 1e-5)
        y2 = op("cpp", "batch_norm_apply")(x, mean2, invstd2, w, b, relu)
        for got, want in ((y, y2), (mean, mean2), (var, var2), (invstd, invstd2)):
            assert_close(got, want, dtype)
        # the running statistics: updated in place as torch's BatchNorm does (the variance unbiased)
        fusedcnn.reference.batchnorm.update_running_stats(*running2, mean2, var2, x.numel() // c, 0.3)
        for got, want in zip(running, running2):
            assert_close(got, want, stats_dtype)
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        dx, sdy, sdyx = bwd(g, x, mean, invstd, w, b, relu)
        sdy2, sdyx2 = op("cpp", "batch_norm_backward_reduce")(g, x, mean, invstd, w, b, relu)
        dx2 = op("cpp", "batch_norm_backward_elemt")(g, x, mean, invstd, w, b, sdy2, sdyx2,
                                                     float(x.numel() // c), relu)
        for got, want in ((dx, dx2), (sdy, sdy2), (sdyx, sdyx2)):
            assert_close(got, want, dtype)
    if shape == SHAPE and dtype == torch.float32:
        torch.library.opcheck(fwd, (x, w, b, torch.zeros(c), torch.ones(c), 0.1, 1e-5, True))
        torch.library.opcheck(fwd, (x, None, None, None, None, 0.1, 1e-3, False))
        torch.library.opcheck(bwd, (g, x, mean, invstd, w, b, True))
        torch.library.opcheck(bwd, (g, x, mean, invstd, None, None, False))


@pytest.mark.parametrize("backend", COMPILED)
def test_ops_reject_bad_arguments(backend):
    x = randn(*SHAPE)
    good = (randn(3), torch.rand(3) + 0.5)
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        op(backend, "batch_norm_stats")(randn(2, 3, 4))  # not 4-D
    with pytest.raises((RuntimeError, ValueError)):
        op(backend, "batch_norm_apply")(x, randn(4), good[1], None, None, False)  # wrong channel count
    with pytest.raises((RuntimeError, ValueError)):
        op(backend, "batch_norm_apply")(x, good[0], good[1], randn(2), None, False)
    with pytest.raises((RuntimeError, ValueError)):
        op(backend, "batch_norm_backward_reduce")(randn(2, 3, 5, 6), x, *good, None, None, False)  # grad shape
    with pytest.raises((RuntimeError, ValueError)):
        op(backend, "batch_norm_backward_elemt")(x, x, *good, None, None, randn(3), None, 70.0, False)
    with pytest.raises((RuntimeError, TypeError)):
        op(backend, "batch_norm_stats")(x.to(torch.int32))


def test_reference_gradcheck_float64():
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for training in (True, False):
        for relu in (False, True):
            def f(x, w, b):
                return fusedcnn.reference.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, relu)
            assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("backend", COMPILED)
def test_compiled_backward_matches_float64_gradcheck_formula(backend):
    """The fused backward against autograd through the float64 reference (cpp runs float64 itself)."""
    dtype = torch.float64 if backend == "cpp" else torch.float32
    x = randn(*SHAPE, dtype=dtype, requires_grad=True)
    w, b = torch.rand(3, dtype=dtype, requires_grad=True), randn(3, dtype=dtype, requires_grad=True)
    grad = randn(*SHAPE, dtype=dtype)
    rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    got = torch.autograd.grad(fusedcnn.functional.batch_norm_relu(x, rm, rv, w, b, True, backend=backend),
                              (x, w, b), grad)
    want = torch.autograd.grad(fusedcnn.functional.batch_norm_relu(x, rm, rv, w, b, True, backend="reference"),
                               (x, w, b), grad)
    for g, r in zip(got, want):
        assert_close(g, r)


@pytest.mark.skipif("cpp" not in COMPILED, reason="fusedcnn._C not built")
def test_torch_compile_fullgraph_cpp():
    """The training step (stats -> running update -> apply, fused backward) traces without graph breaks."""
    ours, theirs = make_pair(True, "cpp")
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x, grad = randn(*SHAPE), randn(*SHAPE)
    assert_all_close(run(compiled, x, grad), run(theirs, x, grad), torch.float32)
    assert_close(ours.running_var, theirs[0].running_var)


# ----------------------------------------------------------------- module API and bad input
@pytest.mark.parametrize("backend", backend_params())
def test_bad_input_messages_match_torch(backend):
    ours = fusedcnn.nn.BatchNormReLU2d(3, backend=backend)
    theirs = torch.nn.BatchNorm2d(3)
    cases = [randn(2, 3, 4), randn(1, 3, 1, 1), randn(2, 4, 3, 3)]
    for x in cases:
        with pytest.raises(Exception) as want:
            theirs(x)
        with pytest.raises(want.type) as got:
            ours(x)
        assert str(got.value) == str(want.value), (str(got.value), str(want.value))
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        fusedcnn.functional.batch_norm(randn(*SHAPE), None, None, training=False, backend=backend)
    with pytest.raises(NotImplementedError):
        fusedcnn.functional.batch_norm(torch.ones(2, 3, 2, 2, dtype=torch.int64), None, None, training=True,
                                       backend=backend)
    with pytest.raises(RuntimeError, match="weight should contain 3 elements not 2"):
        fusedcnn.functional.batch_norm(randn(*SHAPE), None, None, randn(2), training=True, backend=backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        fusedcnn.nn.BatchNorm2d(3, backend="cudnn")


def test_state_dict_and_repr_match_torch():
    theirs = torch.nn.BatchNorm2d(5, eps=1e-3, momentum=None)
    for cls in (fusedcnn.nn.BatchNorm2d, fusedcnn.nn.BatchNormReLU2d):
        ours = cls(5, eps=1e-3, momentum=None)
        assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())
        theirs.running_mean.uniform_()
        ours.load_state_dict(theirs.state_dict())
        assert torch.equal(ours.running_mean, theirs.running_mean)
        theirs2 = torch.nn.BatchNorm2d(5, eps=1e-3, momentum=None)
        theirs2.load_state_dict(ours.state_dict())
    assert isinstance(fusedcnn.nn.BatchNorm2d(5), torch.nn.BatchNorm2d)
    # BatchNormReLU2d also applies a ReLU: torch's BatchNorm rewrites (convert_sync_batchnorm, fusers) must not
    # mistake it for a BatchNorm and strip the ReLU.
    assert not isinstance(fusedcnn.nn.BatchNormReLU2d(5), torch.nn.modules.batchnorm._BatchNorm)
    assert repr(fusedcnn.nn.BatchNorm2d(5, eps=1e-3, momentum=None)) == repr(theirs)


# ----------------------------------------------------------------- sync BN: 2 processes over gloo
def _sync_worker(rank, world, port, backends, x, grad, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        half = x.shape[0] // world
        xs, gs = x[rank * half:(rank + 1) * half], grad[rank * half:(rank + 1) * half]
        for backend in backends:
            m = fusedcnn.nn.BatchNormReLU2d(3, backend=backend, sync=True)
            with torch.no_grad():
                m.weight.copy_(torch.linspace(0.5, 1.5, 3))
                m.bias.copy_(torch.linspace(-0.2, 0.2, 3))
            xr = xs.clone().requires_grad_()
            y = m(xr)
            dx, dw, db = torch.autograd.grad(y, (xr, m.weight, m.bias), gs)
            # weight/bias gradients are local (as torch.nn.SyncBatchNorm): their sum over ranks is the total
            torch.distributed.all_reduce(dw)
            torch.distributed.all_reduce(db)
            out[(backend, rank)] = (y.detach(), dx, dw, db, m.running_mean.clone(), m.running_var.clone())
    finally:
        torch.distributed.destroy_process_group()


def _spawn_sync(backends, x, grad):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_sync_worker, args=(2, port, backends, x, grad, out), nprocs=2, join=True)
    return dict(out)


@pytest.mark.slow  # ~30 s here: two spawned interpreters importing torch, fusedcnn and Triton
def test_sync_batchnorm_two_processes_match_one_big_batch():
    backends = [b for b in ("reference", "cpp", "triton") if b in fusedcnn.available_backends("cpu")]
    x = randn(4, 3, 3, 5) * 2 + 1
    grad = randn(4, 3, 3, 5)
    out = _spawn_sync(backends, x, grad)
    single = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        single.weight.copy_(torch.linspace(0.5, 1.5, 3))
        single.bias.copy_(torch.linspace(-0.2, 0.2, 3))
    want = run(torch.nn.Sequential(single, torch.nn.ReLU()), x, grad)
    for backend in backends:
        ys = [out[(backend, r)] for r in range(2)]
        assert_close(torch.cat([ys[0][0], ys[1][0]]), want[0], msg=f"{backend} y")
        assert_close(torch.cat([ys[0][1], ys[1][1]]), want[1], msg=f"{backend} dx")
        for r in range(2):
            assert_close(ys[r][2], want[2], msg=f"{backend} dweight")
            assert_close(ys[r][3], want[3], msg=f"{backend} dbias")
            assert_close(ys[r][4], single.running_mean, msg=f"{backend} running_mean")
            assert_close(ys[r][5], single.running_var, msg=f"{backend} running_var")


_PTX_CHECK = r"""
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fusedcnn.triton_kernels.batchnorm as tk
# Shapes a real launch sees for a VGG layer: bf16, aligned pointers, H*W, C, strides multiples of 16 (Triton
# specializes those, and arguments equal to 1, itself; here they are spelled out).
walk = {"P": "i32", "R": "i32", "C": "i32", "PS": "i64", "RS": "i32", "CS": "i32", "PG": "i32", "CHUNK": "i32",
        "n_rchunks": "i32", "Q": "i32"}
for block_c, block_r, one in [(1, 2048, "RS"), (64, 64, "CS")]:  # NCHW, NHWC
    for fn in (tk._bn_stats_kernel, tk._bn_apply_kernel, tk._bn_backward_reduce_kernel, tk._bn_backward_elemt_kernel):
        consts = {"BLOCK_R": block_r, "BLOCK_C": block_c, one: 1}
        if "RELU" in fn.arg_names:
            consts["RELU"] = True
        sig = {n: "constexpr" if n in consts else ("*bf16" if n in ("X_ptr", "Y_ptr", "G_ptr", "DX_ptr") else
               "*fp32" if n.endswith("_ptr") else walk[n]) for n in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if n not in consts and (n.endswith("_ptr") or n in ("PS", "RS", "CS", "CHUNK", "C", "R"))}
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        if "ld.global.v4" not in ptx:
            sys.exit(f"{fn.__name__} (BLOCK_C={block_c}): no 128-bit loads in the sm_90 PTX")
print("ok")
"""


@pytest.mark.slow  # compiles 8 kernels to PTX (a few seconds with a warm Triton cache, ~30 s cold)
@pytest.mark.skipif("triton" not in fusedcnn.available_backends("cpu") and not torch.cuda.is_available(),
                    reason="triton not installed")
def test_triton_kernels_compile_for_hopper_with_vector_loads():
    """The kernels compile for sm_90 (no GPU needed) and their loads are 128 bits wide in NCHW and NHWC."""
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", _PTX_CHECK], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and ("ImportError" in r.stderr or "unexpected keyword" in r.stderr):
        pytest.skip(f"this Triton's compile API differs: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


# ----------------------------------------------------------------- GPU (real VGG16 shapes)
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(8, 64, 224, 224), (16, 512, 14, 14), (3, 5, 7, 9)], ids=["wide", "deep", "odd"])
def test_cuda_matches_torch(backend, dtype, channels_last, shape):
    if backend not in fusedcnn.available_backends("cuda"):
        pytest.skip(f"{backend} unavailable on cuda")
    ours, theirs = make_pair(True, backend, c=shape[1])
    ours, theirs = ours.cuda(), theirs.cuda()
    x = (randn(*shape, dtype=dtype, channels_last=channels_last) * 2 + 3).cuda()
    grad = randn(*shape, dtype=dtype, channels_last=channels_last).cuda()
    got = run(ours, x, grad)
    want = run(theirs.double(), x.double(), grad.double())
    assert_all_close(got, want, dtype, scale=2.0 if dtype != torch.float32 else 10.0)
    assert_close(ours.running_var.double(), theirs[0].running_var.double(), torch.float32, scale=10.0)



# ---- the compiled ops check devices and dtypes (CUDA: before the CUDAGuard is built from x's device)
@pytest.mark.skipif("cpp" not in fusedcnn.available_backends("cpu"), reason="cpp backend not built")
def test_cpp_ops_check_grad_dtype_and_float8():
    x, mean, invstd = randn(*SHAPE), randn(3), torch.rand(3) + 0.5
    with pytest.raises(RuntimeError, match="grad_out must have x's dtype"):
        op("cpp", "batch_norm_backward_reduce")(randn(*SHAPE).double(), x, mean, invstd, None, None, False)
    with pytest.raises(RuntimeError, match="grad_out and x must have the same shape"):
        op("cpp", "batch_norm_backward_elemt")(randn(2, 3, 5, 6), x, mean, invstd, None, None, None, None, 1.0, False)
    with pytest.raises(RuntimeError, match="x must be a floating-point tensor .*got Float8_e5m2"):
        op("cpp", "batch_norm_stats")(x.to(torch.float8_e5m2))


@pytest.mark.cuda
def test_cpp_ops_reject_cpu_x_and_mixed_devices_on_cuda():
    if "cpp" not in fusedcnn.available_backends("cuda"):
        pytest.skip("cpp built without CUDA")
    x, mean, invstd = randn(*SHAPE), randn(3), torch.rand(3) + 0.5
    # A CUDA mean/invstd sends the call to the CUDA kernel with a CPU x: a clear error, not a CUDAGuard failure.
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor, got cpu"):
        op("cpp", "batch_norm_apply")(x, mean.cuda(), invstd.cuda(), None, None, False)
    with pytest.raises(RuntimeError, match="mean must be on cuda:0, got cpu"):
        op("cpp", "batch_norm_apply")(x.cuda(), mean, invstd.cuda(), None, None, False)
    with pytest.raises(RuntimeError, match="grad_out and x must be on the same device, got grad_out on cpu and x on cuda:0"):
        op("cpp", "batch_norm_backward_reduce")(randn(*SHAPE), x.cuda(), mean.cuda(), invstd.cuda(), None, None, False)
    with pytest.raises(RuntimeError, match="grad_out and x must be on the same device, got grad_out on cuda:0 and x on cpu"):
        op("cpp", "batch_norm_backward_elemt")(randn(*SHAPE).cuda(), x, mean.cuda(), invstd.cuda(), None, None, None,
                                               None, 1.0, False)
    if torch.cuda.device_count() > 1:
        with pytest.raises(RuntimeError, match="got grad_out on cuda:1 and x on cuda:0"):
            op("cpp", "batch_norm_backward_reduce")(randn(*SHAPE).cuda(1), x.cuda(0), mean.cuda(0), invstd.cuda(0),
                                                    None, None, False)
