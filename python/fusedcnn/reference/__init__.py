"""The `reference` backend: every layer from first principles in plain PyTorch tensor code.

Readable, complete, and the oracle the tests compare the fast backends with.
"""
from fusedcnn.reference.activation import relu
from fusedcnn.reference.batchnorm import batch_norm, batch_norm_stats
from fusedcnn.reference.conv import conv2d
from fusedcnn.reference.dropout import dropout, dropout_keep
from fusedcnn.reference.pooling import adaptive_avg_pool2d, adaptive_max_pool2d, avg_pool2d, max_pool2d

__all__ = ["relu", "batch_norm", "batch_norm_stats", "conv2d", "dropout", "dropout_keep", "max_pool2d",
           "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d"]
