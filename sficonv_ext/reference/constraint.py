"""The learnable MCSConv constraint of SPEC section 1, written as plainly as possible."""
import torch


def constrain_mcs_weight(weight, eps=1e-6):
    """Map a raw depthwise filter ``[C, 1, k, k]`` to its constrained form.

    Off-centre taps are divided by their per-channel sum ``S_c``; the centre becomes -1.
    ``|S_c|`` is clamped to at least ``eps`` keeping its sign, and ``S_c == 0`` counts as positive.
    Differentiable: gradients flow through the normalisation to ``weight``.
    """
    k = weight.shape[-1]
    centre = k // 2
    off_centre = torch.ones_like(weight)
    off_centre[:, :, centre, centre] = 0
    sums = (weight * off_centre).sum(dim=(1, 2, 3), keepdim=True)
    sums = torch.where(sums >= 0, sums.clamp(min=eps), sums.clamp(max=-eps))
    return weight * off_centre / sums - (1 - off_centre)
