"""Dropout: the Philox stream (against tl.rand itself), masks bit-identical across backends, every backend
against torch.nn.Dropout's semantics, backward, opcheck, bad input."""
import math

import pytest
import torch

import fusedcnn
from fusedcnn import reference
from fusedcnn.ops._registry import op
from fusedcnn.reference import philox
from helpers import FAST_CPU_BACKENDS, backend_params, randn

F = fusedcnn.functional

# Seeds as the ops receive them (int64), including the key words' edge cases.
SEEDS = [0, 1, 12345, -1, -(2**63), 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, -987654321987]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Tiny shapes: the Triton interpreter is slow. 4-D ones also run NHWC.
SHAPES = [(257,), (3, 5, 7), (2, 3, 5, 7), (2, 5, 3, 4), (1, 2, 3, 2, 4)]


def _expected(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The docs/ARCHITECTURE.md definition written out independently of reference.dropout: x * (u > p ? scale : 0)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    u = philox.rand(seed, torch.arange(x.numel()).view(x.shape))
    keep = u > torch.tensor(p, dtype=torch.float32)
    factor = torch.where(keep, torch.tensor(1.0 / (1.0 - p), dtype=acc), torch.tensor(0.0, dtype=acc))
    return (x.to(acc) * factor).to(x.dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(-1).view(torch.uint8),
                                                                     b.contiguous().view(-1).view(torch.uint8))


def _assert_matches(out: torch.Tensor, expected: torch.Tensor, backend: str, msg: str = "") -> None:
    """Bit for bit. One exception: the Triton 3.8 interpreter rounds float32 -> bfloat16 toward zero
    (a GPU rounds to nearest even), so there the mask must still match exactly and the values to 1 ulp."""
    if backend == "triton" and out.dtype == torch.bfloat16 and out.device.type == "cpu":
        assert torch.equal(out == 0, expected == 0), msg
        torch.testing.assert_close(out, expected, rtol=2**-7, atol=0, msg=msg)
    else:
        assert _same_bits(out, expected), msg


# ------------------------------------------------------------------ the stream itself
def test_reference_philox_matches_tl_rand():
    """reference Philox == tl.rand bit for bit (interpreter on CPU), seeds of every width, offsets past 2**32."""
    triton = pytest.importorskip("triton")
    import triton.language as tl
    if not torch.cuda.is_available() and not fusedcnn.backends.triton_interpreted():
        pytest.skip("tl.rand runs on CPU tensors only under TRITON_INTERPRET=1")

    @triton.jit
    def rand_kernel(OUT_ptr, OFF_ptr, seed, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        tl.store(OUT_ptr + i, tl.rand(seed, tl.load(OFF_ptr + i, mask=mask)), mask=mask)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    offsets = torch.cat([torch.arange(512), torch.tensor([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3,
                                                          2**62 + 11])])
    # A Python int seed reaches tl.rand as int32, int64 or (>= 2**63) uint64; 2**64 - 1 and -1 are the same key.
    for seed in SEEDS + [2**63, 2**64 - 1]:
        out = torch.empty(len(offsets), device=device)
        rand_kernel[(triton.cdiv(len(offsets), 256),)](out, offsets.to(device), seed, len(offsets), BLOCK=256)
        expected = philox.rand(seed, offsets)
        assert _same_bits(out.cpu(), expected), f"seed {seed}: {(out.cpu() != expected).sum()} values differ"
    assert philox.seed_key(-1) == philox.seed_key(2**64 - 1) == (2**32 - 1, 2**32 - 1)


def test_philox_known_answer():
    """Philox4x32-10 against the Random123 known-answer vectors (counter = key = 0 and all ones)."""
    zero = torch.zeros(1, dtype=torch.int64)
    words = philox.philox4x32_10(0, zero, zero, zero, zero)
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    words = philox.philox4x32_10(-1, ones, ones, ones, ones)
    assert [int(w) for w in words] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_uniform_map_edges():
    """u in [0, 1): the largest word magnitudes map below 1; words w and ~w give the same u (tl.rand's map)."""
    words = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 - 2], dtype=torch.int64)
    u = philox.uniform_from_word(words)
    assert u.dtype == torch.float32 and float(u.max()) < 1.0 and float(u[0]) == 0.0
    assert torch.equal(u[2], u[3]) and torch.equal(u[0], u[4]) and torch.equal(u[1], u[5])


# ------------------------------------------------------------------ masks across backends
@pytest.mark.parametrize("backend", backend_params(("triton", "cpp")))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_masks_bit_identical_to_reference(backend, shape):
    x = randn(*shape)
    for seed, p in zip(SEEDS, [0.5, 0.1, 0.3, 0.9, 0.25, 0.7, 0.5, 0.05, 0.6, 0.45, 0.33]):
        out = op(backend, "dropout")(x, p, seed)
        assert _same_bits(out, _expected(x, p, seed)), f"seed {seed} p {p}"
        assert _same_bits(out, reference.dropout(x, p, seed))


