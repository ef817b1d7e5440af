"""Loading of the compiled kernels (``sficonv_ext._C``) and what they offer.

A package built without the extension works on its pure-PyTorch and Triton paths. A built
extension that fails to import (a torch upgrade, a missing library) is reported with the command
that rebuilds it, and its backends are then unavailable rather than half-loaded.
"""
import glob
import os
import warnings

import torch

from . import cxx_runtime

REBUILD_HINT = ("rebuild it against the installed torch with "
                "`pip install -e . --no-build-isolation` in the sficonv_ext checkout")

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_C = None
LOAD_ERROR = None

# The interface this Python code expects of the binary (csrc/ops.cpp kExtensionApi): a binary
# built from older sources still imports after a pull, and registering fake kernels against
# its missing ops made `import sficonv_ext` itself fail.
EXTENSION_API = "8"


def stale_reason(build_info_text):
    """Why a binary whose ``build_info()`` says ``build_info_text`` (None: it has no
    build_info) does not match these sources, or None."""
    if build_info_text is None:
        return "it predates build_info"
    pairs = dict(item.split("=", 1) for item in build_info_text.split(";") if "=" in item)
    if pairs.get("api") != EXTENSION_API:
        return (f"it was built from other sources (interface {pairs.get('api', 'unversioned')}, "
                f"these sources expect {EXTENSION_API})")
    return None


def _stale_reason():
    ops = torch.ops.sficonv_ext
    return stale_reason(ops.build_info() if hasattr(ops, "build_info") else None)


try:
    from .. import _C  # noqa: F401  (importing registers torch.ops.sficonv_ext.*)
except ImportError as error:  # never built, or built against another torch
    if glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so")) or glob.glob(
            os.path.join(_PACKAGE_DIR, "_C*.pyd")):
        LOAD_ERROR = f"sficonv_ext._C exists but failed to import ({error}); {REBUILD_HINT}"
else:
    _reason = _stale_reason()
    if _reason is not None:
        _C = None  # its ops stay registered but unused: every path falls back
        LOAD_ERROR = f"sficonv_ext._C is out of date: {_reason}; {REBUILD_HINT}"
# A build holding its own copy of libstdc++'s stream code crashes on numbered error messages
# (cxx_runtime.py): its kernels are right, so it stays in use, with a warning that says so.
RUNTIME_STATUS = (None, None) if _C is None else cxx_runtime.runtime_status(_C.__file__)
if RUNTIME_STATUS[0] == "private":
    warnings.warn(RUNTIME_STATUS[1], RuntimeWarning, stacklevel=2)
if LOAD_ERROR:
    warnings.warn(LOAD_ERROR + ". Falling back to the pure-PyTorch and Triton kernels.",
                  RuntimeWarning, stacklevel=2)


def has_cpp_kernels():
    """True when the C++ CPU kernels are loaded."""
    return _C is not None


# Decided once, at import: torch.compile cannot trace the dispatcher query inside a compiled
# function (an H100 run of test_gpu_compile_fullgraph failed in Dynamo on the call site).
_HAS_CUDA_KERNELS = _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "sficonv_ext::mcs_conv_forward", "CUDA")


def has_cuda_kernels():
    """True when the extension was compiled with its CUDA kernels."""
    return _HAS_CUDA_KERNELS


def build_info():
    """What the compiled extension says about itself, as a dict (empty when not loaded)."""
    if _C is None:
        return {}
    pairs = (item.split("=", 1) for item in torch.ops.sficonv_ext.build_info().split(";"))
    return {key: value for key, value in pairs}


def missing_extension_message(backend):
    if LOAD_ERROR:
        return f"backend={backend!r} needs the compiled extension: {LOAD_ERROR}"
    return (f"backend={backend!r} needs the compiled extension sficonv_ext._C, which was not "
            f"built; {REBUILD_HINT} (with torch and a C++ compiler installed)")
