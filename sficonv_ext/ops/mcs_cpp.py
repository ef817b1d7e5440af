"""Fake kernels and autograd for the C++/CUDA ops ``sficonv_ext::mcs_conv_forward/backward``.

Imported only when the compiled extension loaded (the ops must exist to be registered).
"""
import functools

import torch

from .mcs_autograd import register_mcs_autograd


def output_like(x):
    """An empty tensor with the layout the kernels return: channels_last when x really is so."""
    if x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        return torch.empty_like(x, memory_format=torch.channels_last)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("sficonv_ext::mcs_conv_forward")
def _forward_fake(x, weight, constrained, eps):
    torch._check(weight.shape[0] == x.shape[1], lambda: "mcs_conv: channel mismatch")
    return output_like(x)


@torch.library.register_fake("sficonv_ext::mcs_conv_backward")
def _backward_fake(grad_out, x, weight, constrained, eps, need_x, need_weight):
    return output_like(x), torch.empty_like(weight, memory_format=torch.contiguous_format)


register_mcs_autograd(
    functools.partial(torch.library.register_autograd, "sficonv_ext::mcs_conv_forward"),
    torch.ops.sficonv_ext.mcs_conv_backward)
