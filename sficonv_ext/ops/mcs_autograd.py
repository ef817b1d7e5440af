"""Autograd shared by the C++/CUDA and the Triton MCSConv ops: save x and the raw weight, and
call the matching backward op for whichever gradients are needed."""


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
        grad_x, grad_w = backward_op(grad_out, x, weight, ctx.constrained, ctx.eps, need_x,
                                     need_weight)
        return (grad_x if need_x else None, grad_w if need_weight else None, None, None)

    register(backward, setup_context=setup_context)
