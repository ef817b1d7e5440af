"""Fused FirstSFIConv (1x1 pointwise, stride 1) in Triton: ``sficonv_ext::first_sfi_conv_triton``.

One program owns a patch of pixels of one image and all input channels. It computes the MCSConv
of the patch in registers (from shifted loads that stay in L1), then both pointwise products on
the tensor cores: ``x @ W_s^T`` into the spatial channels and ``MCS(x) @ W_f^T`` into the
frequency channels of ONE output. Unfused, MCS(x) makes a round trip through memory and the
two halves a third one through ``torch.cat``.

Backward is a composition of existing ops (registered autograd): MCS(x) is recomputed rather
than saved, the two pointwise products use ``aten.convolution_backward`` and the MCSConv its own
Triton backward.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .mcs_triton import on_device, mcs_conv_triton_backward, mcs_conv_triton_forward
from .mcs_triton_cl import patch_coordinates, depthwise_patch


@triton.jit
def _first_layer_kernel(x_ptr, mw_ptr, w_ptr, b_ptr, y_ptr, H, W,
                        sxn, sxc, sxh, sxw, syn, syc, syh, syw, eps,
                        CIN: tl.constexpr, S: tl.constexpr, F: tl.constexpr,
                        CIN_P: tl.constexpr, S_P: tl.constexpr, F_P: tl.constexpr,
                        K: tl.constexpr, KK_POW2: tl.constexpr, CONSTRAINED: tl.constexpr,
                        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr):
    # A one-dimensional grid, so the channel block is always the first: all CIN_P channels.
    n, rows, cols, chans = patch_coordinates(tl.program_id(0), CIN, H, W, BLOCK_R, BLOCK_Q,
                                              CIN_P)
    cmask = chans < CIN
    # MCSConv of the patch, float32, exactly as the channels_last MCSConv kernel computes it.
    x_base = x_ptr + n * sxn + chans * sxc
    m = depthwise_patch(x_base, mw_ptr + chans * (K * K), rows, cols, cmask, H, W, sxh, sxw,
                        eps, K, KK_POW2, CONSTRAINED, False, BLOCK_R * BLOCK_Q, CIN_P)
    inside_out = (rows < H) & (cols < W)
    xc = tl.load(x_base + rows * sxh + cols * sxw, mask=inside_out & cmask, other=0.0)
    # Rounded to the activation dtype first, as the unfused MCSConv output would be.
    m = m.to(xc.dtype)

    # The pointwise products: weight is [S + F, CIN] (row-major), read transposed.
    cin = tl.arange(0, CIN_P)[:, None]
    out_s = tl.arange(0, S_P)[None, :]
    out_f = tl.arange(0, F_P)[None, :]
    w_s = tl.load(w_ptr + out_s * CIN + cin, mask=(cin < CIN) & (out_s < S), other=0.0)
    w_f = tl.load(w_ptr + (S + out_f) * CIN + cin, mask=(cin < CIN) & (out_f < F), other=0.0)
    if IEEE:
        y_s = tl.dot(xc, w_s, input_precision="ieee")
        y_f = tl.dot(m, w_f, input_precision="ieee")
    else:
        y_s = tl.dot(xc, w_s)
        y_f = tl.dot(m, w_f)
    if HAS_BIAS:
        y_s += tl.load(b_ptr + out_s, mask=out_s < S, other=0.0).to(tl.float32)
        y_f += tl.load(b_ptr + S + out_f, mask=out_f < F, other=0.0).to(tl.float32)
    y_base = y_ptr + n * syn + rows * syh + cols * syw
    tl.store(y_base + out_s * syc, y_s.to(y_ptr.dtype.element_ty), mask=inside_out & (out_s < S))
    tl.store(y_base + (S + out_f) * syc, y_f.to(y_ptr.dtype.element_ty),
             mask=inside_out & (out_f < F))


def _padded(n):
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every dimension >= 16


def _patch(channels_in):
    # About 4096 float32 MCS values a program: 64 pixels at 64 channels.
    pixels = max(16, min(128, 4096 // _padded(channels_in)))
    block_q = min(16, pixels)
    return pixels // block_q, block_q


@triton_op("sficonv_ext::first_sfi_conv_triton", mutates_args=())
def first_sfi_conv_triton(x: torch.Tensor, weight: torch.Tensor, mcs_weight: torch.Tensor,
                          bias: torch.Tensor | None, split: int, constrained: bool,
                          eps: float) -> torch.Tensor:
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    # The output takes x's layout, as the composed path's convolutions give it (the kernel
    # writes through y's strides).
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    y = torch.empty((n, cout, h, w), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if y.numel() == 0:
        return y
    block_r, block_q = _patch(cin)
    k = mcs_weight.shape[-1]
    grid = (n * triton.cdiv(h, block_r) * triton.cdiv(w, block_q),)
    with on_device(x):
        wrap_triton(_first_layer_kernel)[grid](
            x, mcs_weight.contiguous(), weight.reshape(cout, cin).contiguous(),
            bias.contiguous() if bias is not None else weight, y, h, w, *x.stride(), *y.stride(),
            float(eps),
            CIN=cin, S=split, F=cout - split, CIN_P=_padded(cin), S_P=_padded(split),
            F_P=_padded(cout - split), K=k, KK_POW2=triton.next_power_of_2(k * k),
            CONSTRAINED=constrained, HAS_BIAS=bias is not None,
            IEEE=x.dtype == torch.float32, BLOCK_R=block_r, BLOCK_Q=block_q)
    return y


def _setup_context(ctx, inputs, output):
    x, weight, mcs_weight, bias, split, constrained, eps = inputs
    ctx.save_for_backward(x, weight, mcs_weight)
    ctx.split, ctx.constrained, ctx.eps = split, constrained, eps
    ctx.has_bias = bias is not None


def _differentiable_backward(ctx, grad, x, weight, mcs_weight, needs):
    """The gradients recomputed through the composed path with PyTorch's MCSConv, which
    autograd can differentiate again (``create_graph=True``); the backward below uses ops
    that have no autograd of their own."""
    from .mcs_torch import mcs_conv_torch
    s, pad = ctx.split, weight.shape[-1] // 2
    m = mcs_conv_torch(x, mcs_weight, ctx.constrained, ctx.eps)
    y = torch.cat([torch.nn.functional.conv2d(x, weight[:s], padding=pad),
                   torch.nn.functional.conv2d(m, weight[s:], padding=pad)], dim=1)
    inputs = [t for t, need in zip((x, weight, mcs_weight), needs) if need]
    grads = iter(torch.autograd.grad(y, inputs, grad, create_graph=True))
    return [next(grads) if need else None for need in needs]


def _backward(ctx, grad):
    x, weight, mcs_weight = ctx.saved_tensors
    need_x, need_w, need_mcs, need_b = ctx.needs_input_grad[:4]
    grad_b = grad.sum(dim=(0, 2, 3)) if (ctx.has_bias and need_b) else None
    if (torch.is_grad_enabled() and any((need_x, need_w, need_mcs))
            and any(t.requires_grad for t in (grad, x, weight, mcs_weight))):
        grad_x, grad_w, grad_mcs = _differentiable_backward(
            ctx, grad, x, weight, mcs_weight, (need_x, need_w, need_mcs))
        return grad_x, grad_w, grad_mcs, grad_b, None, None, None
    s = ctx.split
    conv_args = ([1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    grad_x = grad_w_s = grad_w_f = grad_mcs = None
    grad_s, grad_f = grad[:, :s], grad[:, s:]
    gx_s, grad_w_s, _ = torch.ops.aten.convolution_backward(
        grad_s, x, weight[:s], None, *conv_args, [need_x, need_w, False])
    if need_w or need_x or need_mcs:
        # MCS(x) again rather than kept from the forward: it is cheap and saves its memory.
        m = mcs_conv_triton_forward(x, mcs_weight, ctx.constrained, ctx.eps)
        grad_m, grad_w_f, _ = torch.ops.aten.convolution_backward(
            grad_f, m, weight[s:], None, *conv_args, [need_x or need_mcs, need_w, False])
        if need_x or need_mcs:
            gx_f, grad_mcs = mcs_conv_triton_backward(grad_m, x, mcs_weight, ctx.constrained,
                                                      ctx.eps, need_x, need_mcs)
            if need_x:
                grad_x = gx_s + gx_f
    grad_w = torch.cat([grad_w_s, grad_w_f]) if need_w else None
    return grad_x, grad_w, grad_mcs if need_mcs else None, grad_b, None, None, None


first_sfi_conv_triton.register_autograd(_backward, setup_context=_setup_context)
