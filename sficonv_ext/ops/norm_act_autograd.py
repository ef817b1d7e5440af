"""Autograd shared by the C++ and the Triton BatchNorm + add + ReLU ops: save x, the output
(its sign is the ReLU mask) and the batch statistics, and call the matching backward op.

As for MCSConv (``mcs_autograd``), a backward that must itself be differentiated
(``create_graph=True``) is recomputed through PyTorch's own BatchNorm, which can be
differentiated again, instead of returning silent zeros for the second derivatives."""
import torch
import torch.nn.functional as F


def _differentiable_backward(grad_y, x, y, weight, bias, has_residual, relu, eps):
    # The ReLU mask is piecewise constant: d(mask)/d(anything) = 0. As in torch's ReLU
    # backward, a NaN output is not <= 0 and passes its gradient.
    grad_z = torch.where(y <= 0, torch.zeros_like(grad_y), grad_y) if relu else grad_y
    needs = [t for t in (x, weight, bias) if t.requires_grad]
    if not needs:  # only the residual (or grad_y) needs a gradient
        return None, None, None, (grad_z if has_residual else None)
    z = F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    found = dict(zip([id(t) for t in needs],
                     torch.autograd.grad(z, needs, grad_z, create_graph=True)))
    grad_x, grad_w, grad_b = (found.get(id(t)) for t in (x, weight, bias))
    return grad_x, grad_w, grad_b, (grad_z if has_residual else None)


def register_norm_act_autograd(register, backward_op):
    """``register(backward, setup_context=...)`` for a forward op ``(x, weight, bias, residual,
    relu, eps) -> (y, mean, var)`` whose backward op is ``backward_op(grad_y, x, y, weight,
    mean, var, has_residual, relu, eps) -> (grad_x, grad_weight, grad_bias, grad_residual)``."""

    def setup_context(ctx, inputs, output):
        x, weight, bias, residual, relu, eps = inputs
        y, mean, var = output
        # The output is kept only as the ReLU's mask. Without a ReLU it is not saved, as
        # PyTorch's BatchNorm does not save its own: the caller may change it in place, and it
        # is not held in memory until backward.
        ctx.save_for_backward(x, y if relu else None, weight, bias, mean, var)
        ctx.has_residual, ctx.relu, ctx.eps = residual is not None, relu, eps

    def backward(ctx, grad_y, _grad_mean, _grad_var):
        # The batch statistics are returned for the running averages only: no gradient flows
        # back through them (they are used under no_grad).
        x, y, weight, bias, mean, var = ctx.saved_tensors
        if y is None:  # no ReLU: the backward ops read no mask, any tensor shaped like x will do
            y = x
        if torch.is_grad_enabled() and any(t.requires_grad for t in (grad_y, x, weight, bias)):
            grads = _differentiable_backward(grad_y, x, y.detach(), weight, bias,
                                             ctx.has_residual, ctx.relu, ctx.eps)
            return (*grads, None, None)
        grad_x, grad_w, grad_b, grad_res = backward_op(
            grad_y, x, y, weight, mean, var, ctx.has_residual, ctx.relu, ctx.eps)
        return grad_x, grad_w, grad_b, (grad_res if ctx.has_residual else None), None, None

    register(backward, setup_context=setup_context)
