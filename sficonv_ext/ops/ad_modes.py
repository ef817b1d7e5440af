"""Whether forward-mode AD or a ``torch.func`` transform watches a call.

The custom ops of this package (C++, CUDA and Triton kernels, and the oneDNN and cuDNN library
calls of ``fuse_for_inference``) have backward formulas only: no forward-mode (jvp) formula and
no vmap batching rule. Under forward-mode AD such a call returns its primal and drops the
tangent without a word (a silently wrong jvp); under a ``torch.func`` transform it fails deep
inside torch. So ``"auto"`` takes the pure-PyTorch path there, and an explicitly chosen kernel
backend is refused with an error that says so.
"""
import torch
import torch.autograd.forward_ad as fwad


# Asked inline in composite_only, never from an argument-less helper: after a compiled call
# under forward AD fell back frame by frame, Dynamo compiled such a helper as a frame of its own
# and baked its answer (False) in with no guard on the functorch stack, so later
# torch.func.grad/vmap calls ran the kernels. composite_only's frame has the call's tensors as
# inputs, whose dispatch-key guards change under a transform.
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)


def functorch_transform_active():
    """Whether a ``torch.func`` transform (vmap, grad, jvp, ...) is in force: there, copying a
    tensor into channels_last is not implemented (vmap), so the models keep the input's layout."""
    return _transforms_active is not None and bool(_transforms_active())


def composite_only(*tensors):
    """True where a call must take pure-PyTorch ops: a forward-AD dual tensor among
    ``tensors`` (None entries are skipped), or a ``torch.func`` transform (jvp, vmap, grad,
    ...) in force."""
    if functorch_transform_active():
        return True
    if torch.compiler.is_compiling() and fwad._current_level >= 0:
        # Dynamo of torch 2.11 traced unpack_dual's tangent as None, so a compiled call under
        # forward AD ran the kernels and dropped the tangent. Any open dual level takes PyTorch
        # ops while tracing (slower at worst); the module global is guarded, so leaving the
        # level recompiles onto the kernels.
        return True
    return any(isinstance(t, torch.Tensor) and fwad.unpack_dual(t).tangent is not None
               for t in tensors)


def refuse_kernel_backend(op, backend):
    """The error for an explicit kernel ``backend`` of ``op`` under forward AD or a transform."""
    return ValueError(f"{op} backend={backend!r} runs a custom kernel, which has no forward-mode "
                      f"AD formula or torch.func batching rule; under forward-mode AD or "
                      f"torch.func use backend='auto' (or 'torch'), which takes PyTorch ops there")
