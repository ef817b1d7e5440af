"""Autograd and fake-kernel helpers shared by the C++ convolution ops of the CPU (the Winograd
3x3 convolution, winograd_cpp.py; the 1x1 matrix product, conv1x1_cpp.py): each is a forward op
``(x, weight) -> y`` and a backward op ``(grad_y, x, weight, need_x, need_weight) ->
(grad_x, grad_weight)``, an empty tensor standing for a gradient not asked for."""
import torch


def check_conv_shapes(op, x, weight, kernel):
    """The fake kernels' copy of what the C++ op checks first (so that a compiled call fails as
    an eager one does): x ``[N, C, H, W]``, weight ``[K, C, kernel, kernel]``, both on the CPU.
    ``op`` names the op in the messages."""
    torch._check(x.dim() == 4, lambda: f"{op}: x must be [N, C, H, W], got {tuple(x.shape)}")
    torch._check(weight.dim() == 4 and tuple(weight.shape[2:]) == (kernel, kernel),
                 lambda: f"{op}: weight must be [K, C, {kernel}, {kernel}], got "
                         f"{tuple(weight.shape)}")
    torch._check(weight.shape[1] == x.shape[1],
                 lambda: f"{op}: x has {x.shape[1]} channels, weight expects {weight.shape[1]}")
    torch._check(x.device == weight.device and x.device.type == "cpu",
                 lambda: f"{op}: CPU tensors expected")


def channels_last_like(x, channels):
    """An empty ``[N, channels, H, W]`` channels_last tensor like ``x`` (what the ops return)."""
    n, _, h, w = x.shape
    return torch.empty((n, channels, h, w), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def register_conv_autograd(forward_name, backward_op, differentiable_conv):
    """Registers autograd for the op ``forward_name``: the backward op, or, where the backward is
    itself differentiated (``create_graph=True``), ``differentiable_conv(x, weight)``, PyTorch's
    convolution of the same sums, whose gradients can be differentiated again."""

    def setup_context(ctx, inputs, output):
        x, weight = inputs
        ctx.save_for_backward(x, weight)

    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad
        if torch.is_grad_enabled() and any(t.requires_grad for t in (grad_y, x, weight)):
            wanted = [t for t, need in ((x, need_x), (weight, need_weight)) if need]
            found = iter(torch.autograd.grad(differentiable_conv(x, weight), wanted, grad_y,
                                             create_graph=True))
            return (next(found) if need_x else None), (next(found) if need_weight else None)
        grad_x, grad_w = backward_op(grad_y, x, weight, need_x, need_weight)
        return (grad_x if need_x else None), (grad_w if need_weight else None)

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)
