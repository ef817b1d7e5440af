"""The Triton MCSConv backward's last step: dL/d(raw weight) from dL/d(effective taps), the chain
rule through the constraint (csrc/mcs_conv.h ``constraint_grad``, ``mcs_torch.constraint_backward``
in PyTorch ops), as ONE kernel over blocks of channels instead of about twenty small tensor ops,
each a launch on a GPU.

Constrained, w_eff[t] = w[t] / S' (t != centre), S' = S clamped to at least eps in magnitude
keeping its sign: dL/dw[t] = g[t] / S' - <g, w> / S'^2 (the second term only where |S| >= eps),
dL/dw[centre] = 0. The centre is masked out of every load, so an inf or NaN raw centre tap (never
used) or a NaN in its incoming gradient reaches nothing.
"""
import struct

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

BLOCK_C = 32  # channels per program


def as_float32(value):
    """``value`` rounded to float32, as a Python float: eps as the C++ kernels and PyTorch's
    float32 comparisons see it (a float64 eps would move the clamp's edge by its rounding)."""
    return struct.unpack("f", struct.pack("f", value))[0]


@triton.jit
def _constraint_grad_kernel(g_ptr, w_ptr, out_ptr, C, eps, KK: tl.constexpr,
                            KK_POW2: tl.constexpr, BLOCK_C: tl.constexpr):
    c = (tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]).to(tl.int64)
    t = tl.arange(0, KK_POW2)[None, :]
    centre: tl.constexpr = KK // 2
    valid = (c < C) & (t < KK)
    off_centre = valid & (t != centre)
    g = tl.load(g_ptr + c * KK + t, mask=off_centre, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + c * KK + t, mask=off_centre, other=0.0).to(tl.float32)
    s = tl.sum(w, axis=1)[:, None]
    dot = tl.sum(g * w, axis=1)[:, None]
    # csrc's clamp_sum, comparison for comparison (a NaN sum stays NaN); float32 whatever eps
    # arrives as (inductor passes Python floats as float64)
    scale = tl.where(s >= 0, tl.where(s < eps, eps, s), tl.where(s > -eps, -eps, s))
    scale = scale.to(tl.float32)
    passes = (s >= eps) | (s <= -eps)
    through = tl.where(passes, dot / (scale * scale), 0.0)
    grad = tl.where(t != centre, g / scale - through, 0.0)
    tl.store(out_ptr + c * KK + t, grad.to(out_ptr.dtype.element_ty), mask=valid)


def constraint_backward_triton(grad_eff, weight, constrained, eps):
    """``grad_eff`` [C, k*k] float32, ``weight`` contiguous [C, 1, k, k]: the weight gradient,
    shaped and typed like ``weight``."""
    if not constrained:
        return grad_eff.reshape(weight.shape).to(weight.dtype)
    channels, kk = grad_eff.shape
    out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    grid = (triton.cdiv(channels, BLOCK_C),)
    wrap_triton(_constraint_grad_kernel)[grid](
        grad_eff.contiguous(), weight, out, channels, as_float32(eps), KK=kk,
        KK_POW2=triton.next_power_of_2(kk), BLOCK_C=BLOCK_C)
    return out
