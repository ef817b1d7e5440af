"""Fake kernels and autograd for the C++ ops ``sficonv_ext::batch_norm_act_forward/backward``
(csrc/norm_act_cpu.cpp). Imported only when the compiled extension loaded."""
import torch

from .mcs_cpp import output_like
from .norm_act_autograd import register_norm_act_autograd


def _stats_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("sficonv_ext::batch_norm_act_forward")
def _forward_fake(x, weight, bias, residual, relu, eps):
    torch._check(weight.shape[0] == x.shape[1], lambda: "batch_norm_act: channel mismatch")
    stats = x.new_empty((x.shape[1],), dtype=_stats_dtype(x))
    return output_like(x), stats, torch.empty_like(stats)


@torch.library.register_fake("sficonv_ext::batch_norm_act_backward")
def _backward_fake(grad_y, x, y, weight, mean, var, has_residual, relu, eps):
    grad_res = output_like(x) if has_residual else x.new_empty((0,))
    return output_like(x), torch.empty_like(weight), torch.empty_like(weight), grad_res


register_norm_act_autograd(
    lambda backward, setup_context: torch.library.register_autograd(
        "sficonv_ext::batch_norm_act_forward", backward, setup_context=setup_context),
    torch.ops.sficonv_ext.batch_norm_act_backward)
