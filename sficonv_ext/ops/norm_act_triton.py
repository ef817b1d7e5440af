"""Training-mode BatchNorm + residual add + ReLU in Triton, over a channels_last tensor seen as
``[M, C]`` (M = N*H*W): ``sficonv_ext::norm_act_train_forward`` / ``..._backward``.

Unfused, cuDNN's BatchNorm reads x twice and writes y, the add reads y and the residual and
writes y, ReLU reads and writes y again; backward mirrors it. Here forward is one statistics
pass and one apply pass (read x and the residual, write y once); backward one reduction pass and
one apply pass that also writes the residual's gradient.

Statistics are per-block means and centred sums of squares, combined with Chan's formula in
float32: no ``E[x^2] - E[x]^2`` cancellation, and a fixed reduction order (deterministic).
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .mcs_triton import on_device
from .norm_act_autograd import register_norm_act_autograd

BLOCK_M = 128
BLOCK_C = 32


@triton.jit
def _tile(pid_m, pid_c, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    return rows, cols, (rows < M) & (cols < C)


@triton.jit
def _stats_kernel(x_ptr, mean_ptr, m2_ptr, M, C,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    rows, cols, mask = _tile(pid_m, pid_c, M, C, BLOCK_M, BLOCK_C)
    x = tl.load(x_ptr + rows * C + cols, mask=mask, other=0.0).to(tl.float32)
    count = tl.minimum(M - pid_m.to(tl.int64) * BLOCK_M, BLOCK_M).to(tl.float32)
    mean = tl.sum(x, axis=0) / count
    centred = tl.where(mask, x - mean[None, :], 0.0)
    m2 = tl.sum(centred * centred, axis=0)
    c1 = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    out = pid_m.to(tl.int64) * C + c1
    tl.store(mean_ptr + out, mean, mask=c1 < C)
    tl.store(m2_ptr + out, m2, mask=c1 < C)


@triton.jit
def _apply_kernel(x_ptr, res_ptr, scale_ptr, shift_ptr, y_ptr, M, C,
                  HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), M, C, BLOCK_M, BLOCK_C)
    offsets = rows * C + cols
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + cols, mask=cols < C, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=cols < C, other=0.0)
    y = x * scale + shift
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y < 0, 0.0, y)  # not tl.maximum, which turns NaN into 0 (F.relu keeps it)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sums_kernel(g_ptr, y_ptr, x_ptr, mean_ptr, invstd_ptr, sum_dz_ptr, sum_dzx_ptr, M, C,
                      RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_m = tl.program_id(0)
    rows, cols, mask = _tile(pid_m, tl.program_id(1), M, C, BLOCK_M, BLOCK_C)
    offsets = rows * C + cols
    dz = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.load(y_ptr + offsets, mask=mask, other=0.0)
        dz = tl.where(y <= 0, 0.0, dz)  # as threshold_backward: a NaN output passes grad
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + cols, mask=cols < C, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=cols < C, other=0.0)
    xhat = tl.where(mask, (x - mean) * invstd, 0.0)
    c1 = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    out = pid_m.to(tl.int64) * C + c1
    tl.store(sum_dz_ptr + out, tl.sum(dz, axis=0), mask=c1 < C)
    tl.store(sum_dzx_ptr + out, tl.sum(dz * xhat, axis=0), mask=c1 < C)


@triton.jit
def _grad_apply_kernel(g_ptr, y_ptr, x_ptr, mean_ptr, invstd_ptr, weight_ptr, mean_dz_ptr,
                       mean_dzx_ptr, dx_ptr, dres_ptr, M, C,
                       RELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), M, C, BLOCK_M, BLOCK_C)
    offsets = rows * C + cols
    cmask = cols < C
    dz = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.load(y_ptr + offsets, mask=mask, other=0.0)
        dz = tl.where(y <= 0, 0.0, dz)  # as threshold_backward: a NaN output passes grad
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
    weight = tl.load(weight_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    mean_dz = tl.load(mean_dz_ptr + cols, mask=cmask, other=0.0)
    mean_dzx = tl.load(mean_dzx_ptr + cols, mask=cmask, other=0.0)
    xhat = (x - mean) * invstd
    dx = (dz - mean_dz - xhat * mean_dzx) * (weight * invstd)
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_RESIDUAL:
        tl.store(dres_ptr + offsets, dz.to(dres_ptr.dtype.element_ty), mask=mask)


def _rows(t):
    """``[N, C, H, W]`` channels_last -> the ``[M, C]`` row-major view the kernels index."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n * h * w, c)


