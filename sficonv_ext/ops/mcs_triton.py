"""MCSConv in Triton, registered as ``sficonv_ext::mcs_conv_triton_forward/backward``.

One program computes a BLOCK_H x BLOCK_W output tile of one (n, c) plane. Tensors are addressed
through their strides, so NCHW, channels_last and strided inputs all work. The constraint is
applied inside the kernel (the channel's off-centre sum is reduced in registers). The weight
gradient is written as per-tile partial sums and reduced by ``torch.sum``: no atomics, so it is
deterministic; the chain rule through the constraint then runs as one kernel
(``mcs_triton_constraint``). Accumulation is in float32 (float64 inputs are not supported here).

Inputs whose channels are innermost (channels_last) go to the patch kernels of
``mcs_triton_cl`` instead, whose loads are contiguous along the channels.

On the CPU the kernels run under ``TRITON_INTERPRET=1`` (set before triton is imported), which
is how CI checks them.
"""
import contextlib

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import mcs_triton_cl
from .mcs_autograd import register_mcs_autograd
from .mcs_conv import channels_innermost
from .mcs_triton_constraint import as_float32, constraint_backward_triton

BLOCK_H = 16
BLOCK_W = 32


@triton.jit
def _mcs_conv_kernel(x_ptr, w_ptr, y_ptr, C, H, W,
                     sxn, sxc, sxh, sxw, syn, syc, syh, syw, eps,
                     K: tl.constexpr, KK_POW2: tl.constexpr, CONSTRAINED: tl.constexpr,
                     FLIP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    # 64-bit offsets: program ids and small integer arguments are 32-bit on a GPU, and
    # n * stride or row * stride overflows past 2**31 elements.
    plane = tl.program_id(0).to(tl.int64)
    n = plane // C
    c = plane % C
    rows = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]).to(tl.int64)
    cols = (tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]).to(tl.int64)
    kk: tl.constexpr = K * K
    centre: tl.constexpr = kk // 2
    pad: tl.constexpr = K // 2
    w_base = w_ptr + c * kk
    scale = 1.0
    if CONSTRAINED:
        t = tl.arange(0, KK_POW2)
        taps = tl.load(w_base + t, mask=(t < kk) & (t != centre), other=0.0).to(tl.float32)
        s = tl.sum(taps, axis=0)
        # float32 whatever eps arrives as (inductor passes Python floats as float64)
        # csrc's clamp_sum, comparison for comparison (a NaN sum stays NaN, where tl.minimum
        # may drop it on a GPU)
        scale = tl.where(s >= 0, tl.where(s < eps, eps, s),
                         tl.where(s > -eps, -eps, s)).to(tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    x_base = x_ptr + n * sxn + c * sxc
    for a in tl.static_range(K):
        for b in tl.static_range(K):
            tap = a * K + b
            if FLIP:
                tap = kk - 1 - tap
            if CONSTRAINED and tap == centre:
                wt = -1.0
            else:
                wt = tl.load(w_base + tap).to(tl.float32)
                if CONSTRAINED:
                    wt = wt / scale
            r = rows + (a - pad)
            q = cols + (b - pad)
            inside = (r >= 0) & (r < H) & (q >= 0) & (q < W)
            xv = tl.load(x_base + r * sxh + q * sxw, mask=inside, other=0.0).to(tl.float32)
            acc += wt * xv
    out = (rows < H) & (cols < W)
    tl.store(y_ptr + n * syn + c * syc + rows * syh + cols * syw,
             acc.to(y_ptr.dtype.element_ty), mask=out)


@triton.jit
def _mcs_weight_grad_kernel(g_ptr, x_ptr, part_ptr, C, H, W,
                            sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, tiles_h, tiles_w,
                            K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)  # 64-bit offsets, as in _mcs_conv_kernel
    n = plane // C
    c = plane % C
    th = tl.program_id(1).to(tl.int64)
    tw = tl.program_id(2).to(tl.int64)
    rows = th * BLOCK_H + tl.arange(0, BLOCK_H)[:, None].to(tl.int64)
    cols = tw * BLOCK_W + tl.arange(0, BLOCK_W)[None, :].to(tl.int64)
    pad: tl.constexpr = K // 2
    inside_out = (rows < H) & (cols < W)
    g = tl.load(g_ptr + n * sgn + c * sgc + rows * sgh + cols * sgw, mask=inside_out,
                other=0.0).to(tl.float32)
    x_base = x_ptr + n * sxn + c * sxc
    # Partials laid out [N, C, tiles_h, tiles_w, K*K].
    out_base = part_ptr + ((plane * tiles_h + th) * tiles_w + tw) * (K * K)
    for a in tl.static_range(K):
        for b in tl.static_range(K):
            r = rows + (a - pad)
            q = cols + (b - pad)
            inside = (r >= 0) & (r < H) & (q >= 0) & (q < W)
            xv = tl.load(x_base + r * sxh + q * sxw, mask=inside, other=0.0).to(tl.float32)
            tl.store(out_base + a * K + b, tl.sum(tl.sum(g * xv, axis=1), axis=0))


def _check_dtype(x):
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton MCSConv supports float32, float16 and bfloat16, got "
                        f"{x.dtype}; use backend='torch' or 'cpp' for float64")


