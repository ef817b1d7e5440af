"""CPU layers for ``fuse_for_inference``: a convolution with its folded BatchNorm and (where the
residual may be overwritten, see below) its residual add as ONE oneDNN call (a post-op), else
with an in-place add after it; the ReLU in place on the output (oneDNN's ReLU post-op turns
NaN into 0, see ``PackedConv.__call__``); the weight reordered to oneDNN's blocked layout once
instead of on every call.

Why: after folding, CPU inference is ~90% oneDNN convolutions, and eager PyTorch adds costs
around each: the weight is reordered on every call (about 1 ms for layer4's 8-9 MB weights on
the 2-core test CPU) and a residual add is a separate pass over the output. The ReLU stays a
separate pass (about 0.8 ms for a ``[8, 256, 64, 64]`` float32 output): oneDNN's ReLU post-op
saved it but turned NaN into 0 (until 2026-11-27; dropping it cost 1-3% of inference
speed, benchmarks/results/models_cpu_inference_nan_safe*.json). The
benchmarks/results/models_cpu_inference*.json files measure the whole model with and without
these layers (``fused-inference`` against ``fused-inference-unpacked``).

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

Winograd: the 3x3 convolutions (padding 1, maps of at least 8 pixels a side) run instead as
Winograd F(4x4, 3x3) (``sficonv_ext.ops.conv3x3``, csrc/winograd_cpu.cpp) on the weight's tiles
transformed once, with the bias and the ReLU (NaN kept) applied in its output pass: a quarter
of the multiplies of oneDNN's direct convolution. ``use_onednn_layers(..., winograd=False)``
(``fuse_for_inference(..., winograd=False)``) keeps them on oneDNN. It rides on these layers:
with ``onednn=False``, or ``torch.backends.mkldnn.enabled`` off, the folded model runs plain
``F.conv2d`` calls, Winograd included.

Cost: the reordered weights are a second copy of the convolution weights (about 56 MB for
SFIConv-ResNet-26 in float32), kept while the model lives; the Winograd tiles of a 3x3 weight
are 4 times its size (36 values per 9 taps).
"""
import contextlib
import contextvars

import torch
import torch.nn.functional as F

from ..ops import _extension
from ..ops.conv3x3 import map_is_large_enough
from .folded_layers import (FoldedConvNorm, FoldedPlainBottleneck, drop_cached_weights, hooked,
                            output_shape, swap_folded_layers, tracing_or_compiling)


def onednn_fusion_available():
    """Whether this torch build has the oneDNN convolution-with-post-ops ops."""
    if not torch.backends.mkldnn.is_available():
        return False
    ns = torch.ops.mkldnn
    return hasattr(ns, "_convolution_pointwise") and hasattr(ns, "_reorder_convolution_weight")


def _channels_last_float32_cpu(t):
    return (t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4
            and t.is_contiguous(memory_format=torch.channels_last))


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
    private = not any(hooked(module) for module in network.modules())
    token = _RESIDUALS_PRIVATE.set(private)
    try:
        yield
    finally:
        _RESIDUALS_PRIVATE.reset(token)