@pytest.mark.parametrize("backend", backend_params(("reference", "triton", "cpp")))
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_dtypes_and_layouts_bit_identical(backend, dtype, channels_last):
    """Every dtype and layout gives the reference's values bit for bit; NHWC input gives the NCHW mask."""
    x = randn(2, 6, 3, 5, dtype=dtype)
    xl = x.to(memory_format=torch.channels_last) if channels_last else x
    run = reference.dropout if backend == "reference" else op(backend, "dropout")
    out = run(xl, 0.4, 2024)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    _assert_matches(out, _expected(x, 0.4, 2024), backend)


@pytest.mark.parametrize("backend", backend_params(("triton", "cpp")))
def test_noncontiguous_input(backend):
    """A transposed / sliced input uses the logical index too (the kernels copy it dense first)."""
    base = randn(6, 10)
    for x in (base.t(), base[:, ::3], base.t()[1:4]):
        assert _same_bits(op(backend, "dropout")(x, 0.5, 7), _expected(x.contiguous(), 0.5, 7))


@pytest.mark.parametrize("backend", backend_params(("reference", "triton", "cpp")))
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_4_sigma(backend, p):
    n = 4096 if backend == "triton" else 50_000
    x = torch.ones(n)
    run = reference.dropout if backend == "reference" else op(backend, "dropout")
    kept = (run(x, p, 99) != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n), kept


@pytest.mark.parametrize("backend", backend_params())
def test_fresh_seed_per_call_and_manual_seed_reproduces(backend):
    x = randn(8, 40)
    torch.manual_seed(123)
    a, b = F.dropout(x, 0.5, backend=backend), F.dropout(x, 0.5, backend=backend)
    assert not torch.equal(a != 0, b != 0), "two calls gave the same mask"
    torch.manual_seed(123)
    assert torch.equal(F.dropout(x, 0.5, backend=backend), a)
    assert torch.equal(F.dropout(x, 0.5, backend=backend), b)


def test_different_seeds_different_masks():
    masks = [reference.dropout_keep(seed, (64, 64), 0.5) for seed in SEEDS]
    for i in range(len(masks)):
        for j in range(i):
            assert not torch.equal(masks[i], masks[j]), (SEEDS[i], SEEDS[j])


def test_all_backends_draw_the_same_seed():
    """Same torch.manual_seed -> reference, triton and cpp give the same output through the functional API."""
    x = randn(2, 3, 4, 5)
    outs = {}
    for backend in ["reference"] + FAST_CPU_BACKENDS:
        torch.manual_seed(5)
        outs[backend] = F.dropout(x, 0.3, backend=backend)
    for backend, out in outs.items():
        assert _same_bits(out, outs["reference"]), backend


# ------------------------------------------------------------------ backward
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_backward_regenerates_forward_mask(backend, dtype, channels_last):
    p = 0.35
    x = randn(2, 3, 4, 5, dtype=dtype, channels_last=channels_last, requires_grad=True)
    y = fusedcnn.nn.Dropout(p, backend=backend)(x)
    grad = randn(2, 3, 4, 5, dtype=dtype)
    (gx,) = torch.autograd.grad(y, x, grad)
    kept = y.detach() != 0  # x is never 0, so a zero output is a dropped element
    assert 0 < kept.sum() < kept.numel()
    if backend == "torch":
        torch.testing.assert_close(gx, grad * kept / (1 - p), rtol=1e-2, atol=1e-2)
        return
    factor = torch.where(kept, torch.tensor(1 / (1 - p), dtype=torch.float32), torch.tensor(0.0))
    _assert_matches(gx, (grad.float() * factor).to(dtype), backend)
    _assert_matches(y.detach(), (x.detach().float() * factor).to(dtype), backend)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", backend_params(("reference", "triton", "cpp")))
def test_double_backward(backend):
    """The backward is the same dropout, itself differentiable (second derivative = the mask again)."""
    x = randn(5, 6, requires_grad=True)
    torch.manual_seed(1)
    y = F.dropout(x, 0.5, backend=backend)
    g = randn(5, 6, requires_grad=True)
    (gx,) = torch.autograd.grad(y, x, g, create_graph=True)
    (gg,) = torch.autograd.grad(gx.sum(), g)
    assert torch.equal(gg, (y != 0).float() * 2.0)


