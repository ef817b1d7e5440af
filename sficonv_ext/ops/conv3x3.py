"""``conv3x3``: the 3x3 convolutions (stride 1, padding 1) of the SFIConv networks.

Paths: ``"torch"`` is ``F.conv2d`` (oneDNN on the CPU, cuDNN on CUDA); ``"winograd"`` the C++
Winograd F(4x4, 3x3) kernels of csrc/winograd_cpu.cpp (CPU, float32 or float64): 36 multiplies
per 4x4 block of outputs and channel pair instead of 144, as 36 matrix products plus transforms.

``"auto"`` takes ``"winograd"`` for float32 CPU calls outside autocast (bfloat16 autocast runs
oneDNN's AMX convolutions, several times faster than float32 ones), on channels_last inputs
(the layout of the fast models, and the only one measured), with maps of at least
``WINOGRAD_MIN_SIDE`` pixels a side. Measured on the project's 2-core Intel Xeon (batch 8,
channels_last inputs and weights, with the scratch pool below:
benchmarks/results/conv3x3_cpu_xeon_scratch_no_mmap_2026-11-28.json), forward+backward
against oneDNN: 1.42x at [64 channels, 64x64], 2.14x at [128, 32x32], 2.20x at [256, 16x16],
1.59x at [512, 8x8] (forward 1.29x, 1.94x, 1.94x, 1.08x); the fast model's train step with
every 3x3 layer on it 12.47 against 11.63 images/s
(benchmarks/results/models_cpu_xeon_scratch_no_mmap_2026-11-28.json). Elsewhere, and wherever
the custom op would change what a caller sees (forward-mode AD, torch.func transforms, a
bias), PyTorch's convolution runs.

Memory: each call's temporaries of 1 MiB or more (weight tiles, input tiles, products) come
from the extension's kernel pool, which keeps them for the next call (csrc/cpu_scratch.cpp;
``sficonv_ext.cpu_allocator.kernel_pool_stats`` / ``trim_kernel_pool``): glibc maps blocks over
32 MiB afresh on every call, and the 512-channel layers' tiles are 37.7 MB.

Rounding: Winograd's transforms scale values by up to about 100 and back, so float32 results
differ from a direct convolution's by a few units in the sixth significant digit (relative to
the output's largest value) rather than the seventh, and inputs within a factor of about 100
of float32's largest value can overflow where a direct convolution does not. An infinite
input gives NaN (inf - inf in the transforms) over the tiles it reaches. float64 agrees to
about 1e-14.
"""
import torch
import torch.nn.functional as F

from . import _extension
from .ad_modes import composite_only, refuse_kernel_backend

CONV3X3_BACKENDS = ("auto", "torch", "winograd")
_WINOGRAD_DTYPES = (torch.float32, torch.float64)
# Maps smaller than this a side are mostly padding inside the 4x4 output tiles (a 2x2 map
# pays for 16 outputs to get 4) and too small for the matrix products to run well.
WINOGRAD_MIN_SIDE = 8


def map_is_large_enough(x):
    """Whether ``x``'s map is large enough for Winograd to pay (training and inference)."""
    return min(x.shape[2], x.shape[3]) >= WINOGRAD_MIN_SIDE


def _winograd_can_run(x, weight):
    return (_extension.has_cpp_kernels() and x.device.type == "cpu"
            and weight.device.type == "cpu" and x.dtype in _WINOGRAD_DTYPES
            and weight.dtype == x.dtype and x.dim() == 4 and weight.dim() == 4
            and tuple(weight.shape[2:]) == (3, 3) and weight.shape[1] == x.shape[1])


def _auto_takes_winograd(x, weight, bias):
    # composite_only first: under vmap even asking for the layout is an error.
    if bias is not None or x.dtype != torch.float32 or composite_only(x, weight):
        return False
    if not _winograd_can_run(x, weight) or torch.is_autocast_enabled("cpu"):
        return False
    if not map_is_large_enough(x) or x.numel() == 0:
        return False
    return x.is_contiguous(memory_format=torch.channels_last)


def conv3x3(x, weight, bias=None, backend="auto"):
    """``F.conv2d(x, weight, bias, padding=1)`` for a ``[K, C, 3, 3]`` weight, on the path
    ``backend`` names (see the module notes). The Winograd path returns channels_last."""
    if backend not in CONV3X3_BACKENDS:
        raise ValueError(f"backend must be one of {CONV3X3_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "winograd" if _auto_takes_winograd(x, weight, bias) else "torch"
    if backend == "torch":
        return F.conv2d(x, weight, bias, padding=1)
    if composite_only(x, weight, bias):
        raise refuse_kernel_backend("conv3x3", backend)
    if not _extension.has_cpp_kernels():
        raise RuntimeError(_extension.missing_extension_message(backend))
    if not _winograd_can_run(x, weight):
        raise ValueError(
            f"conv3x3 backend='winograd' needs CPU tensors of one dtype (float32 or float64), "
            f"x [N, C, H, W] and weight [K, C, 3, 3]; got x {tuple(x.shape)} {x.dtype} on "
            f"{x.device}, weight {tuple(weight.shape)} {weight.dtype} on {weight.device}")
    if bias is not None and (bias.dtype != x.dtype or bias.device != x.device
                             or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"conv3x3: bias must be [{weight.shape[0]}] {x.dtype} on {x.device} "
                         f"like x, got {tuple(bias.shape)} {bias.dtype} on {bias.device}")
    y = torch.ops.sficonv_ext.winograd_conv3x3_forward(x, weight)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y
