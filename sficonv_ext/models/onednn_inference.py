"""CPU layers for ``fuse_for_inference``: a convolution with its folded BatchNorm, the residual
add and the ReLU as ONE oneDNN call (post-ops), the weight reordered to oneDNN's blocked layout
once instead of on every call.

Why: after folding, CPU inference is ~90% oneDNN convolutions, and eager PyTorch adds two costs
around each: the weight is reordered on every call (about 1 ms for layer4's 8-9 MB weights on
the 2-core test CPU) and the add and ReLU are separate passes over the output (about 0.8 ms
for a ``[8, 256, 64, 64]`` float32 output). benchmarks/results/models_cpu_inference*.json
measure the whole model with and without these layers (``fused-inference`` against
``fused-inference-unpacked``).

The oneDNN ops (``torch.ops.mkldnn._convolution_pointwise`` and
``_reorder_convolution_weight``) are the ones TorchInductor's CPU freezing pass calls. They are
used only where they compute exactly what the plain path computes and nothing needs their
(missing) autograd: float32 CPU tensors in channels_last, no autocast, no gradient wanted, not
under ``torch.compile`` (which fuses on its own). Every other call runs the plain path:
``F.conv2d``, then add, then ReLU, the arithmetic ``fuse_for_inference`` used before.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .resnet import PlainBottleneck
from ..nn import SFIConv2d, SFIConvNorm


def onednn_fusion_available():
    """Whether this torch build has the oneDNN convolution-with-post-ops ops."""
    if not torch.backends.mkldnn.is_available():
        return False
    ns = torch.ops.mkldnn
    return hasattr(ns, "_convolution_pointwise") and hasattr(ns, "_reorder_convolution_weight")


def _autocast_on():
    return torch.is_autocast_enabled("cpu")


def _channels_last_float32_cpu(t):
    return (t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4
            and t.is_contiguous(memory_format=torch.channels_last))


class PackedConv:
    """The oneDNN path for one folded convolution: ``act(conv(x) + bias [+ other])``.

    The reordered weight is cached and rebuilt whenever the weight tensor changes (another
    tensor, an in-place update, another device), so a stale copy is never used."""

    def __init__(self, conv_module, padding, stride=1):
        self.module, self.padding, self.stride = conv_module, padding, stride
        self._packed, self._key = None, None

    def can_run(self, x, other=None):
        weight, bias = self.module.weight, self.module.bias
        if torch.compiler.is_compiling() or _autocast_on() or x.numel() == 0:
            return False
        if not (_channels_last_float32_cpu(x) and weight.dtype == torch.float32
                and weight.device.type == "cpu" and bias is not None
                and bias.dtype == torch.float32):
            return False
        wants_grad = torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or bias.requires_grad
            or (other is not None and other.requires_grad))
        if wants_grad:
            return False
        if other is not None:
            n, _, h, w = x.shape
            k = weight.shape[-1]
            expected = (n, weight.shape[0], (h + 2 * self.padding - k) // self.stride + 1,
                        (w + 2 * self.padding - k) // self.stride + 1)
            if tuple(other.shape) != expected or not _channels_last_float32_cpu(other):
                return False
        return True

    def _weight(self, x):
        weight = self.module.weight
        if weight.is_inference():
            # No version counter to notice an in-place change: reorder on every call.
            return self._reorder(weight, x)
        key = (weight.data_ptr(), weight._version, weight.device, tuple(weight.shape))
        if self._key != key:
            # A normal (not inference-mode) tensor, so it may be used under any grad mode.
            with torch.inference_mode(False):
                self._packed = self._reorder(weight, x)
            self._key = key
        return self._packed

    def _reorder(self, weight, x):
        with torch.no_grad():
            return torch.ops.mkldnn._reorder_convolution_weight(
                weight, [self.padding] * 2, [self.stride] * 2, [1, 1], 1, list(x.shape))

    def __call__(self, x, other=None, relu=False):
        args = ([self.padding] * 2, [self.stride] * 2, [1, 1], 1)
        weight, bias = self._weight(x), self.module.bias
        if other is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, bias, *args, "relu" if relu else "none", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, weight, bias, *args, "add", 1.0, "relu" if relu else None, [], "")

    def drop_cache(self):
        self._packed, self._key = None, None


def _plain(conv, x, padding, residual, relu):
    y = F.conv2d(x, conv.weight, conv.bias, padding=padding)
    if residual is not None:
        y = y.add_(residual)
    return F.relu_(y) if relu else y


class _DropsPackedWeights(nn.Module):
    """Copies and pickles leave the reordered weights behind (they are rebuilt on first use)."""

    def __getstate__(self):
        state = super().__getstate__()
        for packed in self._packed_convs():
            packed.drop_cache()
        return state

    def _packed_convs(self):
        return [v for v in self.__dict__.values() if isinstance(v, PackedConv)]


class OneDNNConvNorm(_DropsPackedWeights):
    """A folded ``SFIConvNorm`` (BatchNorm already in ``conv``'s weight and bias) with the same
    ``forward(x, residual=None, relu=None)`` and the same state_dict keys."""

    def __init__(self, layer):
        super().__init__()
        conv = layer.conv
        self.conv, self.bn, self.relu = conv, nn.Identity(), layer.relu
        self.padding = conv.kernel_size // 2
        self.pool = None if conv.stride == 1 else ("before" if conv.pool_first else "after")
        self._packed = PackedConv(conv, self.padding)

    def forward(self, x, residual=None, relu=None):
        relu = self.relu if relu is None else relu
        if self.pool == "before":
            x = F.avg_pool2d(x, 2)
        if self.pool is None or self.pool == "before":
            if self._packed.can_run(x, residual):
                return self._packed(x, residual, relu)
            return _plain(self.conv, x, self.padding, residual, relu)
        # Pooling after the convolution sits between it and the epilogue: no post-op fusion.
        y = F.avg_pool2d(_plain(self.conv, x, self.padding, None, False), 2)
        if residual is not None:
            y = y.add_(residual)
        return F.relu_(y) if relu else y


class OneDNNPlainBottleneck(_DropsPackedWeights):
    """A folded ``PlainBottleneck`` (identity residual) with the same state_dict keys."""

    def __init__(self, block):
        super().__init__()
        for i in (1, 2, 3):
            setattr(self, f"conv{i}", getattr(block, f"conv{i}"))
            setattr(self, f"bn{i}", nn.Identity())
        self._packed1 = PackedConv(self.conv1, 0)
        self._packed2 = PackedConv(self.conv2, 1)
        self._packed3 = PackedConv(self.conv3, 0)

    def forward(self, x):
        out = self._step(self._packed1, self.conv1, 0, x, None)
        out = self._step(self._packed2, self.conv2, 1, out, None)
        # The residual is this block's input, which the caller may still hold: never written.
        return self._step(self._packed3, self.conv3, 0, out, x)

    @staticmethod
    def _step(packed, conv, padding, x, residual):
        if packed.can_run(x, residual):
            return packed(x, residual, relu=True)
        return _plain(conv, x, padding, residual, True)


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
