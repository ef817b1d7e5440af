"""Layers of ``fuse_for_inference`` that hand a folded convolution with as much of its epilogue
(bias, residual add, ReLU) as a library computes exactly to one library call where one can
run it: oneDNN post-ops on the CPU (:mod:`.onednn_inference`), cuDNN's fused convolution on
CUDA (:mod:`.cudnn_inference`).

A layer is built with a *fused convolution*: an object over the layer's ``nn.Conv2d`` (or
``SFIConv2d``) with
- ``can_run(x)``: whether ``x`` may take the library call at all (device, dtype, layout, no
  gradient wanted, not traced or compiled);
- ``covers(relu, residual)``: whether the call computes this epilogue;
- ``residual_fits(x, residual)``: whether this residual may be handed to it;
- ``__call__(x, residual, relu)``: ``relu(conv(x) + bias [+ residual])``, or None where the
  library turns the call down after all (the layer then runs the plain path).
Every other call runs the layer it replaced, unchanged: the convolution module, then
``batch_norm_act`` (add and ReLU), so the state_dict keys, the hooks and every error stay the
plain path's.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import SFIConv2d, SFIConvNorm
from ..nn.hooks import hooked  # a hooked convolution keeps the plain path, its output intact
from ..ops.ad_modes import composite_only
from ..ops.norm_act import batch_norm_act
from .resnet import PlainBottleneck


def tracing_or_compiling():
    # TorchScript cannot trace these library ops, and torch.compile fuses on its own.
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch.jit.is_scripting())


def output_shape(x, weight, padding):
    """The shape of a stride-1 convolution of ``x`` (what a residual must match)."""
    n, _, h, w = x.shape
    k = weight.shape[-1]
    return (n, weight.shape[0], h + 2 * padding - k + 1, w + 2 * padding - k + 1)


def _may_take_fused_call(fused, conv, x, residual, relu):
    """Everything but the residual's fit (pooling keeps what this checks)."""
    return (not hooked(conv) and fused.covers(relu, residual) and fused.can_run(x)
            and not composite_only(x, conv.weight, conv.bias))


def _fits(fused, x, residual):
    return residual is None or (fused.residual_fits(x, residual)
                                and not composite_only(residual))


class FoldedConvNorm(nn.Module):
    """A folded ``SFIConvNorm`` (BatchNorm already in ``conv``'s weight and bias) with the same
    ``forward(x, residual=None, relu=None)`` and state_dict keys. Subclasses name their fused
    convolution in ``fused_conv``."""

    fused_conv = None  # a class: fused_conv(conv_module, padding)

    def __init__(self, layer):
        super().__init__()
        conv = layer.conv
        self.conv, self.bn, self.relu = conv, layer.bn, layer.relu
        self.pool = None if conv.stride == 1 else ("before" if conv.pool_first else "after")
        self._fused = self.fused_conv(conv, conv.kernel_size // 2)

    def forward(self, x, residual=None, relu=None):
        relu = self.relu if relu is None else relu
        # Pooling after the convolution sits between it and the epilogue: no fused call.
        if self.pool != "after" and _may_take_fused_call(self._fused, self.conv, x, residual,
                                                         relu):
            pooled = F.avg_pool2d(x, 2) if self.pool == "before" else x
            if _fits(self._fused, pooled, residual):
                out = self._fused(pooled, residual, relu)
                if out is not None:  # None: the library could not run this call after all
                    return out
        # bn is an nn.Identity here: add and ReLU in place on the convolution's output only
        # when no hook has been handed that tensor.
        return batch_norm_act(self.conv(x), self.bn, residual, relu,
                              inplace_ok=not hooked(self.conv))

    def __setstate__(self, state):
        # Whole models pickled before the fused convolution's attribute was renamed.
        if "_packed" in state:
            state["_fused"] = state.pop("_packed")
        super().__setstate__(state)


class FoldedPlainBottleneck(nn.Module):
    """A folded ``PlainBottleneck`` (identity residual) with the same state_dict keys."""

    fused_conv = None

    def __init__(self, block):
        super().__init__()
        for i in (1, 2, 3):
            setattr(self, f"conv{i}", getattr(block, f"conv{i}"))
            setattr(self, f"bn{i}", getattr(block, f"bn{i}"))
        self._fused = [self.fused_conv(self.conv1, 0), self.fused_conv(self.conv2, 1),
                       self.fused_conv(self.conv3, 0)]

    def forward(self, x):
        out = self._step(0, x, None)
        out = self._step(1, out, None)
        # The residual is this block's input: written over only by a oneDNN call inside the
        # fused model's own forward with no hooks (residuals_may_be_overwritten), where nothing
        # reads it afterwards.
        return self._step(2, out, x)

    def _step(self, i, x, residual):
        conv, bn = getattr(self, f"conv{i + 1}"), getattr(self, f"bn{i + 1}")
        fused = self._fused[i]
        if _may_take_fused_call(fused, conv, x, residual, True) and _fits(fused, x, residual):
            out = fused(x, residual, True)
            if out is not None:
                return out
        return batch_norm_act(conv(x), bn, residual, True, inplace_ok=not hooked(conv))

    def __setstate__(self, state):
        if "_packed" in state:
            state["_fused"] = state.pop("_packed")
        super().__setstate__(state)


# Every hook registry of an nn.Module (those this torch version has).
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks", "_is_full_backward_hook", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def _take_hooks(new, old):
    # The hooks fuse_for_inference's deep copy carried over from the model (the original's
    # handles do not reach them: remove them on the fused copy).
    for name in _HOOK_DICTS:
        if hasattr(old, name):
            setattr(new, name, getattr(old, name))
    return new


def swap_folded_layers(network, conv_norm_cls, bottleneck_cls):
    """Swap, in place, every folded ``SFIConvNorm`` over an ``SFIConv2d`` and every folded
    ``PlainBottleneck`` of ``network`` for the given layer classes, hooks included. Returns
    how many."""
    swapped = 0
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, SFIConvNorm) and isinstance(child.conv, SFIConv2d):
                setattr(module, name, _take_hooks(conv_norm_cls(child), child))
            elif isinstance(child, PlainBottleneck):
                setattr(module, name, _take_hooks(bottleneck_cls(child), child))
            else:
                continue
            swapped += 1
    return swapped


def drop_cached_weights(model):
    """Forget every weight a fused convolution of ``model`` prepared (reordered, cast), rebuilt
    on the next call: needed only after writing weights in a way autograd's version counter
    does not see (``.data``, NumPy)."""
    for module in model.modules():
        for value in vars(module).values():
            for fused in value if isinstance(value, list) else [value]:
                drop = getattr(fused, "drop_cache", None)
                if drop is not None and not isinstance(fused, nn.Module):
                    drop()
