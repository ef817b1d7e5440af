"""``batch_norm_act``: BatchNorm, then an optional residual add, then an optional ReLU, as one
step of the SFIConv networks (the epilogue of every SFIConv layer and bottleneck).

Paths: ``"torch"`` is PyTorch's BatchNorm (cuDNN/oneDNN) with an in-place add and ReLU;
``"cpp"`` the fused C++ kernels of csrc/norm_act_cpu.cpp (training mode, CPU); ``"triton"`` the
fused kernels of :mod:`.norm_act_triton` (training mode, CUDA or Triton's CPU interpreter).
Evaluation mode takes the PyTorch path on every backend (an affine map per channel, which
``fuse_for_inference`` folds away).

``"auto"`` follows the measurements:
- CPU, training mode, float32 or bfloat16 (autocast's dtype: see _CPP_AUTO_DTYPES), at least
  2**20 values (smaller layers pay more for the custom op's fixed cost than its fewer passes
  save: see _CPP_AUTO_MIN_VALUES): the C++ epilogue. On
  the project's 2-core Intel Xeon (AVX-512, 2026-11-27) SFIConv-ResNet-26 (batch 8, 256x256)
  trained 0.6-6.3% faster with it than with BatchNorm + add + ReLU in each of ten interleaved
  benchmark runs (e.g. 10.21 against 9.93 images/s in
  benchmarks/results/models_cpu_xeon_epilogue_no_mmap_2026-11-27.json). On the AMD EPYC the
  project used before, the same step gained nothing with large blocks reused (0.491 s against
  0.490 s) and lost 5-10% with glibc's defaults, so this choice follows the current machine.
  PyTorch's path is kept wherever the C++ op would change what a caller sees: a hook on the
  BatchNorm module (it would not run), a BatchNorm subclass with its own forward,
  torch.compile (inductor fuses BatchNorm, add and ReLU itself), forward-mode AD and
  torch.func transforms, other dtypes (float64 parity tests, float16: not measured),
  and inputs PyTorch would refuse (its error is the one raised).
- CUDA: on an H100 (bfloat16, [64, 256, 64, 64], benchmarks/results/fused_layers_cuda.json) the
  Triton epilogue is 1.38x faster forward but 0.83x forward+backward (float32: 1.57x, 1.09x),
  and SFIConv-ResNet-26 trained 2.5x slower with it and the fused first layer on (1216 against
  2997 images/s, benchmarks/results/models_cuda_bfloat16_gpu_check.json), so "auto" takes
  PyTorch's path there.
The Triton path stays available, tested, for the work of making it pay on GPUs.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.hooks import hooked
from . import _extension
from .ad_modes import composite_only, refuse_kernel_backend
from .mcs_conv import TRITON_DEVICE_HINT, triton_ops, triton_runs_on

NORM_ACT_BACKENDS = ("auto", "torch", "cpp", "triton")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CPP_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _triton_can_run(x, bn, residual):
    return (triton_runs_on(x) and triton_ops() is not None and bn.affine
            and bn.track_running_stats
            and x.dtype in _TRITON_DTYPES and x.numel() > 0 and x.dim() == 4
            and (residual is None or residual.shape == x.shape))


def _cpp_can_run(x, bn):
    return (_extension.has_cpp_kernels() and x.device.type == "cpu" and bn.affine
            and x.dtype in _CPP_DTYPES and x.numel() > 0 and x.dim() == 4
            and bn.weight.device == x.device)


# "auto" takes the C++ epilogue from this many values up. Forward+backward of one layer (2-core
# Intel Xeon, float32, channels_last, with residual and ReLU): the C++ op costs about 0.1 ms more
# per call (the custom op's Python autograd and running-statistics update), so it was 0.58x
# PyTorch's speed at [8, 256, 2, 2], 0.81x at [8, 64, 16, 16], level at 524,288 values
# ([8, 256, 16, 16]: 1.03x) and 1.25-1.43x from 2,097,152 up. The threshold kept the 64 px
# built-in demo (batch 32) level with PyTorch's path, which it had slowed by 1-4.5%.
_CPP_AUTO_MIN_VALUES = 1 << 20
# bfloat16 (autocast's dtype on the CPU, with float32 BatchNorm parameters) measured alike per
# layer (one-off timings: 0.58x at [8, 256, 2, 2], 1.02-1.42x at 0.5-1M values, 1.47-1.82x
# at 2M; 2.11x at [8, 256, 64, 64] in benchmarks/results/fused_layers_cpu_xeon_2026-11-27.json)
# and the model's bfloat16-autocast train step 11-17% faster in five runs (23.36 against 20.83
# images/s in benchmarks/results/models_cpu_xeon_bf16_no_mmap_2026-11-27.json, 23.64 against
# 20.77 with glibc's defaults). float16: not measured.
_CPP_AUTO_DTYPES = (torch.float32, torch.bfloat16)


def _bn_tensors(bn):
    """(name, tensor) of the BatchNorm's per-channel tensors that it has."""
    return [(name, getattr(bn, name)) for name in ("weight", "bias", "running_mean", "running_var")
            if getattr(bn, name) is not None]


