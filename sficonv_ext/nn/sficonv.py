"""Fused SFIConv layers: activations are ONE tensor with channels ``[spatial | frequency]``.

The fusion identity (SPEC section 5): with both branches at the same resolution, the four
branch convolutions of an SFIConv layer are one convolution over the concatenated channels with
weight ``[[W_s2s, W_f2s], [W_s2f, W_f2f]]`` (rows: outputs s then f; columns: inputs s then f).
Each layer here therefore owns ONE weight parameter and runs ONE convolution.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._arguments import as_int
from ..reference.layers import spatial_channels
from ..ops.conv1x1 import conv1x1
from ..ops.conv3x3 import conv3x3
from ..ops.first_layer import first_sfi_conv
from ..ops.norm_act import batch_norm_act
from .hooks import hooked
from .mcs import MCSConv2d


def pool_before_pointwise(in_channels, out_channels):
    """Whether a stride-2 1x1 convolution should average-pool its input (True) or its output.

    Both orders compute the same function (pooling is linear and a 1x1 conv acts per pixel):
    they differ only by floating-point rounding.
    Elements moved, per input pixel: pool first reads C_in, writes and re-reads C_in/4, writes
    C_out/4; pool last reads C_in, writes and re-reads C_out, writes C_out/4. Pool first also does
    a quarter of the multiply-adds, so it wins unless C_in is much larger than C_out.
    """
    pool_first = in_channels * 1.5 + out_channels * 0.25
    pool_last = in_channels + out_channels * 2.25
    return pool_first <= pool_last


def _check_split(layer, name, channels, alpha):
    # Both branches need a channel: an empty one leaves a zero fan-out (a ZeroDivisionError in
    # the initialisation) or a layer that is not SFIConv at all.
    frequency = int(alpha * channels)
    if not 0 < frequency < channels:
        raise ValueError(f"{layer}: alpha={alpha} splits {name}={channels} into "
                         f"{channels - frequency} spatial and {frequency} frequency channels; "
                         f"both must be at least 1")


def _odd_kernel_size(layer, kernel_size):
    """``kernel_size`` as one odd int; a square tuple ``(k, k)`` is taken too, as nn.Conv2d and
    the published layers take one."""
    if isinstance(kernel_size, (tuple, list)):
        if len(kernel_size) != 2 or kernel_size[0] != kernel_size[1]:
            raise ValueError(f"{layer} kernel_size must be square, got {tuple(kernel_size)}")
        kernel_size = kernel_size[0]
    kernel_size = as_int(kernel_size, f"{layer} kernel_size")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{layer} kernel_size must be odd, got {kernel_size}")
    return kernel_size


def _check_stride(stride):
    if stride not in (1, 2):
        raise ValueError(f"SFIConv layers support stride 1 or 2, got {stride}")


def _kaiming_fan_out_(block, fan_out):
    # kaiming_normal_(mode='fan_out', nonlinearity='relu') for the published sub-convolution this
    # block of the fused weight stands for: its own fan_out, not the fused tensor's.
    with torch.no_grad():
        block.normal_(0.0, math.sqrt(2.0 / fan_out))


class SFIConv2d(nn.Module):
    """The interaction convolution of ``SFIConv`` (or ``LastSFIConv`` with ``merge_output``).

    Input ``[N, in_channels, H, W]`` laid out ``[spatial | frequency]``. Output the same layout
    over ``out_channels``, or, with ``merge_output=True``, one tensor (``s2s(X_s) + f2f(X_f)``).
    Stride 2 is a 2x2 average pool (floor) and a stride-1 convolution, as published.
    """

    conv_backend = "auto"  # whole models pickled before these attributes existed
    pointwise_backend = "auto"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, alpha=0.5,
                 merge_output=False):
        super().__init__()
        _check_stride(stride)
        kernel_size = _odd_kernel_size("SFIConv2d", kernel_size)
        _check_split("SFIConv2d", "in_channels", in_channels, alpha)
        if not merge_output:
            _check_split("SFIConv2d", "out_channels", out_channels, alpha)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.alpha = kernel_size, stride, alpha
        self.merge_output = merge_output
        self.in_spatial = spatial_channels(in_channels, alpha)
        self.out_spatial = None if merge_output else spatial_channels(out_channels, alpha)
        self.pool_first = kernel_size > 1 or pool_before_pointwise(in_channels, out_channels)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = None  # set only when BatchNorm is folded in for inference
        self.conv_backend = "auto"  # the 3x3 convolution's path (ops.conv3x3); not saved
        self.pointwise_backend = "auto"  # the 1x1 convolution's path (ops.conv1x1); not saved
        self.reset_parameters()

    def reset_parameters(self):
        kk = self.kernel_size ** 2
        rows = [slice(None)] if self.merge_output else [slice(0, self.out_spatial),
                                                         slice(self.out_spatial, None)]
        for r in rows:
            n_out = self.weight[r].shape[0]
            for c in (slice(0, self.in_spatial), slice(self.in_spatial, None)):
                _kaiming_fan_out_(self.weight[r, c], n_out * kk)

    def forward(self, x):
        # The interaction itself stays one dense convolution: cuDNN/oneDNN, or on the CPU in
        # float32 for 3x3 kernels the Winograd kernels (sficonv_ext.ops.conv3x3), which do a
        # quarter of the multiplies, and for 1x1 kernels on small maps one matrix product
        # (sficonv_ext.ops.conv1x1), which measured faster than oneDNN there.
        pooled = self.stride == 2
        if pooled and self.pool_first:
            x = F.avg_pool2d(x, 2)
        if self.kernel_size == 3:
            y = conv3x3(x, self.weight, self.bias, backend=self.conv_backend)
        elif self.kernel_size == 1:
            y = conv1x1(x, self.weight, self.bias, backend=self.pointwise_backend)
        else:
            y = F.conv2d(x, self.weight, self.bias, padding=self.kernel_size // 2)
        if pooled and not self.pool_first:
            y = F.avg_pool2d(y, 2)
        return y

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, split_in={self.in_spatial}, split_out={self.out_spatial}")


class FirstSFIConv2d(nn.Module):
    """``FirstSFIConv``: one tensor in, ``[s2s(x) | f2f(MCS(x))]`` out.

    ``weight`` stacks ``W_s2s`` (first ``out_spatial`` rows) over ``W_f2f``: one parameter.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, alpha=0.5,
                 mcs_kernel_size=5, mcs_learnable=False, mcs_init="published", mcs_eps=1e-6):
        super().__init__()
        _check_stride(stride)
        kernel_size = _odd_kernel_size("FirstSFIConv2d", kernel_size)
        if in_channels < 1:
            raise ValueError(f"FirstSFIConv2d needs in_channels >= 1, got {in_channels}")
        _check_split("FirstSFIConv2d", "out_channels", out_channels, alpha)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.alpha = kernel_size, stride, alpha
        self.out_spatial = spatial_channels(out_channels, alpha)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = None
        self.mcs = MCSConv2d(in_channels, mcs_kernel_size, learnable=mcs_learnable,
                             init=mcs_init, eps=mcs_eps)
        self.backend = "auto"  # see sficonv_ext.ops.first_sfi_conv; not saved
        self.reset_parameters()

    def reset_parameters(self):
        kk = self.kernel_size ** 2
        for r in (slice(0, self.out_spatial), slice(self.out_spatial, None)):
            _kaiming_fan_out_(self.weight[r], self.weight[r].shape[0] * kk)

    def forward(self, x):
        if self.stride == 2:
            x = F.avg_pool2d(x, 2)
        # One op: with backend "auto" (the default) the composition (MCSConv op, two
        # convolutions, cat), which measured faster everywhere; "triton" runs the fused kernel.
        return first_sfi_conv(x, self.weight, self.mcs.weight, self.out_spatial, bias=self.bias,
                              constrained=self.mcs.learnable, eps=self.mcs.eps,
                              mcs_backend=self.mcs.backend, backend=self.backend)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, split_out={self.out_spatial}")


