"""Published SFIConv layers, reproduced as ``shared/SPEC.md`` sections 1 and 2 state them.

Everything here mirrors the published research code: module names, parameter names and shapes,
initialisation and quirks (frozen constrained filter, an unused ``const_weight`` that shares its
storage, an unused random ``bias``). It is the ground truth the fast paths are tested against, so
it favours being obviously faithful over being fast.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def frequency_channels(channels, alpha):
    """Channels of the frequency branch: ``int(alpha * channels)`` as published."""
    return int(alpha * channels)


def spatial_channels(channels, alpha):
    """Channels of the spatial branch: the rest, ``channels - int(alpha * channels)``."""
    return channels - int(alpha * channels)


def _kernel_int(kernel_size):
    # The published layers take a tuple and use its first entry.
    return kernel_size[0] if isinstance(kernel_size, (tuple, list)) else int(kernel_size)


class MCSConv(nn.Module):
    """Multichannel constrained separable convolution, published form (SPEC section 1).

    The 5x5 depthwise filter is constrained once at construction (centre -1, other taps divided by
    their sum, no guard against a sum near zero) and then frozen: ``weight`` has
    ``requires_grad=False``. ``const_weight`` shares its storage and is never used in forward;
    ``bias`` is random and never used. All three are in the state_dict.
    """

    def __init__(self, in_planes):
        super().__init__()
        self.in_planes = in_planes
        raw = torch.randn(in_planes, 1, 5, 5)
        centre = raw[:, 0, 2, 2].clone()
        for c in range(in_planes):
            off_centre_sum = raw[c].sum() - centre[c]
            raw[c] /= off_centre_sum
            raw[c, 0, 2, 2] = -1.0
        self.const_weight = nn.Parameter(raw, requires_grad=True)
        # Same storage as const_weight, as in the published code.
        self.weight = nn.Parameter(self.const_weight.data, requires_grad=False)
        self.bias = nn.Parameter(torch.randn(in_planes), requires_grad=False)

    def forward(self, x):
        return F.conv2d(x, self.weight, stride=1, padding=2, groups=self.in_planes)


class FirstSFIConv(nn.Module):
    """One tensor in, ``(X_s, X_f)`` out: ``X_s = s2s(x)``, ``X_f = f2f(MCSConv(x))``."""

    def __init__(self, in_channels, out_channels, kernel_size, alpha=0.5, stride=1, padding=1,
                 dilation=1, groups=1, bias=False):
        super().__init__()
        k = _kernel_int(kernel_size)
        self.stride = stride
        self.AvgPool = nn.AvgPool2d(kernel_size=(2, 2), stride=2)
        self.MaxPool = nn.MaxPool2d(kernel_size=(2, 2), stride=2)  # present, unused (published)
        self.s2s = nn.Conv2d(in_channels, spatial_channels(out_channels, alpha), k, 1, padding,
                             dilation, groups, bias)
        self.f2f = nn.Conv2d(in_channels, frequency_channels(out_channels, alpha), k, 1, padding,
                             dilation, groups, bias)
        self.MCSConv = MCSConv(in_channels)

    def forward(self, x):
        if self.stride == 2:
            x = self.AvgPool(x)
        return self.s2s(x), self.f2f(self.MCSConv(x))


class SFIConv(nn.Module):
    """``(X_s, X_f)`` in and out: ``Y_s = s2s(X_s) + f2s(X_f)``, ``Y_f = s2f(X_s) + f2f(X_f)``."""

    def __init__(self, in_channels, out_channels, kernel_size, alpha=0.5, stride=1, padding=1,
                 dilation=1, groups=1, bias=False):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError("Stride should be 1 or 2.")
        if not 0 <= alpha <= 1:
            raise ValueError("Alpha should be in the interval from 0 to 1.")
        k = _kernel_int(kernel_size)
        self.stride = stride
        self.alpha = alpha
        self.is_dw = groups == in_channels
        self.AvgPool = nn.AvgPool2d(kernel_size=(2, 2), stride=2)
        self.MaxPool = nn.MaxPool2d(kernel_size=(2, 2), stride=2)  # present, unused (published)
        in_f = frequency_channels(in_channels, alpha)
        out_f = frequency_channels(out_channels, alpha)
        in_s, out_s = spatial_channels(in_channels, alpha), spatial_channels(out_channels, alpha)
        cross = not (alpha in (0, 1) or self.is_dw)
        self.f2f = None if alpha == 0 else nn.Conv2d(
            in_f, out_f, k, 1, padding, dilation, math.ceil(alpha * groups), bias)
        self.f2s = nn.Conv2d(in_f, out_s, k, 1, padding, dilation, groups, bias) if cross else None
        self.s2f = nn.Conv2d(in_s, out_f, k, 1, padding, dilation, groups, bias) if cross else None
        self.s2s = None if alpha == 1 else nn.Conv2d(
            in_s, out_s, k, 1, padding, dilation, math.ceil(groups - alpha * groups), bias)

    def forward(self, x):
        x_s, x_f = x
        if self.stride == 2:
            x_s, x_f = self.AvgPool(x_s), self.AvgPool(x_f)
        y_s = self.s2s(x_s)
        y_f = self.f2f(x_f)
        if not self.is_dw:
            y_s = y_s + self.f2s(x_f)
            y_f = self.s2f(x_s) + y_f
        return y_s, y_f


class LastSFIConv(nn.Module):
    """``(X_s, X_f)`` in, one tensor out: ``Y = s2s(X_s) + f2f(X_f)``, both to all channels."""

    def __init__(self, in_channels, out_channels, kernel_size, alpha=0.5, stride=1, padding=1,
                 dilation=1, groups=1, bias=False):
        super().__init__()
        k = _kernel_int(kernel_size)
        self.stride = stride
        self.AvgPool = nn.AvgPool2d(kernel_size=(2, 2), stride=2)
        self.s2s = nn.Conv2d(spatial_channels(in_channels, alpha), out_channels, k, 1, padding,
                             dilation, groups, bias)
        self.f2f = nn.Conv2d(frequency_channels(in_channels, alpha), out_channels, k, 1, padding,
                             dilation, groups, bias)

    def forward(self, x):
        x_s, x_f = x
        if self.stride == 2:
            x_s, x_f = self.AvgPool(x_s), self.AvgPool(x_f)
        return self.s2s(x_s) + self.f2f(x_f)


class _TwoBranchNorm(nn.Module):
    """Conv, then one BatchNorm per branch (``bn_s``, ``bn_f``), then ReLU if ``relu``."""

    conv_class = None
    relu = False

    def __init__(self, in_channels, out_channels, kernel_size=(3, 3), alpha=0.5, stride=1,
                 padding=1, dilation=1, groups=1, bias=False, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.conv = self.conv_class(in_channels, out_channels, kernel_size, alpha, stride,
                                    padding, dilation, groups, bias)
        self.bn_s = norm_layer(int(out_channels * (1 - alpha)))
        self.bn_f = norm_layer(int(out_channels * alpha))

    def forward(self, x):
        x_s, x_f = self.conv(x)
        x_s, x_f = self.bn_s(x_s), self.bn_f(x_f)
        if self.relu:
            x_s, x_f = F.relu(x_s), F.relu(x_f)
        return x_s, x_f


class _OneBranchNorm(nn.Module):
    """LastSFIConv, then one BatchNorm ``bn_s`` over all output channels, then ReLU if ``relu``."""

    relu = False

    def __init__(self, in_channels, out_channels, kernel_size=(3, 3), alpha=0.5, stride=1,
                 padding=1, dilation=1, groups=1, bias=False, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.conv = LastSFIConv(in_channels, out_channels, kernel_size, alpha, stride, padding,
                                dilation, groups, bias)
        self.bn_s = norm_layer(out_channels)

    def forward(self, x):
        y = self.bn_s(self.conv(x))
        return F.relu(y) if self.relu else y


class SFIConvBR(_TwoBranchNorm):
    conv_class = SFIConv
    relu = True


class SFIConvB(_TwoBranchNorm):
    conv_class = SFIConv


class FirstSFIConvBR(_TwoBranchNorm):
    conv_class = FirstSFIConv
    relu = True


class FirstSFIConvB(_TwoBranchNorm):
    conv_class = FirstSFIConv


class LastSFIConvBR(_OneBranchNorm):
    relu = True


class LastSFIConvB(_OneBranchNorm):
    pass
