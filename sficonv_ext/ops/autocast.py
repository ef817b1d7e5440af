"""Autocast for the custom ops, following ATen's rule for convolutions: under autocast every
floating-point input except float64 is cast to the autocast dtype (float64 stays float64, as
``F.conv2d`` keeps it)."""
import torch


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
