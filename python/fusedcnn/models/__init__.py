"""Models built from fusedcnn layers."""
from fusedcnn.models.vgg import HEADS, VGG16, check_resolution, vgg16

__all__ = ["VGG16", "vgg16", "check_resolution", "HEADS"]
