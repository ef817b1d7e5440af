"""``conv1x1``: the 1x1 (pointwise) convolutions of the SFIConv networks.

Paths: ``"torch"`` is ``F.conv2d`` (oneDNN on the CPU, cuDNN on CUDA); ``"gemm"`` computes the
same sums as one matrix product over the pixels, ``[N*H*W, C] @ [C, K]`` on a channels_last
input (a view, no copy; other layouts go through ``torch.matmul`` per image), made of ordinary
PyTorch ops: autograd, forward-mode AD, ``torch.func`` and ``torch.compile`` see ``mm`` and
views, and the backward is two more matrix products (input and weight gradients).

``"auto"`` takes ``"gemm"`` for float32 CPU calls outside autocast, without a bias, on
channels_last inputs whose map is at most ``GEMM_MAX_SIDE`` pixels a side: at batch 8 a map of
8x8 is 512 rows, and there oneDNN's convolution ran slower than MKL's matrix product of the
same sums (why was not profiled). Measured on the project's 2-core Intel Xeon, float32, batch
8, channels_last (benchmarks/bench_conv1x1.py;
benchmarks/results/conv1x1_cpu_xeon_*_2026-11-28.json),
forward+backward against oneDNN: 1.18-1.50x on the three 8x8 shapes of layer4, 0.99-1.11x on
the two 16x16 shapes of layer3, 0.71-1.00x at 32x32 and 0.89-0.94x at 64x64. Everything else
(CUDA, half precision, autocast, a bias, NCHW, float64) keeps PyTorch's convolution.
"""
import torch
import torch.nn.functional as F

from .ad_modes import composite_only, functorch_transform_active

CONV1X1_BACKENDS = ("auto", "torch", "gemm")
# Largest map side (after any pooling) at which "auto" takes the matrix product; see above.
GEMM_MAX_SIDE = 16


def _auto_takes_gemm(x, weight, bias):
    # composite_only first: under vmap even asking for the layout is an error.
    if bias is not None or composite_only(x, weight):
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu") or x.dim() != 4 or x.numel() == 0:
        return False
    if max(x.shape[2], x.shape[3]) > GEMM_MAX_SIDE:
        return False
    return x.is_contiguous(memory_format=torch.channels_last)


def _check_gemm_arguments(x, weight, bias):
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1):
        raise ValueError(f"conv1x1 needs x [N, C, H, W] and weight [K, C, 1, 1], got x "
                         f"{tuple(x.shape)} and weight {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"conv1x1: weight {tuple(weight.shape)} expects {weight.shape[1]} input "
                         f"channels, x {tuple(x.shape)} has {x.shape[1]}")
    if not x.is_floating_point() or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"conv1x1 needs x and weight of one floating dtype on one device, got x "
                         f"{x.dtype} on {x.device}, weight {weight.dtype} on {weight.device}")
    if bias is not None and (bias.dtype != x.dtype or bias.device != x.device
                             or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"conv1x1: bias must be [{weight.shape[0]}] {x.dtype} on {x.device} "
                         f"like x, got {tuple(bias.shape)} {bias.dtype} on {bias.device}")


def _gemm(x, weight, bias):
    n, c, h, w = x.shape
    k = weight.shape[0]
    w2 = weight.reshape(k, c)
    # The layout may not be asked under a torch.func transform; the per-image product needs
    # no answer.
    if not functorch_transform_active() and x.is_contiguous(memory_format=torch.channels_last):
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view: one row per pixel
        y = torch.mm(rows, w2.t()) if bias is None else torch.addmm(bias, rows, w2.t())
        return y.view(n, h, w, k).permute(0, 3, 1, 2)  # channels_last, as the input
    y = torch.matmul(w2, x.reshape(n, c, h * w))
    if bias is not None:
        y = y + bias.view(1, k, 1)
    return y.view(n, k, h, w)


def conv1x1(x, weight, bias=None, backend="auto"):
    """``F.conv2d(x, weight, bias)`` for a ``[K, C, 1, 1]`` weight (stride 1, no padding), on
    the path ``backend`` names (see the module notes). The ``"gemm"`` path returns channels_last
    for a channels_last input and NCHW otherwise."""
    if backend not in CONV1X1_BACKENDS:
        raise ValueError(f"backend must be one of {CONV1X1_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "gemm" if _auto_takes_gemm(x, weight, bias) else "torch"
    if backend == "torch":
        return F.conv2d(x, weight, bias)
    _check_gemm_arguments(x, weight, bias)
    return _gemm(x, weight, bias)
