"""The pure-PyTorch MCSConv path, and the constraint's chain rule in tensor ops (the reference
the C++, CUDA and Triton constraint steps are tested against)."""
import torch
import torch.nn.functional as F

from ..reference.constraint import constrain_mcs_weight


def mcs_conv_torch(x, weight, constrained, eps):
    """torch constraint + ``F.conv2d(groups=C)``: the baseline every kernel is measured against."""
    if constrained:
        # In at least float32, as the kernels compute it: in float16 the chain rule's
        # dot / S**2 overflowed for a small sum S (inf - inf, a NaN weight gradient).
        wide = torch.promote_types(weight.dtype, torch.float32)
        w = constrain_mcs_weight(weight.to(wide), eps).to(weight.dtype)
    else:
        w = weight
    if x.numel() == 0:
        # F.conv2d refuses zero channels and images smaller than the filter; the output is
        # empty either way (stride 1, same padding), still connected to x and the weight.
        return x * w.sum()
    return F.conv2d(x, w, padding=weight.shape[-1] // 2, groups=x.shape[1])


def constraint_backward(grad_eff, weight, constrained, eps):
    """dL/d(raw weight) from dL/d(effective filter) ``[C, k*k]`` (same maths as csrc)."""
    if not constrained:
        return grad_eff.reshape(weight.shape).to(weight.dtype)
    kk = grad_eff.shape[1]
    # The centre is selected away, never multiplied by 0: an inf or NaN raw centre tap (never
    # used) or a NaN in the centre's incoming gradient (a constant -1 takes none) must not
    # reach the other taps or the centre's own gradient (inf * 0 is NaN), as in the reference.
    off_centre = torch.ones(1, kk, dtype=torch.bool, device=grad_eff.device)
    off_centre[:, kk // 2] = False
    w = torch.where(off_centre, weight.reshape(weight.shape[0], kk).to(grad_eff.dtype), 0.0)
    s = w.sum(1, keepdim=True)
    s_clamped = torch.where(s >= 0, s.clamp_min(eps), s.clamp_max(-eps))
    passes = (s >= eps) | (s <= -eps)
    dot = torch.where(off_centre, grad_eff * w, 0.0).sum(1, keepdim=True)
    through_sum = torch.where(passes, dot / (s_clamped * s_clamped), torch.zeros_like(dot))
    grad_w = torch.where(off_centre, grad_eff / s_clamped - through_sum, 0.0)
    return grad_w.reshape(weight.shape).to(weight.dtype)
