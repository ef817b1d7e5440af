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
    off_centre = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    off_centre[:, :, centre, centre] = False
    # Selected, not multiplied by a 0/1 mask: the raw centre tap is never used, so an inf or
    # NaN there must not turn the channel into NaN (inf * 0), as the kernels never read it.
    taps = torch.where(off_centre, weight, 0.0)
    sums = taps.sum(dim=(1, 2, 3), keepdim=True)
    # The clamp as comparisons, as the kernels make them: the gradient passes through S where
    # |S| >= eps (at |S| == eps too; torch.clamp's own rule at its bound has changed between
    # versions), and a NaN sum stays NaN.
    sums = torch.where(sums >= 0, torch.where(sums < eps, eps, sums),
                       torch.where(sums > -eps, -eps, sums))
    return torch.where(off_centre, taps / sums, -1.0)
