"""``conv1x1``: the 1x1 (pointwise) convolutions of the SFIConv networks.

Paths: ``"torch"`` is ``F.conv2d`` (oneDNN on the CPU, cuDNN on CUDA); ``"gemm"`` computes the
same sums as one matrix product over the pixels, ``[N*H*W, C] @ [C, K]`` on a channels_last
input (a view, no copy; other layouts go through ``torch.matmul`` per image). On the CPU,
without a bias, outside autocast and torch.compile, the channels_last product is the C++ op
``sficonv_ext::conv1x1_rows_forward`` (csrc/conv1x1_cpu.cpp; the same ``mm``, its outputs and
input gradients of 31 MiB or more from the kernel pool, see ``sficonv_ext.cpu_allocator``);
elsewhere, and without the compiled extension, it is made of ordinary PyTorch ops (``mm`` and
views). Forward-mode AD and ``torch.func`` transforms take the per-image product.

``"auto"`` takes ``"gemm"`` for float32 CPU calls outside autocast, without a bias, on
channels_last inputs where either of two things holds (measured on the project's 2-core Intel
Xeon, float32, channels_last, forward+backward against oneDNN: benchmarks/bench_conv1x1.py,
benchmarks/results/conv1x1_cpu_xeon_*_2026-11-28.json):

- Few rows (pixels of the whole batch, ``N*H*W``): at most ``GEMM_MAX_ROWS``, or at most
  ``GEMM_WIDE_MAX_ROWS`` where both channel counts are at least ``GEMM_WIDE_MIN_CHANNELS``.
  There oneDNN's convolution ran slower than MKL's matrix product of the same sums (why was
  not profiled): at 128-1024 rows 0.99-2.96x (1.18-1.50x for the fast model's layer4 at batch
  8, 256 px: 512 rows); at 2048-4096 rows 1.07-1.17x where both channel counts are 512 or
  more, 0.92-1.11x otherwise; at 8192 rows 0.92-1.00x (and 0.71x once), at 32768 rows
  0.89-0.94x. At batch 8, 256 px that is 6 of the fast model's 19 1x1 layers after the first.
- A large output, or a large input whose gradient is wanted (``GEMM_POOLED_MIN_BYTES``, with
  the compiled extension, outside ``torch.compile``), while large blocks are not reused
  process-wide (``sficonv_ext.cpu_allocator.large_blocks_reused``: false under glibc's
  defaults). glibc then maps such a tensor afresh on every call, and faulting it in costs more
  than the convolution: a fresh ``[8, 256, 64, 64]`` float32 tensor took 13-18 ms to fill
  against 1.4 ms for a reused one, and oneDNN's convolution writing it (``[8, 64, 64, 64]`` to
  256 channels) 18.8 ms against 5.3 ms for the product into a pooled block. In the fast model's
  train step at batch 8, 256 px: layer1's three 256-channel outputs and the input gradients of
  the two layers that read a 256-channel 64x64 map. The step's page faults went to none, its
  wall time moved by -0.5% to 7% (README, "1x1 convolutions as matrix products on the CPU").

Everything else (CUDA, half precision, autocast, a bias, NCHW, float64, forward-mode AD,
torch.func) keeps PyTorch's convolution.

The matrix product follows ``torch.backends.mkldnn.matmul.fp32_precision``, oneDNN's
convolutions ``torch.backends.mkldnn.conv.fp32_precision``: a lowered precision set for one of
them reaches only the 1x1 layers on that path.
"""
import torch
import torch.nn.functional as F

from .. import cpu_allocator
from . import _extension
from .ad_modes import composite_only

CONV1X1_BACKENDS = ("auto", "torch", "gemm")
# Where "auto" takes the matrix product (see above): up to this many rows, ...
GEMM_MAX_ROWS = 1024
# ... or up to this many where the input and output channels both number at least this.
GEMM_WIDE_MAX_ROWS = 4096
GEMM_WIDE_MIN_CHANNELS = 512
# ... or where the output, or an input whose gradient is wanted, has this many bytes: the
# kernel pool's outputs start here (csrc/cpu_scratch.h), just below glibc's 32 MiB threshold.
GEMM_POOLED_MIN_BYTES = 31 << 20


def _as_rows(x):
    """Whether ``x`` is laid out as channels_last rows: channels_last, and not an NCHW tensor
    that only looks channels_last because it has one channel (with one pixel a map both
    layouts are the same memory)."""
    return (x.is_contiguous(memory_format=torch.channels_last)
            and (not x.is_contiguous() or x.shape[2] * x.shape[3] == 1))


