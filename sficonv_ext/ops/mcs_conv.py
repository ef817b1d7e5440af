"""``mcs_conv``: the public MCSConv op, validated and dispatched to a backend."""
import os
import sys

import torch

from . import _extension
from .ad_modes import composite_only, refuse_kernel_backend
from .autocast import autocast_inputs, constrain_before_autocast
from .mcs_torch import mcs_conv_torch

BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")

_triton_module = None
_triton_error = None


def triton_ops():
    """The Triton op module, imported on first use (None if Triton cannot be imported). The
    fused first-layer op is registered alongside."""
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            from . import first_layer_triton, mcs_triton, norm_act_triton  # noqa: F401  (ops)
            _triton_module = mcs_triton
        except Exception as error:  # no triton, or a triton that does not match torch
            _triton_error = f"{type(error).__name__}: {error}"
    return _triton_module


def _triton_interpreting():
    triton = sys.modules.get("triton")
    knobs = getattr(getattr(triton, "knobs", None), "runtime", None)
    if knobs is not None and hasattr(knobs, "interpret"):
        return bool(knobs.interpret)  # the setting Triton itself reads (env or code)
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def triton_runs_on(x):
    """Whether a Triton kernel can run on ``x``'s device: a GPU, or the CPU through Triton's
    interpreter (``TRITON_INTERPRET=1``, set before triton is imported)."""
    return x.is_cuda or _triton_interpreting()


TRITON_DEVICE_HINT = ("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1, set before "
                      "triton is imported, for Triton's CPU interpreter)")


def triton_error():
    triton_ops()
    return _triton_error


def _validate(x, weight, eps, backend, constrained=True):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"mcs_conv: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"mcs_conv: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"mcs_conv: weight must be [C, 1, k, k], got shape "
                         f"{tuple(weight.shape)}")
    if weight.shape[-1] % 2 == 0:
        raise ValueError(f"mcs_conv: kernel size must be odd, got {weight.shape[-1]}")
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"mcs_conv: weight has {weight.shape[0]} channels but x has "
                         f"{x.shape[1]}")
    if x.device != weight.device:
        raise ValueError(f"mcs_conv: x is on {x.device} but weight is on {weight.device}")
    if not x.is_floating_point():
        raise TypeError(f"mcs_conv: expected a floating dtype, got {x.dtype}")
    if x.dtype != weight.dtype:
        raise TypeError(f"mcs_conv: x is {x.dtype} but weight is {weight.dtype}")
    if not eps > 0:
        raise ValueError(f"mcs_conv: eps must be positive, got {eps}")
    # The PyTorch path clamps in the filter's dtype (the kernels in at least float32): an eps
    # that rounds to 0 or overflows there would let a zero-sum channel divide by 0.
    info = torch.finfo(weight.dtype)
    if constrained and not info.tiny * info.eps <= eps <= info.max:
        raise ValueError(f"mcs_conv: eps={eps} is not representable in {weight.dtype} (it must "
                         f"lie in [{info.tiny * info.eps:.3g}, {info.max:.3g}])")


def channels_innermost(t):
    """Whether t's channels are its innermost dimension (channels_last, or a view laid out so):
    the layout the channels_last Triton kernels index."""
    return t.shape[1] > 1 and t.stride(1) == 1


def _is_channels_last(x):
    return x.dim() == 4 and x.shape[1] > 1 and not x.is_contiguous() \
        and x.is_contiguous(memory_format=torch.channels_last)


def _cpu_auto(x, weight):
    # Measured on a 2-core AVX-512 CPU, [8, 64, 64, 64] (benchmarks/results/mcs_cpu.json): the
    # C++ kernels win by 5-15x wherever the weight gradient or the NCHW layout is involved. A
    # frozen filter on channels_last input runs only the forward and the input gradient: there
    # ours are 1.08-1.30x oneDNN's depthwise kernels in float32 (two runs) and far ahead in
    # float16. oneDNN's bfloat16 forward is faster (0.35 against 0.48 ms on the AMD EPYC, 0.93
    # against 1.02 ms on the Intel Xeon, one-off), but with the input gradient ours are (forward
    # + backward 2.13 against 3.20 ms on the Xeon; input gradient 0.96 against 1.78 ms in
    # benchmarks/results/mcs_cpu_xeon_channels_last_2026-11-27.json): bfloat16 keeps oneDNN
    # only where no input gradient will be asked for (inference, or an input that needs none). A
    # reentrant torch.utils.checkpoint runs its first forward without gradients (oneDNN) and the
    # recomputation with them (ours): the two agree to bfloat16 rounding, not bit for bit.
    if not _extension.has_cpp_kernels():
        return "torch"
    frozen = weight is None or not weight.requires_grad
    needs_input_grad = torch.is_grad_enabled() and x.requires_grad
    onednn = (frozen and not needs_input_grad and _is_channels_last(x)
              and x.dtype == torch.bfloat16)
    return "torch" if onednn else "cpp"


