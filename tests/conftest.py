"""Test set-up: Triton runs under the interpreter without a GPU; fresh outputs are poisoned with NaN."""
import os

import torch

# Before fusedcnn (and triton) are imported: @triton.jit reads TRITON_INTERPRET when a kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FUSEDCNN_POISON", "1")  # unwritten output elements become NaN and fail

import pytest  # noqa: E402

import fusedcnn  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return (f"fusedcnn {fusedcnn.__version__}; torch {torch.__version__}; "
            f"backends here: {fusedcnn.available_backends()}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
