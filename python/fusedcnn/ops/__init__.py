"""The ops: backend dispatch, torch.library registration (fake + autograd), functional entry points.

One module per layer family; python/fusedcnn/functional.py re-exports the public functions.
"""
from fusedcnn.ops import activation, batchnorm, conv, dropout, pooling  # noqa: F401
