"""Backend selection: names, precedence, availability and errors."""
import os

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
def test_cuda_auto_prefers_fast_backends():
    assert backends.resolve(None, torch.randn(3, device="cuda"), "activation") in ("triton", "cpp")


@pytest.mark.skipif("cpp" not in fusedcnn.available_backends("cpu"), reason="fusedcnn._C not built")
def test_stale_extension_disables_cpp_with_a_reason(monkeypatch):
    from fusedcnn.ops import _registry
    monkeypatch.setattr(_registry, "registered_backends", lambda: ["cpp"])
    monkeypatch.setitem(backends._import_errors, "cpp", None)
    _registry.register("op_from_a_newer_build", fake=lambda x: x)  # an op this _C does not have
    with pytest.raises(RuntimeError, match="fusedcnn._C is out of date .*op_from_a_newer_build.*rebuild"):
        fusedcnn.functional.relu(torch.randn(3), backend="cpp")
