"""``first_sfi_conv``: the FirstSFIConv layer as one op, ``[s2s(x) | f2f(MCS(x))]``.

Two paths compute it:
- ``"triton"``: the fused kernel of :mod:`.first_layer_triton` (1x1 pointwise weight, CUDA or
  Triton's CPU interpreter): MCS(x) never leaves the chip and the output is written once.
- ``"composed"``: MCSConv op, two ``F.conv2d`` and ``torch.cat`` (any kernel size, any device).
``"auto"`` composes everywhere: it would take the fused kernel only where that measured faster,
and on an H100 (benchmarks/results/fused_layers_cuda.json, [64, 64, 64, 64] channels_last,
2026-11-26) it did nowhere. bfloat16 inference: 0.395 ms against 0.145 ms composed (0.37x; an
earlier run's 1.07x was against a composition whose MCSConv ran our NCHW-oriented kernel
rather than cuDNN); training, whose backward recomputes MCS(x): 0.53x; float32, where Triton
uses the exact (IEEE) matrix product against cuDNN's TF32 in that run: 0.06x (the benchmark
now compares IEEE with IEEE). ``backend="triton"`` still runs it.
"""
import torch
import torch.nn.functional as F

from .._arguments import as_int
from .ad_modes import composite_only, refuse_kernel_backend
from .autocast import autocast_inputs, constrain_before_autocast
from .mcs_conv import TRITON_DEVICE_HINT, mcs_conv, triton_ops, triton_runs_on
from .mcs_conv import _validate as validate_mcs_call

FIRST_LAYER_BACKENDS = ("auto", "triton", "composed")
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FUSED_MAX_CHANNELS = 128  # per-program register tile: pixels x padded input channels


def fused_first_layer_available(x, weight):
    """Whether the fused Triton kernel can run this call."""
    return (triton_runs_on(x) and triton_ops() is not None
            and weight.shape[-1] == 1 and weight.shape[-2] == 1
            and x.dtype in _FUSED_DTYPES and x.shape[1] <= _FUSED_MAX_CHANNELS)


def _check_types(x, weight, mcs_weight, split, bias):
    """``split`` as an int, after checking the argument types. Called before anything reads
    x.device: a NumPy array would fail there with an AttributeError."""
    for name, t in (("x", x), ("weight", weight), ("mcs_weight", mcs_weight), ("bias", bias)):
        if not (isinstance(t, torch.Tensor) or (name == "bias" and t is None)):
            raise TypeError(f"first_sfi_conv: {name} must be a torch.Tensor, got "
                            f"{type(t).__name__}")
    return as_int(split, "first_sfi_conv: split")


def _validate(x, weight, mcs_weight, split, bias, backend):
    if backend not in FIRST_LAYER_BACKENDS:
        raise ValueError(f"backend must be one of {FIRST_LAYER_BACKENDS}, got {backend!r}")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"first_sfi_conv: x and weight must be 4-D, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    k_h, k_w = weight.shape[-2:]
    if k_h != k_w or k_h % 2 == 0:
        raise ValueError(f"first_sfi_conv: weight must be square with an odd size (padding "
                         f"k//2 keeps the map's size), got {k_h}x{k_w}")
    if weight.shape[1] != x.shape[1] or mcs_weight.shape[0] != x.shape[1]:
        raise ValueError(f"first_sfi_conv: x has {x.shape[1]} channels, weight expects "
                         f"{weight.shape[1]} and the MCS filter {mcs_weight.shape[0]}")
    if not 0 < split < weight.shape[0]:
        raise ValueError(f"first_sfi_conv: split must be in (0, {weight.shape[0]}), got {split}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"first_sfi_conv: bias must be [{weight.shape[0]}], got "
                         f"{tuple(bias.shape)}")
    tensors = [t for t in (x, weight, mcs_weight, bias) if t is not None]
    if len({t.dtype for t in tensors}) > 1:
        raise TypeError(f"first_sfi_conv: x and the weights must share a dtype, got "
                        f"{[t.dtype for t in tensors]}")
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"first_sfi_conv: x and the weights must be on one device, got "
                         f"{[str(t.device) for t in tensors]}")


def first_sfi_conv(x, weight, mcs_weight, split, *, bias=None, constrained=False, eps=1e-6,
                   mcs_backend="auto", backend="auto"):
    """``[conv(x, weight[:split]) | conv(MCS(x), weight[split:])]``, stride 1, padding k//2.

    ``weight``: ``[C_out, C_in, k, k]``; ``mcs_weight``: ``[C_in, 1, k_mcs, k_mcs]`` (raw when
    ``constrained``); ``bias``: optional ``[C_out]``. Under autocast every input but a float64
    one is cast to the autocast dtype, as for ``F.conv2d``; a raw MCS filter is constrained
    before its cast. ``mcs_backend`` picks the MCSConv kernel of the composed path.
    """
    split = _check_types(x, weight, mcs_weight, split, bias)
    mcs_weight, constrained = constrain_before_autocast(x.device.type, mcs_weight, constrained,
                                                        eps)
    x, weight, mcs_weight, bias = autocast_inputs(x.device.type, x, weight, mcs_weight, bias)
    _validate(x, weight, mcs_weight, split, bias, backend)
    if backend == "triton":
        # The composed path's mcs_conv checks its filter and eps; the fused kernel would read
        # a [C, 1, k, k] filter of odd k past a wrong-shaped one.
        validate_mcs_call(x, mcs_weight, eps, "auto", constrained)
        if composite_only(x, weight, mcs_weight, bias):
            raise refuse_kernel_backend("first_sfi_conv", backend)
        if not fused_first_layer_available(x, weight):
            raise ValueError("first_sfi_conv backend='triton' needs Triton, a 1x1 weight, at "
                             f"most {_FUSED_MAX_CHANNELS} input channels and "
                             f"float32/float16/bfloat16 ({TRITON_DEVICE_HINT})")
        return torch.ops.sficonv_ext.first_sfi_conv_triton(x, weight, mcs_weight, bias, split,
                                                           constrained, float(eps))
    pad = weight.shape[-1] // 2
    b_s, b_f = (None, None) if bias is None else (bias[:split], bias[split:])
    y_s = F.conv2d(x, weight[:split], b_s, padding=pad)
    m = mcs_conv(x, mcs_weight, constrained=constrained, eps=eps, backend=mcs_backend)
    y_f = F.conv2d(m, weight[split:], b_f, padding=pad)
    return torch.cat([y_s, y_f], dim=1)