def _auto_takes_gemm(x, weight, bias):
    # composite_only first: under vmap even asking for the layout is an error.
    if bias is not None or composite_only(x, weight):
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu") or x.numel() == 0 or not _as_rows(x):
        return False
    rows = x.shape[0] * x.shape[2] * x.shape[3]
    wide = min(x.shape[1], weight.shape[0]) >= GEMM_WIDE_MIN_CHANNELS
    if rows <= (GEMM_WIDE_MAX_ROWS if wide else GEMM_MAX_ROWS):
        return True
    return _pooled_product_pays(x, weight, rows)


def _pooled_product_pays(x, weight, rows):
    """Whether the product's pooled outputs spare a large tensor's page faults (see above):
    a large output, or a large input whose gradient will be computed (without one, the
    product of a large input into a small output only ran slower than oneDNN)."""
    channels = weight.shape[0]
    if torch.is_grad_enabled() and x.requires_grad:
        channels = max(channels, x.shape[1])
    largest = rows * channels * x.element_size()
    if largest < GEMM_POOLED_MIN_BYTES or not _extension.has_cpp_kernels():
        return False
    # Not under torch.compile: inductor plans the memory, and Dynamo would bake the allocator
    # query's answer into the graph without a guard (entering large_block_cache() later would
    # not recompile).
    return not torch.compiler.is_compiling() and not cpu_allocator.large_blocks_reused(largest)


def _rows_op_runs(x, bias):
    """Whether the channels_last product runs as the C++ op (pooled outputs). Not under
    autocast (``mm`` casts its operands there, the op would not) nor torch.compile (inductor
    plans the memory of its own ``mm``)."""
    return (bias is None and x.device.type == "cpu" and _extension.has_cpp_kernels()
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def _check_shapes(x, weight, bias):
    # Every path: a weight of another shape would otherwise be a plain convolution to
    # F.conv2d (a 3x3 one without padding) on one path and an error on the other.
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1):
        raise ValueError(f"conv1x1 needs x [N, C, H, W] and weight [K, C, 1, 1], got x "
                         f"{tuple(x.shape)} and weight {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"conv1x1: weight {tuple(weight.shape)} expects {weight.shape[1]} input "
                         f"channels, x {tuple(x.shape)} has {x.shape[1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"conv1x1: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")


def _check_gemm_types(x, weight, bias):
    devices = {t.device for t in (x, weight, bias) if t is not None}
    # Under autocast mm casts its operands itself, as F.conv2d does.
    autocast = torch.is_autocast_enabled(x.device.type)
    dtypes = {t.dtype for t in (x, weight, bias) if t is not None}
    if len(devices) > 1 or not x.is_floating_point() or (len(dtypes) > 1 and not autocast):
        raise ValueError(f"conv1x1 needs x, weight and bias of one floating dtype on one device, "
                         f"got x {x.dtype} on {x.device}, weight {weight.dtype} on "
                         f"{weight.device}" + ("" if bias is None else
                                               f", bias {bias.dtype} on {bias.device}"))


def _gemm(x, weight, bias, as_rows):
    n, c, h, w = x.shape
    k = weight.shape[0]
    if as_rows and _rows_op_runs(x, bias):
        return torch.ops.sficonv_ext.conv1x1_rows_forward(x, weight)
    w2 = weight.reshape(k, c)
    if as_rows:
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view: one row per pixel
        y = torch.mm(rows, w2.t()) if bias is None else torch.addmm(bias, rows, w2.t())
        return y.view(n, h, w, k).permute(0, 3, 1, 2)  # channels_last, as the input
    y = torch.matmul(w2, x.reshape(n, c, h * w))
    if bias is not None:
        y = y + bias.to(y.dtype).view(1, k, 1)  # y's dtype: autocast's, if it is on
    return y.view(n, k, h, w)


def conv1x1(x, weight, bias=None, backend="auto"):
    """``F.conv2d(x, weight, bias)`` for a ``[K, C, 1, 1]`` weight (stride 1, no padding), on
    the path ``backend`` names (see the module notes). The ``"gemm"`` path returns channels_last
    for a channels_last input, NCHW for any other, and NCHW under forward-mode AD or a
    ``torch.func`` transform (where it computes one product per image)."""
    if backend not in CONV1X1_BACKENDS:
        raise ValueError(f"backend must be one of {CONV1X1_BACKENDS}, got {backend!r}")
    _check_shapes(x, weight, bias)
    if backend == "auto":
        if not _auto_takes_gemm(x, weight, bias):
            return F.conv2d(x, weight, bias)
        _check_gemm_types(x, weight, bias)
        return _gemm(x, weight, bias, as_rows=True)  # what _auto_takes_gemm asked for
    if backend == "torch":
        return F.conv2d(x, weight, bias)
    _check_gemm_types(x, weight, bias)
    # Under vmap the layout may not even be asked: there (and under forward-mode AD) the
    # per-image product runs, which needs no answer.
    return _gemm(x, weight, bias, as_rows=not composite_only(x, weight) and _as_rows(x))
