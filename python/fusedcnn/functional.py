"""torch.nn.functional's CNN layers with a `backend=` keyword (None/"auto", "torch", "reference", "triton", "cpp").

The public functions of every family's ops module (its __all__): conv2d, batch_norm, batch_norm_relu, relu,
max_pool2d, avg_pool2d, adaptive_avg_pool2d, adaptive_max_pool2d, dropout, conv_bn_relu, linear_relu_dropout.
"""
from fusedcnn.ops import FAMILY_MODULES as _FAMILY_MODULES

__all__ = [name for module in _FAMILY_MODULES.values() for name in module.__all__]
globals().update({name: getattr(module, name) for module in _FAMILY_MODULES.values() for name in module.__all__})
