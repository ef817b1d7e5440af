"""Autograd shared by the C++/CUDA and the Triton MCSConv ops: save x and the raw weight, and
call the matching backward op for whichever gradients are needed.

The backward ops have no autograd of their own, so a backward that must itself be
differentiated (``create_graph=True``: gradient penalties, gradgradcheck) recomputes the
gradients through the pure-PyTorch path instead, which PyTorch can differentiate again.
Without this PyTorch's fallback would return silent zeros for the second derivatives."""
import torch


def _wants_double_backward(*tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _differentiable_backward(grad_out, x, weight, constrained, eps, need_x, need_weight):
    from .mcs_torch import mcs_conv_torch  # the reference path, differentiable twice
    inputs = [t for t, need in ((x, need_x), (weight, need_weight)) if need]
    y = mcs_conv_torch(x, weight, constrained, eps)
    grads = iter(torch.autograd.grad(y, inputs, grad_out, create_graph=True))
    return (next(grads) if need_x else None), (next(grads) if need_weight else None)


def register_mcs_autograd(register, backward_op):
    """``register(backward, setup_context=...)`` for a forward op ``(x, weight, constrained,
    eps)`` whose backward op is ``backward_op(grad, x, weight, constrained, eps, need_x,
    need_weight) -> (grad_x, grad_weight)``."""

    def setup_context(ctx, inputs, output):
        x, weight, constrained, eps = inputs
        ctx.save_for_backward(x, weight)
        ctx.constrained, ctx.eps = constrained, eps

    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if _wants_double_backward(grad_out, x, weight):
            grad_x, grad_w = _differentiable_backward(grad_out, x, weight, ctx.constrained,
                                                      ctx.eps, need_x, need_weight)
            return grad_x, grad_w, None, None
        grad_x, grad_w = backward_op(grad_out, x, weight, ctx.constrained, ctx.eps, need_x,
                                     need_weight)
        return (grad_x if need_x else None, grad_w if need_weight else None, None, None)

    register(backward, setup_context=setup_context)
