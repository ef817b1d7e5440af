"""Fake kernels, autograd and FLOP counts for the C++ ops
``sficonv_ext::conv1x1_rows_forward/backward`` (csrc/conv1x1_cpu.cpp): the CPU's 1x1
convolution as one matrix product over the pixels, its outputs of 31 MiB or more from the
kernel pool. Imported only when the compiled extension loaded."""
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from .conv_autograd import (channels_last_like, check_conv_shapes,
                            register_conv_autograd)


def _check_pair(x, weight):
    check_conv_shapes("conv1x1_rows", x, weight, 1)
    torch._check(x.dtype == weight.dtype and x.dtype.is_floating_point,
                 lambda: f"conv1x1_rows: x and weight must share one floating dtype, got "
                         f"{x.dtype} and {weight.dtype}")


@torch.library.register_fake("sficonv_ext::conv1x1_rows_forward")
def _forward_fake(x, weight):
    _check_pair(x, weight)
    return channels_last_like(x, weight.shape[0])


@torch.library.register_fake("sficonv_ext::conv1x1_rows_backward")
def _backward_fake(grad_y, x, weight, need_x, need_weight):
    _check_pair(x, weight)
    n, _, h, w = x.shape
    torch._check(tuple(grad_y.shape) == (n, weight.shape[0], h, w),
                 lambda: f"conv1x1_rows_backward: grad_y must be "
                         f"{[n, weight.shape[0], h, w]}, got {list(grad_y.shape)}")
    torch._check(grad_y.device == x.device and grad_y.dtype == x.dtype,
                 lambda: "conv1x1_rows_backward: grad_y must be a CPU tensor of x's dtype")
    grad_x = channels_last_like(x, x.shape[1]) if need_x else x.new_empty((0,))
    grad_w = weight.new_empty(tuple(weight.shape)) if need_weight else weight.new_empty((0,))
    return grad_x, grad_w


register_conv_autograd("sficonv_ext::conv1x1_rows_forward",
                       torch.ops.sficonv_ext.conv1x1_rows_backward, F.conv2d)


def _product_flops(x_shape, weight_shape):
    n, c, h, w = x_shape
    return 2 * n * h * w * c * weight_shape[0]


@register_flop_formula(torch.ops.sficonv_ext.conv1x1_rows_forward)
def _forward_flops(x_shape, weight_shape, *args, **kwargs):
    return _product_flops(x_shape, weight_shape)


@register_flop_formula(torch.ops.sficonv_ext.conv1x1_rows_backward)
def _backward_flops(grad_y_shape, x_shape, weight_shape, need_x, need_weight, *args, **kwargs):
    return (int(need_x) + int(need_weight)) * _product_flops(x_shape, weight_shape)