class SplitBatchNorm2d(nn.BatchNorm2d):
    """One BatchNorm over ``[spatial | frequency]``: per-channel, so it equals the published
    per-branch ``bn_s``/``bn_f`` pair exactly. ``spatial`` records the split for checkpoints
    (``None``: a single published ``bn_s``, as after LastSFIConv)."""

    def __init__(self, num_features, spatial=None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.spatial = spatial


class SFIConvNorm(nn.Module):
    """A fused SFIConv layer with its BatchNorm and optional ReLU (published ``...BR``/``...B``).

    ``forward(x, residual)`` also adds a residual before the ReLU (a bottleneck's last layer):
    BatchNorm, add and ReLU run as one epilogue (see :func:`sficonv_ext.ops.batch_norm_act`;
    ``norm_backend`` picks its path and is not saved)."""

    def __init__(self, conv, relu):
        super().__init__()
        self.conv = conv
        split = getattr(conv, "out_spatial", None)
        self.bn = SplitBatchNorm2d(conv.out_channels, spatial=split)
        self.relu = relu
        self.norm_backend = "auto"

    def forward(self, x, residual=None, relu=None):
        # The convolution's output is this layer's own temporary (add and ReLU may work in
        # place on it once fuse_for_inference has made bn an nn.Identity), unless a hook has
        # been handed it.
        return batch_norm_act(self.conv(x), self.bn, residual,
                              self.relu if relu is None else relu, backend=self.norm_backend,
                              inplace_ok=not hooked(self.conv))
