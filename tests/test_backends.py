"""Backend selection: names, precedence, availability and errors."""

import pytest
import torch

import fusedcnn
from fusedcnn import backends


def test_available_backends_lists_known_names():
    here = fusedcnn.available_backends("cpu")
    assert {"torch", "reference"} <= set(here)
    assert set(here) <= set(fusedcnn.BACKENDS)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        fusedcnn.nn.ReLU(backend="cudnn")
    with pytest.raises(ValueError, match="unknown backend"):
        fusedcnn.functional.relu(torch.randn(3), backend="fast")
    with pytest.raises(ValueError, match="unknown backend"):
        with fusedcnn.use_backend("nope"):
            pass


def test_precedence_argument_context_environment(monkeypatch):
    x = torch.randn(4)
    monkeypatch.setenv("FUSEDCNN_BACKEND", "reference")
    assert backends.resolve(None, x, "activation") == "reference"
    with fusedcnn.use_backend("torch"):
        assert backends.resolve(None, x, "activation") == "torch"
        assert backends.resolve("auto", x, "activation") == "torch"
        assert backends.resolve("reference", x, "activation") == "reference"
    monkeypatch.setenv("FUSEDCNN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FUSEDCNN_BACKEND"):
        backends.resolve(None, x, "activation")


def test_auto_picks_an_available_backend(monkeypatch):
    monkeypatch.delenv("FUSEDCNN_BACKEND", raising=False)
    chosen = backends.resolve(None, torch.randn(3), "activation")
    assert chosen in fusedcnn.available_backends("cpu") and chosen != "triton"  # interpreter is never automatic


def test_missing_backend_says_why(monkeypatch):
    monkeypatch.setitem(backends._import_errors, "cpp", "built without it (test)")
    with pytest.raises(RuntimeError, match="backend 'cpp' cannot run activation on cpu tensors: built without it"):
        fusedcnn.functional.relu(torch.randn(3), backend="cpp")
    monkeypatch.setattr(backends, "triton_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fusedcnn.functional.relu(torch.randn(3), backend="triton")


@pytest.mark.skipif("cpp" not in fusedcnn.available_backends("cpu"), reason="fusedcnn._C not built")
def test_cuda_build_flag_is_reported():
    assert isinstance(backends.cpp_built_with_cuda(), bool)
    if not backends.cpp_built_with_cuda():
        assert "cpp" not in fusedcnn.available_backends("cuda")


@pytest.mark.cuda
def test_cuda_static_order_is_torch_until_a_gpu_record_says_otherwise():
    # no GPU timing is committed yet (benchmarks/NOTES.md): without measuring, auto runs torch (cuDNN) on CUDA
    assert backends.static_choice("conv", torch.randn(3, device="cuda")) == "torch"


@pytest.mark.skipif("cpp" not in fusedcnn.available_backends("cpu"), reason="fusedcnn._C not built")
def test_stale_extension_disables_cpp_with_a_reason(monkeypatch):
    from fusedcnn.ops import _registry
    monkeypatch.setattr(_registry, "registered_backends", lambda: ["cpp"])
    monkeypatch.setitem(backends._import_errors, "cpp", None)
    _registry.register("op_from_a_newer_build", fake=lambda x: x)  # an op this _C does not have
    with pytest.raises(RuntimeError, match="fusedcnn._C is out of date .*op_from_a_newer_build.*rebuild"):
        fusedcnn.functional.relu(torch.randn(3), backend="cpp")


# ---------------------------------------------------------------- the op registry: one schema table
def _schema_signature(schema) -> tuple:
    """What a caller sees of an op: its arguments (name, type, default, keyword-only) and returns (name, type)."""
    return ([(a.name, str(a.type), a.default_value if a.has_default_value() else None, a.kwarg_only)
             for a in schema.arguments],
            [(r.name, str(r.type)) for r in schema.returns])


def _fusedcnn_op_names() -> set:
    return {n.split("::", 1)[1].split(".", 1)[0] for n in torch._C._dispatch_get_all_op_names()
            if n.startswith("fusedcnn::")}


@pytest.mark.skipif(backends._cpp_import_error() is not None, reason="fusedcnn._C not built (or out of date)")
def test_schema_table_matches_the_cpp_schemas():
    """csrc/ops.cpp's schemas are the table's, word for word, and the triton op of the same name has the same
    arguments and returns; the table names every op the extension defines."""
    import fusedcnn.ops  # noqa: F401  (every family declares its ops)
    from fusedcnn.ops import _registry
    cpp_names = [name for name in _registry.SCHEMAS if _registry.has_op("cpp", name)]
    assert cpp_names
    for name in cpp_names:
        cpp = getattr(torch.ops.fusedcnn, name).default._schema
        assert str(cpp) == "fusedcnn::" + name + _registry.SCHEMAS[name][1], name
        if _registry.has_op("triton", name):
            triton = getattr(torch.ops.fusedcnn, "triton_" + name).default._schema
            assert _schema_signature(triton) == _schema_signature(cpp), name
    defined = {n for n in _fusedcnn_op_names() if not n.startswith("triton_")}
    assert defined == set(cpp_names), "ops of fusedcnn._C missing from SCHEMAS (or the reverse)"


def test_schema_table_defines_every_triton_op():
    """Every op the table gives the triton backend exists as torch.ops.fusedcnn.triton_<name>, with the table's
    schema; no triton op exists outside the table."""
    import fusedcnn.ops  # noqa: F401  (every family declares its ops)
    from fusedcnn.ops import _registry
    triton_names = [name for name in _registry.SCHEMAS if _registry.has_op("triton", name)]
    assert {"conv_bn_relu", "bn_relu_apply", "linear_relu_dropout", "relu", "conv2d"} <= set(triton_names)
    for name in triton_names:
        op = getattr(torch.ops.fusedcnn, "triton_" + name).default
        assert str(op._schema) == "fusedcnn::triton_" + name + _registry.SCHEMAS[name][1], name
        assert _registry.op("triton", name) is op
    defined = {n[len("triton_"):] for n in _fusedcnn_op_names() if n.startswith("triton_")}
    assert defined == set(triton_names)


def test_every_family_implements_every_backend():
    """Each layer family's implementation table (backend -> implementation) covers every backend."""
    import importlib

    import fusedcnn.ops
    from fusedcnn.ops import _registry
    families = getattr(fusedcnn.ops, "FAMILIES", None) or _registry.FAMILIES
    assert {"conv", "batchnorm", "activation", "pooling", "dropout", "fused"} <= set(families)
    for family in families:
        importlib.import_module(f"fusedcnn.ops.{family}")  # registers the family's implementation table
        assert family in _registry._IMPLEMENTATIONS, family
        assert set(_registry._IMPLEMENTATIONS[family]) == set(backends.BACKENDS), family
