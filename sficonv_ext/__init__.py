"""sficonv_ext: fast, tested SFIConv (Space-Frequency Interactive Convolution) for PyTorch.

- :mod:`sficonv_ext.models`: fast SFIConv-ResNet models, published-checkpoint interop.
- :mod:`sficonv_ext.nn`: fused SFIConv layers and MCSConv2d.
- :mod:`sficonv_ext.reference`: the pure-PyTorch reproduction of the published code.
"""
from . import models, nn, ops, reference

__version__ = "0.1.0"
__all__ = ["models", "nn", "ops", "reference", "__version__"]