# ------------------------------------------------------------------ torch.nn.Dropout's behaviour
@pytest.mark.parametrize("backend", backend_params())
def test_p0_p1_eval_inplace(backend):
    x = randn(3, 4, 5)
    assert F.dropout(x, 0.0, backend=backend) is x or torch.equal(F.dropout(x, 0.0, backend=backend), x)
    assert torch.equal(F.dropout(x, 0.7, training=False, backend=backend), x)
    m = fusedcnn.nn.Dropout(0.7, backend=backend).eval()
    assert torch.equal(m(x), x)
    z = F.dropout(x, 1.0, backend=backend)
    assert torch.equal(z, torch.zeros_like(x))
    # NaN: dropped elements are x * 0, so NaN stays NaN as in torch (p = 1 included)
    nan = torch.full((50,), float("nan"))
    assert torch.isnan(F.dropout(nan, 1.0, backend=backend)).all()
    assert torch.isnan(F.dropout(nan, 0.5, backend=backend)).all()
    # inplace: same values as out of place with the same seed, written into the input
    torch.manual_seed(3)
    expected = F.dropout(x, 0.4, backend=backend)
    xi = x.clone()
    torch.manual_seed(3)
    out = F.dropout(xi, 0.4, inplace=True, backend=backend)
    assert out.data_ptr() == xi.data_ptr() and torch.equal(xi, expected)
    xi = x.clone()
    assert fusedcnn.nn.Dropout(1.0, inplace=True, backend=backend)(xi).data_ptr() == xi.data_ptr()
    assert torch.equal(xi, torch.zeros_like(x))


def test_module_matches_torch_api():
    assert repr(fusedcnn.nn.Dropout(0.3, inplace=True)) == repr(torch.nn.Dropout(0.3, inplace=True))
    assert isinstance(fusedcnn.nn.Dropout(), torch.nn.Dropout)
    assert fusedcnn.nn.Dropout().state_dict() == {}


@pytest.mark.parametrize("backend", backend_params(("reference", "triton", "cpp")))
def test_empty_and_odd_shapes(backend):
    for shape in [(0,), (0, 3, 4, 4), (7,), ()]:
        x = torch.randn(shape)
        torch.manual_seed(0)
        out = F.dropout(x, 0.5, backend=backend)
        torch.manual_seed(0)
        assert out.shape == x.shape and _same_bits(out, F.dropout(x, 0.5, backend="reference"))


# ------------------------------------------------------------------ compiled ops
@pytest.mark.parametrize("backend", backend_params(("triton", "cpp")))
def test_opcheck(backend):
    dropout = op(backend, "dropout")
    torch.library.opcheck(dropout, (randn(3, 4, requires_grad=True), 0.3, 12345))
    torch.library.opcheck(dropout, (randn(2, 3, 4, 5, channels_last=True, requires_grad=True), 0.5, -7))
    torch.library.opcheck(dropout, (randn(2, 3, dtype=torch.bfloat16, requires_grad=True), 0.9, 2**40))


@pytest.mark.parametrize("backend", backend_params(("cpp", "triton")))
def test_torch_compile_fullgraph(backend):
    """The seed is drawn inside the graph (an int64 SymInt reaches the op); backward regenerates the mask."""
    x = randn(4, 8, requires_grad=True)
    compiled = torch.compile(lambda t: F.dropout(t, 0.5, backend=backend), fullgraph=True)
    y = compiled(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    kept = y.detach() != 0
    assert 0 < kept.sum() < kept.numel()
    assert torch.equal(gx, kept.float() * 2.0)
    assert torch.equal(y.detach(), x.detach() * kept * 2.0)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_bad_probability(backend, p):
    msg = f"dropout probability has to be between 0 and 1, but got {p}"
    with pytest.raises(ValueError, match=msg):
        F.dropout(randn(4), p, backend=backend)
    with pytest.raises(ValueError, match=msg):
        fusedcnn.nn.Dropout(p, backend=backend)


@pytest.mark.parametrize("backend", backend_params(("triton", "cpp")))
def test_op_rejects_bad_arguments(backend):
    dropout = op(backend, "dropout")
    with pytest.raises((RuntimeError, ValueError), match="dropout probability"):
        dropout(randn(4), 1.5, 0)
    with pytest.raises((RuntimeError, TypeError), match="float"):
        dropout(torch.arange(4), 0.5, 0)


def test_bad_backend_and_input_type():
    with pytest.raises(ValueError, match="unknown backend"):
        fusedcnn.nn.Dropout(0.5, backend="cudnn")
    with pytest.raises(TypeError, match="must be Tensor"):
        F.dropout([1.0, 2.0], 0.5, backend="reference")


# ------------------------------------------------------------------ GPU
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cpp"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_masks_identical_to_cpu_reference(backend, dtype):
    for shape, fmt in [((3, 1000), torch.contiguous_format), ((4, 64, 14, 14), torch.channels_last),
                       ((2, 3, 33, 17), torch.channels_last)]:
        x = randn(*shape, dtype=dtype)
        out = op(backend, "dropout")(x.cuda().to(memory_format=fmt), 0.5, -424242)
        assert out.is_contiguous(memory_format=fmt)
        assert _same_bits(out.cpu(), _expected(x, 0.5, -424242)), (shape, fmt)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_cuda_offsets_past_2_pow_32(backend):
    """int64 indices and the counter's high word: the elements around index 2**32 follow the stream."""
    n = 2**32 + 4096
    x = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    out = op(backend, "dropout")(x, 0.5, 31337)
    del x
    lo = 2**32 - 4096
    got = out[lo:].cpu() != 0
    expected = philox.rand(31337, torch.arange(lo, n)) > 0.5
    assert torch.equal(got, expected)
