"""Fake kernels and autograd for the C++ ops ``sficonv_ext::winograd_conv3x3_forward/backward``,
and fake kernels for the inference-only ``winograd_weight_tiles`` and
``winograd_conv3x3_inference`` (csrc/winograd_cpu.cpp). Imported only when the compiled
extension loaded."""
import torch
import torch.nn.functional as F


def _channels_last_like(x, channels):
    n, _, h, w = x.shape
    return x.new_empty((n, channels, h, w)).to(memory_format=torch.channels_last)


@torch.library.register_fake("sficonv_ext::winograd_conv3x3_forward")
def _forward_fake(x, weight):
    torch._check(x.dim() == 4 and weight.dim() == 4, lambda: "winograd_conv3x3: 4-D tensors")
    torch._check(weight.shape[1] == x.shape[1], lambda: "winograd_conv3x3: channel mismatch")
    return _channels_last_like(x, weight.shape[0])


@torch.library.register_fake("sficonv_ext::winograd_conv3x3_backward")
def _backward_fake(grad_y, x, weight, need_x, need_weight):
    grad_x = _channels_last_like(x, x.shape[1]) if need_x else x.new_empty((0,))
    grad_w = (weight.new_empty(weight.shape).contiguous() if need_weight
              else weight.new_empty((0,)))
    return grad_x, grad_w


def _setup_context(ctx, inputs, output):
    x, weight = inputs
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    need_x, need_weight = ctx.needs_input_grad
    if torch.is_grad_enabled() and any(t.requires_grad for t in (grad_y, x, weight)):
        # A backward that is itself differentiated (create_graph=True): PyTorch's convolution
        # computes the same gradients and can be differentiated again.
        wanted = [t for t, need in ((x, need_x), (weight, need_weight)) if need]
        y = F.conv2d(x, weight, padding=1)
        found = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True))
        return (next(found) if need_x else None), (next(found) if need_weight else None)
    grad_x, grad_w = torch.ops.sficonv_ext.winograd_conv3x3_backward(
        grad_y, x, weight, need_x, need_weight)
    return (grad_x if need_x else None), (grad_w if need_weight else None)


torch.library.register_autograd("sficonv_ext::winograd_conv3x3_forward", _backward,
                                setup_context=_setup_context)


@torch.library.register_fake("sficonv_ext::winograd_weight_tiles")
def _weight_tiles_fake(weight):
    return weight.new_empty((36, weight.shape[0], weight.shape[1]))


@torch.library.register_fake("sficonv_ext::winograd_conv3x3_inference")
def _inference_fake(x, weight_tiles, bias, relu):
    torch._check(weight_tiles.shape[2] == x.shape[1],
                 lambda: "winograd_conv3x3_inference: channel mismatch")
    return _channels_last_like(x, weight_tiles.shape[1])
