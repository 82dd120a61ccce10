"""torch.nn.functional's CNN layers with a `backend=` keyword (None/"auto", "torch", "reference", "triton", "cpp")."""
from fusedcnn.ops.activation import relu
from fusedcnn.ops.batchnorm import batch_norm, batch_norm_relu
from fusedcnn.ops.conv import conv2d
from fusedcnn.ops.dropout import dropout
from fusedcnn.ops.pooling import adaptive_avg_pool2d, adaptive_max_pool2d, avg_pool2d, max_pool2d

__all__ = [
    "conv2d", "batch_norm", "batch_norm_relu", "relu", "max_pool2d", "avg_pool2d",
    "adaptive_avg_pool2d", "adaptive_max_pool2d", "dropout",
]
