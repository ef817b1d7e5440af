"""Custom ops: MCSConv kernels in C++ (CPU), CUDA and Triton, with a pure-PyTorch fallback;
the fused first SFIConv layer in Triton; the fused BatchNorm + add + ReLU epilogue in C++ (CPU)
and Triton; 3x3 convolutions by Winograd's F(4x4, 3x3) in C++ (CPU); 1x1 convolutions as one
matrix product (C++ on the CPU, with pooled large outputs; PyTorch's ``mm`` elsewhere)."""
from . import _extension
from .backends import backends
from .conv1x1 import CONV1X1_BACKENDS, conv1x1
from .conv3x3 import CONV3X3_BACKENDS, conv3x3
from .first_layer import FIRST_LAYER_BACKENDS, first_sfi_conv
from .mcs_conv import BACKENDS, mcs_conv, resolve_backend
from .norm_act import NORM_ACT_BACKENDS, batch_norm_act

if _extension.has_cpp_kernels():
    from . import (conv1x1_cpp, mcs_cpp, norm_act_cpp,  # noqa: F401  (fakes, autograd)
                   winograd_cpp)

__all__ = ["mcs_conv", "first_sfi_conv", "batch_norm_act", "conv3x3", "conv1x1", "backends",
           "BACKENDS", "FIRST_LAYER_BACKENDS", "NORM_ACT_BACKENDS", "CONV3X3_BACKENDS",
           "CONV1X1_BACKENDS", "resolve_backend"]
