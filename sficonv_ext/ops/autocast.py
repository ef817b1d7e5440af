"""Autocast for the custom ops, following ATen's rule for convolutions: under autocast every
floating-point input except float64 is cast to the autocast dtype (float64 stays float64, as
``F.conv2d`` keeps it)."""
import torch

from ..reference.constraint import constrain_mcs_weight


def autocast_on(device_type):
    """Whether autocast is on for ``device_type``; False for a device type autocast does not
    know (meta), where asking torch would raise."""
    if torch.compiler.is_compiling():
        # Dynamo of torch 2.11 cannot trace is_autocast_available (a graph break, fatal under
        # fullgraph=True); a traced tensor is never on a device autocast does not know.
        return torch.is_autocast_enabled(device_type)
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_inputs(device_type, *tensors):
    """``tensors`` as autocast would hand them to a convolution on ``device_type`` (None stays
    None); unchanged when autocast is off there."""
    if not autocast_on(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                 and t.dtype != torch.float64 else t for t in tensors)


def constrain_before_autocast(device_type, weight, constrained, eps):
    """``(filter, constrained)`` for an MCSConv call about to be autocast: the constraint is
    applied first, at the raw filter's own precision, and the call then takes the constrained
    filter as a plain one.

    Why: the published initialisation's taps reach hundreds and cancel to an off-centre sum of
    1, so their bfloat16 rounding is as large as that sum; constraining after the cast gave
    filters off by up to 200% (0.4% when constrained first). The gradient reaches the raw
    filter through the same differentiable constraint. A filter autocast leaves alone (float64,
    already the autocast dtype) or an argument the op's checks will refuse is passed through."""
    if not (constrained and autocast_on(device_type) and isinstance(weight, torch.Tensor)
            and weight.is_floating_point()
            and weight.dtype not in (torch.float64, torch.get_autocast_dtype(device_type))
            and weight.dim() == 4 and weight.shape[1] == 1
            and weight.shape[-1] == weight.shape[-2] and weight.shape[-1] % 2 == 1
            and isinstance(eps, (int, float)) and eps > 0):
        return weight, constrained
    return constrain_mcs_weight(weight, eps), False
