"""The `reference` backend: every layer from first principles in plain PyTorch tensor code.

Readable, complete, and the oracle the tests compare the fast backends with.
"""
from fusedcnn.reference.activation import relu
from fusedcnn.reference.dropout import dropout, dropout_keep

__all__ = ["relu", "dropout", "dropout_keep"]
