"""Custom ops: MCSConv kernels in C++ (CPU), CUDA and Triton, with a pure-PyTorch fallback."""
from . import _extension
from .backends import backends
from .mcs_conv import BACKENDS, mcs_conv, resolve_backend

if _extension.has_cpp_kernels():
    from . import mcs_cpp  # noqa: F401  (fake kernels and autograd for the C++ ops)

__all__ = ["mcs_conv", "backends", "BACKENDS", "resolve_backend"]
