"""Fake kernels, autograd and FLOP counts for the C++ Winograd ops (csrc/winograd_cpu.cpp):
``sficonv_ext::winograd_conv3x3_forward/backward`` (training) and the inference-only
``winograd_weight_tiles`` and ``winograd_conv3x3_inference``. Imported only when the compiled
extension loaded."""
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from .conv_autograd import (channels_last_like, check_conv_shapes,
                            register_conv_autograd)


def _check_pair(x, weight):
    check_conv_shapes("winograd_conv3x3", x, weight, 3)
    torch._check(x.dtype == weight.dtype and x.dtype in (torch.float32, torch.float64),
                 lambda: f"winograd_conv3x3: float32 or float64 expected, got {x.dtype} and "
                         f"{weight.dtype}")


@torch.library.register_fake("sficonv_ext::winograd_conv3x3_forward")
def _forward_fake(x, weight):
    _check_pair(x, weight)
    return channels_last_like(x, weight.shape[0])


@torch.library.register_fake("sficonv_ext::winograd_conv3x3_backward")
def _backward_fake(grad_y, x, weight, need_x, need_weight):
    _check_pair(x, weight)
    torch._check(grad_y.device == x.device, lambda: "winograd_conv3x3: CPU tensors expected")
    grad_x = channels_last_like(x, x.shape[1]) if need_x else x.new_empty((0,))
    # The C++ op writes the weight's gradient in the weight's own layout (channels_last for the
    # fast models' weights), as empty_like(preserve_format) lays it out.
    grad_w = (torch.empty_like(weight, memory_format=torch.preserve_format) if need_weight
              else weight.new_empty((0,)))
    return grad_x, grad_w


register_conv_autograd("sficonv_ext::winograd_conv3x3_forward",
                       torch.ops.sficonv_ext.winograd_conv3x3_backward,
                       lambda x, weight: F.conv2d(x, weight, padding=1))


@torch.library.register_fake("sficonv_ext::winograd_weight_tiles")
def _weight_tiles_fake(weight):
    torch._check(weight.dim() == 4 and tuple(weight.shape[2:]) == (3, 3),
                 lambda: f"winograd_conv3x3: weight must be [K, C, 3, 3], got "
                         f"{tuple(weight.shape)}")
    return weight.new_empty((36, weight.shape[0], weight.shape[1]))


@torch.library.register_fake("sficonv_ext::winograd_conv3x3_inference")
def _inference_fake(x, weight_tiles, bias, relu):
    torch._check(weight_tiles.dim() == 3 and weight_tiles.shape[0] == 36 and x.dim() == 4
                 and weight_tiles.shape[2] == x.shape[1],
                 lambda: "winograd_conv3x3_inference: x must be [N, C, H, W] and weight_tiles "
                         "[36, K, C]")
    return channels_last_like(x, weight_tiles.shape[1])


def _no_gradient(ctx, *grads):
    raise RuntimeError("winograd_conv3x3_inference has no backward: it serves "
                       "fuse_for_inference's eval-only layers; for gradients use "
                       "sficonv_ext.ops.conv3x3 (backend 'winograd' or 'auto')")


# Inference only: a call that needs a gradient must not return an output that backward would
# silently skip.
torch.library.register_autograd("sficonv_ext::winograd_weight_tiles", _no_gradient)
torch.library.register_autograd("sficonv_ext::winograd_conv3x3_inference", _no_gradient)


# FLOP counts (torch.utils.flop_counter): those of the direct convolution the op computes, as
# the library counts for F.conv2d, so that counts of the step stay comparable across paths.
def _direct_flops(x_shape, weight_shape):
    n, _, h, w = x_shape
    k, c = weight_shape[:2]
    return 2 * n * k * c * h * w * 9


@register_flop_formula(torch.ops.sficonv_ext.winograd_conv3x3_forward)
def _forward_flops(x_shape, weight_shape, *args, **kwargs):
    return _direct_flops(x_shape, weight_shape)


@register_flop_formula(torch.ops.sficonv_ext.winograd_conv3x3_backward)
def _backward_flops(grad_y_shape, x_shape, weight_shape, need_x, need_weight, *args, **kwargs):
    return (int(need_x) + int(need_weight)) * _direct_flops(x_shape, weight_shape)


@register_flop_formula(torch.ops.sficonv_ext.winograd_conv3x3_inference)
def _inference_flops(x_shape, weight_tiles_shape, *args, **kwargs):
    return _direct_flops(x_shape, (weight_tiles_shape[1], weight_tiles_shape[2]))