class PackedConv:
    """The oneDNN path for one folded convolution: ``act(conv(x) + bias [+ other])``.

    The reordered weight is cached with the weight tensor it came from, its storage (both kept
    alive, so that no new storage can take the address compared) and its version counter:
    replacing the parameter, moving it, or changing it in place through autograd-visible ops
    rebuilds it. Writes that bypass the version counter (``weight.data``, a NumPy view) are not
    seen: call :func:`drop_packed_weights` after them. The Winograd tiles of a 3x3 weight are
    cached alike."""

    winograd = False  # objects pickled before the Winograd path existed
    _tiles_cache = None

    def __init__(self, conv_module, padding, winograd=True):
        self.module, self.padding = conv_module, padding
        self.winograd = (winograd and padding == 1
                         and tuple(conv_module.weight.shape[2:]) == (3, 3))
        self._cache = None  # (weight, its version and address, reordered weight, storage)
        self._tiles_cache = None  # the same for the Winograd tiles

    def __getstate__(self):
        # Copies and pickles leave the prepared weights behind; the live object keeps them.
        return {"module": self.module, "padding": self.padding, "winograd": self.winograd,
                "_cache": None, "_tiles_cache": None}

    def can_run(self, x):
        """Whether ``x`` may take the oneDNN path (residual fit is checked separately)."""
        weight, bias = self.module.weight, self.module.bias
        if (tracing_or_compiling() or not torch.backends.mkldnn.enabled
                or torch.is_autocast_enabled("cpu") or x.numel() == 0):
            return False
        if not (_channels_last_float32_cpu(x) and weight.dtype == torch.float32
                and weight.device.type == "cpu" and bias is not None
                and bias.dtype == torch.float32 and bias.device.type == "cpu"):
            return False
        wants_grad = torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or bias.requires_grad)
        return not wants_grad

    @staticmethod
    def covers(relu, residual):
        return True  # every epilogue: ReLU or none, residual or none

    def residual_fits(self, x, other):
        return (tuple(other.shape) == output_shape(x, self.module.weight, self.padding)
                and _channels_last_float32_cpu(other)
                and not (torch.is_grad_enabled() and other.requires_grad))

    def _weight(self, x):
        return self._cached("_cache", lambda weight: self._reorder(weight, x))

    def _cached(self, slot, prepare):
        """``prepare(weight)``, kept in attribute ``slot`` until the weight changes."""
        weight = self.module.weight
        if weight.is_inference():
            # No version counter to notice an in-place change: prepare on every call.
            return prepare(weight)
        cache = getattr(self, slot)
        # Module.to() swaps a parameter's storage and keeps its version: both are compared.
        # The storage is held by the cache: freed, its address could come back for the new
        # one (.double().float() did, in a test run), and a stale weight would pass.
        state = (weight._version, weight.data_ptr())
        if cache is not None and cache[0] is weight and cache[1] == state:
            return cache[2]
        # A normal (not inference-mode) tensor, so it may be used under any grad mode.
        with torch.inference_mode(False), torch.no_grad():
            prepared = prepare(weight)
        setattr(self, slot, (weight, state, prepared, weight.untyped_storage()))
        return prepared

    def _takes_winograd(self, x):
        return self.winograd and _extension.has_cpp_kernels() and map_is_large_enough(x)

    def _reorder(self, weight, x):
        with torch.no_grad():
            return torch.ops.mkldnn._reorder_convolution_weight(
                weight, [self.padding] * 2, [1, 1], [1, 1], 1, list(x.shape))

    def __call__(self, x, other=None, relu=False):
        if other is None and self._takes_winograd(x):
            tiles = self._cached("_tiles_cache", torch.ops.sficonv_ext.winograd_weight_tiles)
            return torch.ops.sficonv_ext.winograd_conv3x3_inference(x, tiles, self.module.bias,
                                                                    relu)
        args = ([self.padding] * 2, [1, 1], [1, 1], 1)
        weight, bias = self._weight(x), self.module.bias
        # The ReLU is NOT oneDNN's "relu" post-op, which turns NaN into 0: one NaN pixel (or a
        # NaN weight) then gave normal-looking logits where the plain path gives NaN. An
        # in-place F.relu on the output keeps NaN, at the cost of one more pass over it.
        if other is None:
            y = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, "none", [], "")
        elif _RESIDUALS_PRIVATE.get():
            y = torch.ops.mkldnn._convolution_pointwise_.binary(
                other, x, weight, bias, *args, "add", 1.0, None, [], "")
        else:
            y = self._add_separately(x, weight, bias, args, other)
        return F.relu(y, inplace=True) if relu else y

    @staticmethod
    def _add_separately(x, weight, bias, args, other):
        # The residual add is NOT oneDNN's "binary add" post-op, which was slower than a
        # separate in-place add and ReLU on the fresh output at three of SFIConv-ResNet-26's four
        # shapes (convolution + add + ReLU on the 2-core test CPU, batch 8, float32, 1x1
        # weights: 4.82 against 4.31 ms to [8, 256, 64, 64], 3.36 / 3.04 at 32x32, 2.94 / 2.48
        # at 16x16, 2.26 / 2.28 at 8x8). oneDNN's in-place "sum" post-op (above) is faster
        # still but overwrites the residual, which a caller may still hold; ATen's one-pass
        # _add_relu_ loses NaNs in its scalar tail.
        y = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, "none", [], "")
        return y.add_(other)

    def drop_cache(self):
        self._cache = self._tiles_cache = None


class OneDNNConvNorm(FoldedConvNorm):
    """A folded ``SFIConvNorm`` whose convolution and residual add run as one oneDNN call."""

    fused_conv = PackedConv


class OneDNNPlainBottleneck(FoldedPlainBottleneck):
    """A folded ``PlainBottleneck`` whose convolutions run as oneDNN calls."""

    fused_conv = PackedConv


def use_onednn_layers(network, winograd=True):
    """Swap, in place, every folded ``SFIConvNorm`` over an ``SFIConv2d`` and every folded
    ``PlainBottleneck`` of ``network`` for the oneDNN layers above (``winograd=False``: the 3x3
    convolutions on oneDNN too). Returns how many."""
    swapped = swap_folded_layers(network, OneDNNConvNorm, OneDNNPlainBottleneck)
    if not winograd:
        for module in network.modules():
            fused = getattr(module, "_fused", None)
            for conv in fused if isinstance(fused, list) else [fused]:
                if isinstance(conv, PackedConv):
                    conv.winograd = False
    return swapped


def drop_packed_weights(model):
    """Forget every reordered weight in ``model`` (rebuilt on the next call): needed only after
    writing weights in a way autograd's version counter does not see (``.data``, NumPy)."""
    drop_cached_weights(model)
