"""CPU layers for ``fuse_for_inference``: a convolution with its folded BatchNorm, its ReLU and
(where the residual may be overwritten, see below) its residual add as ONE oneDNN call
(post-ops), else with an in-place add and ReLU after it; the weight reordered to oneDNN's
blocked layout once instead of on every call.

Why: after folding, CPU inference is ~90% oneDNN convolutions, and eager PyTorch adds two costs
around each: the weight is reordered on every call (about 1 ms for layer4's 8-9 MB weights on
the 2-core test CPU) and the ReLU is a separate pass over the output (about 0.8 ms for a
``[8, 256, 64, 64]`` float32 output). benchmarks/results/models_cpu_inference*.json
measure the whole model with and without these layers (``fused-inference`` against
``fused-inference-unpacked``).

The oneDNN ops (``torch.ops.mkldnn._convolution_pointwise`` and
``_reorder_convolution_weight``) are the ones TorchInductor's CPU freezing pass calls. They are
used only where they compute exactly what the plain path computes and nothing needs what they
lack (autograd, TorchScript, hooks): float32 CPU tensors in channels_last, oneDNN enabled, no
autocast, no gradient wanted, no hook on the convolution, not traced, scripted or compiled
(torch.compile fuses on its own). Every other call runs the layer it replaced, unchanged: the
convolution module, then ``batch_norm_act`` (add and ReLU).

Residuals: inside :func:`residuals_may_be_overwritten` (which ``fuse_for_inference``'s model
enters around its own forward when no module of the network has a hook), a residual is the
block's own activation that nothing reads afterwards, so the convolution adds it with oneDNN's
in-place "sum" post-op, writing the result over it. Anywhere else the residual is left alone.

Cost: the reordered weights are a second copy of the convolution weights (about 56 MB for
SFIConv-ResNet-26 in float32), kept while the model lives.
"""
import contextlib
import contextvars

import torch
import torch.nn as nn
import torch.nn.functional as F

from .resnet import PlainBottleneck
from ..nn import SFIConv2d, SFIConvNorm
from ..ops.norm_act import batch_norm_act


def onednn_fusion_available():
    """Whether this torch build has the oneDNN convolution-with-post-ops ops."""
    if not torch.backends.mkldnn.is_available():
        return False
    ns = torch.ops.mkldnn
    return hasattr(ns, "_convolution_pointwise") and hasattr(ns, "_reorder_convolution_weight")


def _tracing_or_compiling():
    # TorchScript cannot trace these ops, and torch.compile fuses on its own.
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch.jit.is_scripting())


def _channels_last_float32_cpu(t):
    return (t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4
            and t.is_contiguous(memory_format=torch.channels_last))


def _hooked(module):
    # A hook on the convolution must see it run: such a layer keeps the plain path.
    return bool(module._forward_hooks or module._forward_pre_hooks
                or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


_RESIDUALS_PRIVATE = contextvars.ContextVar("sficonv_ext_residuals_private", default=False)


@contextlib.contextmanager
def residuals_may_be_overwritten(network):
    """Within this block, the oneDNN layers of ``network`` may write a convolution's output
    over the residual they add to it. Only sound while ``network`` runs its own forward on its
    own activations: every residual is then a block input or a downsample output that no one
    reads after that add. A hook on any module of ``network`` could keep such a tensor, so
    then nothing is overwritten.

    Why: on the 2-core test CPU (batch 8, float32) the in-place add was the fastest way to add
    a residual after a 1x1 convolution: 3.66 ms against 4.31 ms as separate add and ReLU at
    ``[8, 256, 64, 64]``, 2.23 / 2.48 at 16x16."""
    private = not any(_hooked(module) for module in network.modules())
    token = _RESIDUALS_PRIVATE.set(private)
    try:
        yield
    finally:
        _RESIDUALS_PRIVATE.reset(token)


class PackedConv:
    """The oneDNN path for one folded convolution: ``act(conv(x) + bias [+ other])``.

    The reordered weight is cached with the weight tensor it came from (kept alive, so its
    address cannot be reused) and that tensor's version counter: replacing the parameter,
    moving it, or changing it in place through autograd-visible ops rebuilds it. Writes that
    bypass the version counter (``weight.data``, a NumPy view) are not seen: call
    :func:`drop_packed_weights` after them."""

    def __init__(self, conv_module, padding):
        self.module, self.padding = conv_module, padding
        self._cache = None  # (weight tensor, its version, reordered weight), read in one step

    def __getstate__(self):
        # Copies and pickles leave the reordered weight behind; the live object keeps it.
        return {"module": self.module, "padding": self.padding, "_cache": None}

    def can_run(self, x):
        """Whether ``x`` may take the oneDNN path (residual fit is checked separately)."""
        weight, bias = self.module.weight, self.module.bias
        if (_tracing_or_compiling() or not torch.backends.mkldnn.enabled
                or torch.is_autocast_enabled("cpu") or x.numel() == 0):
            return False
        if not (_channels_last_float32_cpu(x) and weight.dtype == torch.float32
                and weight.device.type == "cpu" and bias is not None
                and bias.dtype == torch.float32 and bias.device.type == "cpu"):
            return False
        wants_grad = torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or bias.requires_grad)
        return not wants_grad

    def residual_fits(self, x, other):
        n, _, h, w = x.shape
        weight = self.module.weight
        k = weight.shape[-1]
        expected = (n, weight.shape[0], h + 2 * self.padding - k + 1,
                    w + 2 * self.padding - k + 1)
        return (tuple(other.shape) == expected and _channels_last_float32_cpu(other)
                and not (torch.is_grad_enabled() and other.requires_grad))

    def _weight(self, x):
        weight = self.module.weight
        if weight.is_inference():
            # No version counter to notice an in-place change: reorder on every call.
            return self._reorder(weight, x)
        cache = self._cache
        if cache is not None and cache[0] is weight and cache[1] == weight._version:
            return cache[2]
        # A normal (not inference-mode) tensor, so it may be used under any grad mode.
        with torch.inference_mode(False):
            packed = self._reorder(weight, x)
        self._cache = (weight, weight._version, packed)
        return packed

    def _reorder(self, weight, x):
        with torch.no_grad():
            return torch.ops.mkldnn._reorder_convolution_weight(
                weight, [self.padding] * 2, [1, 1], [1, 1], 1, list(x.shape))

    def __call__(self, x, other=None, relu=False):
        args = ([self.padding] * 2, [1, 1], [1, 1], 1)
        weight, bias = self._weight(x), self.module.bias
        if other is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, bias, *args, "relu" if relu else "none", [], "")
        if _RESIDUALS_PRIVATE.get():
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                other, x, weight, bias, *args, "add", 1.0, "relu" if relu else None, [], "")
        # The residual add is NOT oneDNN's "binary add" post-op, which was slower than a
        # separate in-place add and ReLU on the fresh output at three of SFIConv-ResNet-26's four
        # shapes (convolution + add + ReLU on the 2-core test CPU, batch 8, float32, 1x1
        # weights: 4.82 against 4.31 ms to [8, 256, 64, 64], 3.36 / 3.04 at 32x32, 2.94 / 2.48
        # at 16x16, 2.26 / 2.28 at 8x8). oneDNN's in-place "sum" post-op (above) is faster
        # still but overwrites the residual, which a caller may still hold; ATen's one-pass
        # _add_relu_ loses NaNs in its scalar tail.
        y = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, "none", [], "")
        y = y.add_(other)
        return F.relu(y, inplace=True) if relu else y

    def drop_cache(self):
        self._cache = None