def _auto_takes_cpp(x, bn, residual):
    """Whether "auto" runs the C++ epilogue for this training-mode call (module notes). Every
    BatchNorm tensor must be what the C++ path takes without a word (float32, one value per
    channel: with bfloat16 x, as autocast hands it over), so that anything PyTorch would refuse
    still meets PyTorch's own error."""
    if torch.compiler.is_compiling():  # first: no guard on the size below while tracing
        return False
    if not (x.dtype in _CPP_AUTO_DTYPES and x.numel() >= _CPP_AUTO_MIN_VALUES
            and isinstance(bn, nn.BatchNorm2d) and type(bn).forward is nn.BatchNorm2d.forward
            and _cpp_can_run(x, bn) and bn.eps > 0 and x.numel() // x.shape[1] > 1
            # a residual of another dtype: PyTorch adds it unrounded, the C++ op would round it
            and (residual is None or residual.dtype == x.dtype)):
        return False
    if bn.track_running_stats and (bn.running_mean is None or bn.running_var is None
                                   or bn.num_batches_tracked is None):
        return False
    if any(t.dtype != torch.float32 or tuple(t.shape) != (x.shape[1],)
           for _, t in _bn_tensors(bn)):
        return False
    return not hooked(bn) and not composite_only(x, residual, bn.weight, bn.bias)


def _resolve(backend, x, bn, residual):
    """The path one call takes: "torch", "cpp" or "triton" (see the module notes on "auto")."""
    if not bn.training:
        return "torch"
    if backend == "auto":
        return "cpp" if _auto_takes_cpp(x, bn, residual) else "torch"
    return backend


def _torch_path(x, bn, residual, relu, inplace_ok):
    y = bn(x)
    # In place on a fresh BatchNorm output (its backward does not need it), or when the caller
    # says x is its own temporary; a module that hands x back (nn.Identity after folding) must
    # not otherwise change the caller's tensor, nor may anything a hook on bn was handed.
    inplace = (inplace_ok or isinstance(bn, nn.BatchNorm2d)) and not hooked(bn)
    if residual is not None:
        y = y.add_(residual) if inplace else y + residual
    if relu:
        y = F.relu(y, inplace=inplace or residual is not None)
    return y


@torch.no_grad()
def _update_running_stats(bn, mean, var, count):
    if not bn.track_running_stats or bn.running_mean is None:
        return
    bn.num_batches_tracked.add_(1)
    factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
    unbiased = var * (count / max(count - 1, 1))
    bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)


