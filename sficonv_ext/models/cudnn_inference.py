"""CUDA layers for ``fuse_for_inference(model)`` on CUDA (``cudnn=True``, the default there): a
folded convolution with its bias, its ReLU and (where there is one) its residual add as ONE
cuDNN call, through the fused convolution ops that TorchScript's frozen-graph pass uses:
``torch.cudnn_convolution_relu`` (``relu(conv(x) + bias)``) and
``torch.cudnn_convolution_add_relu`` (``relu(conv(x) + z + bias)``), which build a cuDNN
operation graph (convolution, two adds and a ReLU computed in float32, one output in the input's
dtype).

Why: eager ``fuse_for_inference`` with plain convolutions on an H100 (bfloat16, batch 64) ran at
8,737 images/s, slower than the unfolded fast model (9,452;
benchmarks/results/models_cuda_bfloat16_gpu_check.json). Under autocast each folded convolution
there is a weight cast, a bias cast, the cuDNN convolution, a bias add, the residual add and a
ReLU: five passes over the output or launches beside the convolution. Here the weight and bias
are cast once (cached with their version counters, as the oneDNN layers cache their reordered
weights) and the rest is one call.

Measured (``scripts/gpu_check.sh``'s ``fused-inference-cudnn`` against ``fused-inference``,
bfloat16, batch 64): 12511 against 8400 images/s on an H100, 13607 against 9796 on an H200,
both 2026-11-27; hence the default on CUDA. ``python_tests/test_gpu_cudnn_inference.py`` checks
it against the plain folded model, NaN propagation included (PyTorch builds cuDNN's ReLU node
without asking for NaNs to pass, and a ReLU that turns NaN into 0 would hide a broken input):
passed on the H200.

Used only where it computes what the plain path computes: a CUDA input that is 4-D, non-empty
and channels_last, in float32, float16 or bfloat16 (autocast's dtype on CUDA when autocast is
on, else the weight's own); cuDNN enabled and no deterministic algorithms asked for (the fused
ops may pick any engine); tensors small enough for 32-bit indexing; no gradient wanted,
forward-mode included; not traced, scripted or compiled; an epilogue with a ReLU (the ops always
apply one: a convolution without, such as a downsample, keeps the plain path). float32 follows
``torch.backends.cudnn.allow_tf32`` as ``F.conv2d`` does. Where cuDNN has no fused engine for a
call, that input signature takes the plain path from then on.
"""
import torch

from .folded_layers import (FoldedConvNorm, FoldedPlainBottleneck, output_shape,
                            swap_folded_layers, tracing_or_compiling)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cudnn_fusion_available():
    """Whether this torch build has cuDNN and its fused convolution + bias + add + ReLU ops."""
    return (torch.backends.cudnn.is_available() and hasattr(torch, "cudnn_convolution_relu")
            and hasattr(torch, "cudnn_convolution_add_relu"))


def _channels_last_cuda(t):
    return (t.device.type == "cuda" and t.dim() == 4
            and t.is_contiguous(memory_format=torch.channels_last))