def _may_fuse(packed, conv, x):
    """Whether ``x`` may take ``packed``'s oneDNN call (pooling keeps what this checks)."""
    return not _hooked(conv) and packed.can_run(x)


def _fits(packed, x, residual):
    return residual is None or packed.residual_fits(x, residual)


class OneDNNConvNorm(nn.Module):
    """A folded ``SFIConvNorm`` (BatchNorm already in ``conv``'s weight and bias) with the same
    ``forward(x, residual=None, relu=None)``, the same state_dict keys, and, wherever the oneDNN
    call may not run, the same code path."""

    def __init__(self, layer):
        super().__init__()
        conv = layer.conv
        self.conv, self.bn, self.relu = conv, layer.bn, layer.relu
        self.pool = None if conv.stride == 1 else ("before" if conv.pool_first else "after")
        self._packed = PackedConv(conv, conv.kernel_size // 2)

    def forward(self, x, residual=None, relu=None):
        relu = self.relu if relu is None else relu
        # Pooling after the convolution sits between it and the epilogue: no post-op fusion.
        if self.pool != "after" and _may_fuse(self._packed, self.conv, x):
            pooled = F.avg_pool2d(x, 2) if self.pool == "before" else x
            if _fits(self._packed, pooled, residual):
                return self._packed(pooled, residual, relu)
        return batch_norm_act(self.conv(x), self.bn, residual, relu, inplace_ok=True)


class OneDNNPlainBottleneck(nn.Module):
    """A folded ``PlainBottleneck`` (identity residual) with the same state_dict keys."""

    def __init__(self, block):
        super().__init__()
        for i in (1, 2, 3):
            setattr(self, f"conv{i}", getattr(block, f"conv{i}"))
            setattr(self, f"bn{i}", getattr(block, f"bn{i}"))
        self._packed = [PackedConv(self.conv1, 0), PackedConv(self.conv2, 1),
                        PackedConv(self.conv3, 0)]

    def forward(self, x):
        out = self._step(0, x, None)
        out = self._step(1, out, None)
        # The residual is this block's input, which the caller may still hold: never written.
        return self._step(2, out, x)

    def _step(self, i, x, residual):
        conv, bn = getattr(self, f"conv{i + 1}"), getattr(self, f"bn{i + 1}")
        packed = self._packed[i]
        if _may_fuse(packed, conv, x) and _fits(packed, x, residual):
            return packed(x, residual, relu=True)
        return batch_norm_act(conv(x), bn, residual, True, inplace_ok=True)


def use_onednn_layers(network):
    """Swap, in place, every folded ``SFIConvNorm`` over an ``SFIConv2d`` and every folded
    ``PlainBottleneck`` of ``network`` for the oneDNN layers above. Returns how many."""
    swapped = 0
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, SFIConvNorm) and isinstance(child.conv, SFIConv2d):
                setattr(module, name, OneDNNConvNorm(child))
            elif isinstance(child, PlainBottleneck):
                setattr(module, name, OneDNNPlainBottleneck(child))
            else:
                continue
            swapped += 1
    return swapped


def drop_packed_weights(model):
    """Forget every reordered weight in ``model`` (rebuilt on the next call): needed only after
    writing weights in a way autograd's version counter does not see (``.data``, NumPy)."""
    for module in model.modules():
        for value in vars(module).values():
            for packed in value if isinstance(value, list) else [value]:
                if isinstance(packed, PackedConv):
                    packed.drop_cache()
