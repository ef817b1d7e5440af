"""Autograd shared by the C++ and the Triton BatchNorm + add + ReLU ops: save x, the output
(its sign is the ReLU mask) and the batch statistics, and call the matching backward op."""


def register_norm_act_autograd(register, backward_op):
    """``register(backward, setup_context=...)`` for a forward op ``(x, weight, bias, residual,
    relu, eps) -> (y, mean, var)`` whose backward op is ``backward_op(grad_y, x, y, weight,
    mean, var, has_residual, relu, eps) -> (grad_x, grad_weight, grad_bias, grad_residual)``."""

    def setup_context(ctx, inputs, output):
        x, weight, bias, residual, relu, eps = inputs
        y, mean, var = output
        ctx.save_for_backward(x, y, weight, mean, var)
        ctx.has_residual, ctx.relu, ctx.eps = residual is not None, relu, eps

    def backward(ctx, grad_y, _grad_mean, _grad_var):
        # The batch statistics are returned for the running averages only: no gradient flows
        # back through them (they are used under no_grad).
        x, y, weight, mean, var = ctx.saved_tensors
        grad_x, grad_w, grad_b, grad_res = backward_op(
            grad_y, x, y, weight, mean, var, ctx.has_residual, ctx.relu, ctx.eps)
        return grad_x, grad_w, grad_b, (grad_res if ctx.has_residual else None), None, None

    register(backward, setup_context=setup_context)