def resolve_backend(backend, x, weight=None):
    """The backend that ``backend`` means for tensor ``x`` (raises if it is unavailable)."""
    if backend == "auto":
        if x.is_cuda:
            # Measured on an H100 (benchmarks/results/mcs_cuda.json): on channels_last input
            # cuDNN's depthwise kernels beat ours (0.4-0.9x for most phases); on NCHW the CUDA
            # kernels win (1.4-2.8x).
            if _is_channels_last(x):
                return "torch"
            if _extension.has_cuda_kernels():
                return "cuda"
            triton_fits = x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            return "triton" if triton_fits and triton_ops() is not None else "torch"
        return _cpu_auto(x, weight)
    if backend == "cpp":
        if x.is_cuda:
            raise ValueError("backend='cpp' runs the C++ CPU kernels; for CUDA tensors use "
                             "backend='cuda'")
        if not _extension.has_cpp_kernels():
            raise RuntimeError(_extension.missing_extension_message(backend))
    if backend == "cuda":
        if not x.is_cuda:
            raise ValueError("backend='cuda' needs CUDA tensors; on the CPU use 'cpp' or 'auto'")
        if not _extension.has_cuda_kernels():
            raise RuntimeError(_extension.missing_extension_message(backend) +
                               " (the build needs nvcc and a CUDA build of torch)")
    if backend == "triton" and triton_ops() is None:
        raise RuntimeError(f"backend='triton' is unavailable: {_triton_error}")
    if backend == "triton" and not triton_runs_on(x):
        raise ValueError(f"backend='triton' got a tensor on {x.device}: {TRITON_DEVICE_HINT}")
    return backend


def _apply_autocast(x, weight, constrained, eps):
    # Under autocast the previous layer hands over a low-precision x while the filter stays
    # float32: cast both to the autocast dtype, as autocast does for F.conv2d (a raw filter
    # constrained first: see constrain_before_autocast).
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor):
        weight, constrained = constrain_before_autocast(x.device.type, weight, constrained, eps)
        x, weight = autocast_inputs(x.device.type, x, weight)
    return x, weight, constrained


def mcs_conv(x, weight, *, constrained=True, eps=1e-6, backend="auto"):
    """Depthwise ``k x k`` MCSConv, stride 1, padding ``k // 2``, no bias.

    ``x``: ``[N, C, H, W]``; ``weight``: ``[C, 1, k, k]``, k odd. ``constrained=True`` applies
    the SPEC section 1 constraint to ``weight`` inside the kernel (differentiably);
    ``constrained=False`` is a plain depthwise convolution. The output has x's memory format
    (channels_last stays channels_last); under autocast both inputs are cast to the autocast
    dtype, a raw filter (``constrained=True``) after its constraint. ``backend``: "auto" (on
    the CPU the C++ kernels, except PyTorch's oneDNN path for a frozen filter on bfloat16
    channels_last input that needs no gradient, which measured faster; on a GPU PyTorch's
    cuDNN path for channels_last input and the CUDA kernels for NCHW (else Triton, else
    PyTorch), as measured on an H100), "torch", "cpp", "cuda" or "triton". Under forward-mode
    AD or a ``torch.func`` transform "auto" takes the PyTorch path, the only one with a jvp
    formula.
    """
    x, weight, constrained = _apply_autocast(x, weight, constrained, eps)
    _validate(x, weight, eps, backend, constrained)
    if composite_only(x, weight):
        if backend not in ("auto", "torch"):
            raise refuse_kernel_backend("mcs_conv", backend)
        chosen = "torch"
    else:
        chosen = resolve_backend(backend, x, weight)
    if chosen == "torch":
        return mcs_conv_torch(x, weight, constrained, eps)
    if chosen == "triton":
        return torch.ops.sficonv_ext.mcs_conv_triton_forward(x, weight, constrained, float(eps))
    return torch.ops.sficonv_ext.mcs_conv_forward(x, weight, constrained, float(eps))