def _grid(x):
    n, c, h, w = x.shape
    return (n * c, triton.cdiv(h, BLOCK_H), triton.cdiv(w, BLOCK_W))


def on_device(tensor):
    # A Triton launch uses the current device and its stream, not the tensor's: make them agree.
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def _launch_conv(x, weight, out, constrained, eps, flip):
    k = weight.shape[-1]
    common = dict(K=k, KK_POW2=triton.next_power_of_2(k * k), CONSTRAINED=constrained, FLIP=flip)
    if channels_innermost(x):
        blocks = mcs_triton_cl.conv_blocks(x.shape[1])
        wrap_triton(mcs_triton_cl.mcs_conv_cl_kernel)[mcs_triton_cl.patch_grid(x, blocks)](
            x, weight, out, x.shape[1], x.shape[2], x.shape[3], *x.stride(), *out.stride(),
            as_float32(eps), BLOCK_R=blocks[0], BLOCK_Q=blocks[1], BLOCK_C=blocks[2], **common)
        return
    wrap_triton(_mcs_conv_kernel)[_grid(x)](
        x, weight, out, x.shape[1], x.shape[2], x.shape[3], *x.stride(), *out.stride(),
        as_float32(eps), BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W, **common)


def _effective_filter_grad(grad_out, x, k):
    """dL/d(effective filter) as [C, k*k] float32, from per-tile partial sums."""
    n, c, h, w = x.shape
    if channels_innermost(x):
        blocks = mcs_triton_cl.weight_grad_blocks(c)
        grid = mcs_triton_cl.patch_grid(x, blocks)
        partials = torch.empty((grid[0], k * k, c), dtype=torch.float32, device=x.device)
        wrap_triton(mcs_triton_cl.mcs_weight_grad_cl_kernel)[grid](
            grad_out, x, partials, c, h, w, *grad_out.stride(), *x.stride(), K=k,
            BLOCK_R=blocks[0], BLOCK_Q=blocks[1], BLOCK_C=blocks[2])
        return partials.sum(dim=0).t()
    tiles_h, tiles_w = triton.cdiv(h, BLOCK_H), triton.cdiv(w, BLOCK_W)
    partials = torch.empty((n, c, tiles_h, tiles_w, k * k), dtype=torch.float32,
                           device=x.device)
    wrap_triton(_mcs_weight_grad_kernel)[_grid(x)](
        grad_out, x, partials, c, h, w, *grad_out.stride(), *x.stride(), tiles_h, tiles_w,
        K=k, BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W)
    return partials.sum(dim=(0, 2, 3))


@triton_op("sficonv_ext::mcs_conv_triton_forward", mutates_args=())
def mcs_conv_triton_forward(x: torch.Tensor, weight: torch.Tensor, constrained: bool,
                            eps: float) -> torch.Tensor:
    _check_dtype(x)
    y = torch.empty_like(x)  # keeps x's layout (preserve_format)
    if y.numel():
        with on_device(x):
            _launch_conv(x, weight.contiguous(), y, constrained, eps, flip=False)
    return y


@triton_op("sficonv_ext::mcs_conv_triton_backward", mutates_args=())
def mcs_conv_triton_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             constrained: bool, eps: float, need_x: bool,
                             need_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_dtype(x)
    weight_c = weight.contiguous()
    grad_out = grad_out.to(x.dtype)
    grad_x = torch.empty_like(x) if need_x else torch.zeros_like(x)
    grad_w = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    if x.numel() == 0:
        return grad_x, grad_w
    with on_device(x):
        return _triton_backward(grad_out, x, weight_c, grad_x, grad_w, constrained, eps, need_x,
                                need_weight)


def _triton_backward(grad_out, x, weight_c, grad_x, grad_w, constrained, eps, need_x,
                     need_weight):
    if need_x:
        _launch_conv(grad_out, weight_c, grad_x, constrained, eps, flip=True)
    if need_weight:
        grad_eff = _effective_filter_grad(grad_out, x, weight_c.shape[-1])
        grad_w = constraint_backward_triton(grad_eff, weight_c, constrained, eps)
    return grad_x, grad_w


register_mcs_autograd(mcs_conv_triton_forward.register_autograd,
                      torch.ops.sficonv_ext.mcs_conv_triton_backward)
