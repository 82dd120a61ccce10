"""Drop-in replacements for torch.nn's CNN layers; each takes an extra keyword `backend="auto"`."""
from fusedcnn.nn.activation import ReLU
from fusedcnn.nn.batchnorm import BatchNorm2d, BatchNormReLU2d
from fusedcnn.nn.conv import Conv2d
from fusedcnn.nn.dropout import Dropout
from fusedcnn.nn.fused import ConvBNReLU2d, FusedSequential, LinearReLUDropout, fuse_chain  # Triton fused layers
from fusedcnn.nn.pooling import AdaptiveAvgPool2d, AdaptiveMaxPool2d, AvgPool2d, MaxPool2d

__all__ = [
    "Conv2d", "BatchNorm2d", "BatchNormReLU2d", "ReLU", "MaxPool2d", "AvgPool2d",
    "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "Dropout",
    "ConvBNReLU2d", "LinearReLUDropout", "FusedSequential", "fuse_chain",
]