def batch_norm_act(x, bn, residual=None, relu=True, backend="auto", inplace_ok=False):
    """``relu(bn(x) + residual)`` (each part optional). ``bn`` is an ``nn.BatchNorm2d`` (in
    training mode its running statistics are updated as ``nn.BatchNorm2d`` does) or any other
    module, such as the ``nn.Identity`` left where ``fuse_for_inference`` folded a BatchNorm
    away, which then runs as it is (on the PyTorch path; ``"cpp"`` and ``"triton"`` in training
    mode need an ``nn.BatchNorm2d``). ``inplace_ok=True`` lets the PyTorch path add and ReLU in
    place on what ``bn`` returns even when that is ``x`` itself (callers pass a fresh
    convolution output)."""
    if backend not in NORM_ACT_BACKENDS:
        raise ValueError(f"backend must be one of {NORM_ACT_BACKENDS}, got {backend!r}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} does not match "
                         f"{tuple(x.shape)}")
    if residual is not None and residual.device != x.device:
        # PyTorch's CPU add_ with a meta residual does nothing, and the C++ kernel would read
        # memory that is not there: refuse instead.
        raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    if residual is not None and not residual.is_floating_point():
        raise TypeError(f"residual must be a floating-point tensor, got {residual.dtype}")
    path = _resolve(backend, x, bn, residual)
    if path != "torch" and x.numel() == 0 and x.dim() == 4:
        path = "torch"  # nothing to compute: BatchNorm2d's own empty output and stats update
    if path != "torch" and composite_only(x, residual, getattr(bn, "weight", None),
                                          getattr(bn, "bias", None)):
        raise refuse_kernel_backend("batch_norm_act", backend)
    if path == "torch":
        return _torch_path(x, bn, residual, relu, inplace_ok)
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"batch_norm_act backend={backend!r} needs an nn.BatchNorm2d, got "
                        f"{type(bn).__name__}")
    if path == "cpp" and not _cpp_can_run(x, bn):
        if not _extension.has_cpp_kernels():
            raise RuntimeError(_extension.missing_extension_message("cpp"))
        raise ValueError("batch_norm_act backend='cpp' needs CPU tensors, an affine BatchNorm "
                         "and a non-empty floating 4-D input")
    if path == "triton" and not _triton_can_run(x, bn, residual):
        raise ValueError("batch_norm_act backend='triton' needs Triton, an affine BatchNorm "
                         "with running statistics and a non-empty float32/float16/bfloat16 4-D "
                         f"input ({TRITON_DEVICE_HINT})")
    channels = x.shape[1]
    for name, param in _bn_tensors(bn):
        if tuple(param.shape) != (channels,):
            # Broadcasting would otherwise run a 1-channel BatchNorm's parameters over every
            # channel (or every channel's statistics into one), with no error.
            raise ValueError(f"batch_norm_act: the BatchNorm's {name} has shape "
                             f"{tuple(param.shape)}, but x has {channels} channels")
    if x.numel() // x.shape[1] < 2:
        raise ValueError(f"expected more than 1 value per channel when training, got input "
                         f"size {tuple(x.shape)}")
    # What F.batch_norm refuses in training, refused here too (eps 0 turned a constant channel
    # into NaN; float64 parameters with float32 x ran instead of failing).
    if not bn.eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {bn.eps}")
    mixed_ok = x.dtype in (torch.float16, torch.bfloat16) and bn.weight.dtype == torch.float32
    if bn.weight.dtype != x.dtype and not mixed_ok:
        raise TypeError(f"batch_norm_act: x is {x.dtype} but the BatchNorm's parameters are "
                        f"{bn.weight.dtype} (only float16/bfloat16 x may take float32 "
                        f"parameters)")
    if residual is not None:
        residual = residual.to(x.dtype)
    nchw_in = x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    if path == "cpp":
        op = torch.ops.sficonv_ext.batch_norm_act_forward
    else:
        op = torch.ops.sficonv_ext.norm_act_train_forward
        x = x.contiguous(memory_format=torch.channels_last)
        if residual is not None:
            residual = residual.contiguous(memory_format=torch.channels_last)
    y, mean, var = op(x, bn.weight, bn.bias, residual, relu, float(bn.eps))
    _update_running_stats(bn, mean.detach(), var.detach(), x.numel() // x.shape[1])
    if path == "triton" and nchw_in:
        y = y.contiguous()  # the Triton kernels work in channels_last; the caller's layout back
    return y