def _grid(m, c):
    return (triton.cdiv(m, BLOCK_M), triton.cdiv(c, BLOCK_C))


@triton_op("sficonv_ext::norm_act_train_forward", mutates_args=())
def norm_act_train_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           residual: torch.Tensor | None, relu: bool,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = [relu](batch_norm(x) + residual); also returns the batch mean and biased variance
    (float32, [C]). x and residual: channels_last 4-D tensors of one shape and dtype."""
    n, c, h, w = x.shape
    m = n * h * w
    y = torch.empty_like(x, memory_format=torch.channels_last)
    blocks = triton.cdiv(m, BLOCK_M)
    block_mean = torch.empty((blocks, c), dtype=torch.float32, device=x.device)
    block_m2 = torch.empty((blocks, c), dtype=torch.float32, device=x.device)
    with on_device(x):
        wrap_triton(_stats_kernel)[_grid(m, c)](_rows(x), block_mean, block_m2, m, c,
                                                BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C)
    counts = torch.full((blocks, 1), float(BLOCK_M), dtype=torch.float32, device=x.device)
    counts[-1] = float(m - (blocks - 1) * BLOCK_M)
    mean = (block_mean * counts).sum(0) / m
    m2 = block_m2.sum(0) + (counts * (block_mean - mean).square()).sum(0)
    var = m2 / m
    scale = weight.float() * torch.rsqrt(var + eps)
    shift = bias.float() - mean * scale
    with on_device(x):
        wrap_triton(_apply_kernel)[_grid(m, c)](
            _rows(x), _rows(residual) if residual is not None else _rows(x), scale, shift,
            _rows(y), m, c, HAS_RESIDUAL=residual is not None, RELU=relu,
            BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C)
    return y, mean, var


@triton_op("sficonv_ext::norm_act_train_backward", mutates_args=())
def norm_act_train_backward(grad_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                            weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                            has_residual: bool, relu: bool, eps: float
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias, grad_residual); grad_residual is empty without one."""
    n, c, h, w = x.shape
    m = n * h * w
    grad_y = grad_y.contiguous(memory_format=torch.channels_last)
    invstd = torch.rsqrt(var + eps)
    blocks = triton.cdiv(m, BLOCK_M)
    sum_dz = torch.empty((blocks, c), dtype=torch.float32, device=x.device)
    sum_dzx = torch.empty((blocks, c), dtype=torch.float32, device=x.device)
    with on_device(x):
        wrap_triton(_grad_sums_kernel)[_grid(m, c)](
            _rows(grad_y), _rows(y), _rows(x), mean, invstd, sum_dz, sum_dzx, m, c, RELU=relu,
            BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C)
    grad_bias = sum_dz.sum(0)
    grad_weight = sum_dzx.sum(0)
    grad_x = torch.empty_like(x, memory_format=torch.channels_last)
    grad_res = (torch.empty_like(x, memory_format=torch.channels_last) if has_residual
                else x.new_empty(0))
    with on_device(x):
        wrap_triton(_grad_apply_kernel)[_grid(m, c)](
            _rows(grad_y), _rows(y), _rows(x), mean, invstd, weight, grad_bias / m,
            grad_weight / m, _rows(grad_x), _rows(grad_res) if has_residual else _rows(grad_x),
            m, c, RELU=relu, HAS_RESIDUAL=has_residual, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C)
    return grad_x, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), grad_res


register_norm_act_autograd(norm_act_train_forward.register_autograd, norm_act_train_backward)
