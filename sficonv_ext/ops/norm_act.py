"""``batch_norm_act``: BatchNorm, then an optional residual add, then an optional ReLU, as one
step of the SFIConv networks (the epilogue of every SFIConv layer and bottleneck).

Paths: ``"torch"`` is PyTorch's BatchNorm (cuDNN/oneDNN) with an in-place add and ReLU;
``"triton"`` the fused kernels of :mod:`.norm_act_triton` (training mode, CUDA or Triton's CPU
interpreter). ``"auto"`` takes the PyTorch path everywhere: measured on an H100 (bfloat16,
[64, 256, 64, 64], benchmarks/results/fused_layers_cuda.json) the Triton epilogue is 1.17x
faster forward but 0.63x forward+backward, and SFIConv-ResNet-26 trained 2.2x slower with it
and the fused first layer on (benchmarks/results/models_cuda_bfloat16.json, "fast" against
"fast-unfused"). It stays available, tested, for the work of making it pay.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .mcs_conv import triton_ops

NORM_ACT_BACKENDS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_can_run(x, bn, residual):
    return (triton_ops() is not None and bn.affine and bn.track_running_stats
            and x.dtype in _TRITON_DTYPES and x.numel() > 0 and x.dim() == 4
            and (residual is None or residual.shape == x.shape))


def _torch_path(x, bn, residual, relu, inplace_ok):
    y = bn(x)
    # In place on a fresh BatchNorm output (its backward does not need it), or when the caller
    # says x is its own temporary; a module that hands x back (nn.Identity after folding) must
    # not otherwise change the caller's tensor.
    inplace = inplace_ok or isinstance(bn, nn.BatchNorm2d)
    if residual is not None:
        y = y.add_(residual) if inplace else y + residual
    if relu:
        y = F.relu(y, inplace=inplace or residual is not None)
    return y


@torch.no_grad()
def _update_running_stats(bn, mean, var, count):
    bn.num_batches_tracked.add_(1)
    factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
    unbiased = var * (count / max(count - 1, 1))
    bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)


def batch_norm_act(x, bn, residual=None, relu=True, backend="auto", inplace_ok=False):
    """``relu(bn(x) + residual)`` (each part optional). ``bn`` is an ``nn.BatchNorm2d`` (in
    training mode its running statistics are updated as ``nn.BatchNorm2d`` does) or any other
    module, such as the ``nn.Identity`` left where ``fuse_for_inference`` folded a BatchNorm
    away, which then runs as it is. ``inplace_ok=True`` lets the PyTorch path add and ReLU in
    place on what ``bn`` returns even when that is ``x`` itself (callers pass a fresh
    convolution output)."""
    if backend not in NORM_ACT_BACKENDS:
        raise ValueError(f"backend must be one of {NORM_ACT_BACKENDS}, got {backend!r}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} does not match "
                         f"{tuple(x.shape)}")
    # Evaluation is an affine map per channel (which fuse_for_inference folds away): the
    # Triton kernels are for training, so eval mode takes the PyTorch path on any backend.
    if backend != "triton" or not bn.training:
        return _torch_path(x, bn, residual, relu, inplace_ok)
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"batch_norm_act backend='triton' needs an nn.BatchNorm2d, got "
                        f"{type(bn).__name__}")
    if not _triton_can_run(x, bn, residual):
        raise ValueError("batch_norm_act backend='triton' needs Triton, an affine BatchNorm "
                         "with running statistics and a non-empty float32/float16/bfloat16 4-D "
                         "input")
    if x.numel() // x.shape[1] < 2:
        raise ValueError(f"expected more than 1 value per channel when training, got input "
                         f"size {tuple(x.shape)}")
    x = x.contiguous(memory_format=torch.channels_last)
    if residual is not None:
        residual = residual.to(x.dtype).contiguous(memory_format=torch.channels_last)
    y, mean, var = torch.ops.sficonv_ext.norm_act_train_forward(x, bn.weight, bn.bias, residual,
                                                                relu, float(bn.eps))
    _update_running_stats(bn, mean.detach(), var.detach(), x.numel() // x.shape[1])
    return y