def _capturing(device):
    # Asked only of a CUDA device: without a driver the query itself raises.
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class CudnnFusedConv:
    """The cuDNN path for one folded convolution: ``relu(conv(x) + bias [+ residual])``.

    The weight and bias cast to the compute dtype are cached with the tensors they came from,
    their storages (all kept alive, so that no new storage can take an address compared) and
    their version counters: replacing a
    parameter, moving it, or changing it in place through autograd-visible ops recasts it.
    Writes that bypass the version counter (``weight.data``, a NumPy view) are not seen: call
    :func:`sficonv_ext.models.folded_layers.drop_cached_weights` after them."""

    def __init__(self, conv_module, padding):
        self.module, self.padding = conv_module, padding
        self._cache = None  # (weight, bias, their versions and storage, dtype, cast w, cast b)
        self._no_engine = set()  # input signatures cuDNN found no fused engine for

    def __getstate__(self):
        # Copies and pickles leave the cast weights behind; the live object keeps them.
        return {"module": self.module, "padding": self.padding, "_cache": None,
                "_no_engine": set()}

    @staticmethod
    def covers(relu, residual):
        return bool(relu)  # both cuDNN ops end in a ReLU

    def _compute_dtype(self, x):
        """The dtype ``F.conv2d`` would compute in for ``x``, or None where this path does not
        run (the plain path then raises its own errors for mismatched dtypes)."""
        weight, bias = self.module.weight, self.module.bias
        if torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
            floats = all(t.dtype in _DTYPES for t in (x, weight, bias))
            return dtype if floats and dtype in _DTYPES else None
        same = x.dtype == weight.dtype == bias.dtype
        return x.dtype if same and x.dtype in _DTYPES else None

    def can_run(self, x):
        """Whether ``x`` may take the cuDNN call (the residual's fit is checked separately)."""
        weight, bias = self.module.weight, self.module.bias
        if (tracing_or_compiling() or not torch.backends.cudnn.enabled or bias is None
                or not _channels_last_cuda(x) or x.numel() == 0
                or weight.device != x.device or bias.device != x.device
                or x.shape[1] != weight.shape[1]  # the plain path gives conv2d's error
                or self._compute_dtype(x) is None):
            return False
        # The fused ops always pick cuDNN engines as non-deterministic ones, and (unlike
        # F.conv2d) have no fallback for tensors needing 64-bit indexing.
        if torch.backends.cudnn.deterministic or torch.are_deterministic_algorithms_enabled():
            return False
        out = output_shape(x, weight, self.padding)
        if max(x.numel(), out[0] * out[1] * out[2] * out[3]) >= 2**31:
            return False
        wants_grad = torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or bias.requires_grad)
        return not wants_grad

    def _signature(self, x, with_residual):
        return (tuple(x.shape), self._compute_dtype(x), x.device, with_residual)

    def residual_fits(self, x, other):
        return (tuple(other.shape) == output_shape(x, self.module.weight, self.padding)
                and _channels_last_cuda(other) and other.device == x.device
                and other.dtype in _DTYPES
                and not (torch.is_grad_enabled() and other.requires_grad))

    def _weights(self, dtype):
        weight, bias = self.module.weight, self.module.bias
        if weight.is_inference() or bias.is_inference() or _capturing(weight.device):
            # Cast on every call: an inference tensor has no version counter to notice an
            # in-place change, and a CUDA graph must hold the cast itself, so that its replays
            # see later changes to the weight as the plain path's graph does.
            return self._cast(weight, bias, dtype)
        cache = self._cache
        # Module.to() swaps a parameter's storage and keeps its version: both are compared.
        # The storages are held by the cache, so that no new one can take their address.
        state = (weight._version, bias._version, weight.data_ptr(), bias.data_ptr(),
                 weight.device)
        if (cache is not None and cache[0] is weight and cache[1] is bias
                and cache[2] == state and cache[3] == dtype):
            return cache[4], cache[5]
        # Normal (not inference-mode) tensors, so they may be used under any grad mode.
        with torch.inference_mode(False):
            cast = self._cast(weight, bias, dtype)
        self._cache = (weight, bias, state, dtype) + cast + (weight.untyped_storage(),
                                                             bias.untyped_storage())
        return cast

    @staticmethod
    def _cast(weight, bias, dtype):
        with torch.no_grad():
            return (weight.to(dtype=dtype, memory_format=torch.channels_last),
                    bias.to(dtype=dtype))

    def __call__(self, x, other=None, relu=True):
        """The fused call's output, or None where cuDNN has no engine for it (remembered for
        this input signature and op; the layer then runs the plain path)."""
        assert relu, "the cuDNN ops always apply a ReLU; covers() keeps other calls away"
        signature = self._signature(x, other is not None)
        if signature in self._no_engine:
            return None
        dtype = signature[1]
        weight, bias = self._weights(dtype)
        x = x.to(dtype)
        args = ([1, 1], [self.padding] * 2, [1, 1], 1)  # stride, padding, dilation, groups
        try:
            if other is None:
                return torch.cudnn_convolution_relu(x, weight, bias, *args)
            return torch.cudnn_convolution_add_relu(x, weight, other.to(dtype), 1.0, bias,
                                                    *args)
        except RuntimeError as error:
            # ATen's words when no cuDNN engine runs the fused graph (possible for float32
            # without TF32, where tensor-core engines are left out); anything else is raised.
            if "unable to find an engine" not in str(error):
                raise
            self._no_engine.add(signature)
            return None

    def drop_cache(self):
        self._cache = None


class CudnnConvNorm(FoldedConvNorm):
    """A folded ``SFIConvNorm`` whose convolution, bias, add and ReLU run as one cuDNN call."""

    fused_conv = CudnnFusedConv


class CudnnPlainBottleneck(FoldedPlainBottleneck):
    """A folded ``PlainBottleneck`` whose convolutions run as fused cuDNN calls."""

    fused_conv = CudnnFusedConv


def use_cudnn_layers(network):
    """Swap, in place, every folded ``SFIConvNorm`` over an ``SFIConv2d`` and every folded
    ``PlainBottleneck`` of ``network`` for the cuDNN layers above. Returns how many."""
    return swap_folded_layers(network, CudnnConvNorm, CudnnPlainBottleneck)
