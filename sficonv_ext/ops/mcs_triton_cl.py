"""Triton MCSConv kernels for inputs whose channels are innermost (channels_last).

The plane kernels of ``mcs_triton`` walk one (n, c) plane at a time; on a channels_last tensor
their neighbouring lanes sit C elements apart, so every load is scattered (measured on an H100:
4-8x slower than on NCHW). Here one program owns a patch of BLOCK_R x BLOCK_Q pixels of one
image and BLOCK_C neighbouring channels, so lanes that neighbour in the tile neighbour in
memory. Addressing is through strides, so any layout is still computed correctly.
"""
import triton
import triton.language as tl


@triton.jit
def patch_coordinates(pid, C, H, W, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    # 64-bit from the start: n * stride and row * stride overflow 32 bits on large tensors.
    pid = pid.to(tl.int64)
    tiles_q = tl.cdiv(W, BLOCK_Q)
    tiles = tl.cdiv(H, BLOCK_R) * tiles_q
    n = pid // tiles
    t = pid % tiles
    p = tl.arange(0, BLOCK_R * BLOCK_Q)[:, None]
    rows = (t // tiles_q) * BLOCK_R + p // BLOCK_Q
    cols = (t % tiles_q) * BLOCK_Q + p % BLOCK_Q
    chans = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    return n, rows, cols, chans


@triton.jit
def depthwise_patch(x_base, w_row, rows, cols, cmask, H, W, sxh, sxw, eps,
                    K: tl.constexpr, KK_POW2: tl.constexpr, CONSTRAINED: tl.constexpr,
                    FLIP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The (constrained) depthwise k x k correlation of a [BLOCK_P pixels, BLOCK_C channels]
    patch, float32. ``x_base`` points at each channel of the image, ``w_row`` at each channel's
    k*k raw taps; ``rows``/``cols`` are [BLOCK_P, 1], ``cmask`` [1, BLOCK_C]."""
    kk: tl.constexpr = K * K
    centre: tl.constexpr = kk // 2
    pad: tl.constexpr = K // 2
    scale = tl.full((1, BLOCK_C), 1.0, tl.float32)
    if CONSTRAINED:
        t = tl.arange(0, KK_POW2)[:, None]
        taps = tl.load(w_row + t, mask=(t < kk) & (t != centre) & cmask, other=0.0)
        s = tl.sum(taps.to(tl.float32), axis=0)[None, :]
        # float32 whatever eps arrives as (inductor passes Python floats as float64)
        # csrc's clamp_sum, comparison for comparison (a NaN sum stays NaN, where tl.minimum
        # may drop it on a GPU)
        scale = tl.where(s >= 0, tl.where(s < eps, eps, s),
                         tl.where(s > -eps, -eps, s)).to(tl.float32)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for a in tl.static_range(K):
        r = rows + (a - pad)
        row_ok = (r >= 0) & (r < H)
        for b in tl.static_range(K):
            tap = a * K + b
            if FLIP:
                tap = kk - 1 - tap
            if CONSTRAINED and tap == centre:
                wt = tl.full((1, BLOCK_C), -1.0, tl.float32)
            else:
                wt = tl.load(w_row + tap, mask=cmask, other=0.0).to(tl.float32)
                if CONSTRAINED:
                    wt = wt / scale
            q = cols + (b - pad)
            inside = row_ok & (q >= 0) & (q < W) & cmask
            xv = tl.load(x_base + r * sxh + q * sxw, mask=inside, other=0.0).to(tl.float32)
            acc += wt * xv
    return acc


@triton.jit
def mcs_conv_cl_kernel(x_ptr, w_ptr, y_ptr, C, H, W,
                       sxn, sxc, sxh, sxw, syn, syc, syh, syw, eps,
                       K: tl.constexpr, KK_POW2: tl.constexpr, CONSTRAINED: tl.constexpr,
                       FLIP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    n, rows, cols, chans = patch_coordinates(tl.program_id(0), C, H, W, BLOCK_R, BLOCK_Q,
                                              BLOCK_C)
    cmask = chans < C  # [1, BLOCK_C]
    acc = depthwise_patch(x_ptr + n * sxn + chans * sxc, w_ptr + chans * (K * K), rows, cols,
                          cmask, H, W, sxh, sxw, eps, K, KK_POW2, CONSTRAINED, FLIP,
                          BLOCK_R * BLOCK_Q, BLOCK_C)
    out = (rows < H) & (cols < W) & cmask
    tl.store(y_ptr + n * syn + chans * syc + rows * syh + cols * syw,
             acc.to(y_ptr.dtype.element_ty), mask=out)


@triton.jit
def mcs_weight_grad_cl_kernel(g_ptr, x_ptr, part_ptr, C, H, W,
                              sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
                              K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr,
                              BLOCK_C: tl.constexpr):
    """Per-patch partial sums of g * shifted x for every tap and channel, written to
    ``part[patch, tap, c]`` and reduced by torch.sum afterwards (deterministic, no atomics)."""
    n, rows, cols, chans = patch_coordinates(tl.program_id(0), C, H, W, BLOCK_R, BLOCK_Q,
                                              BLOCK_C)
    pad: tl.constexpr = K // 2
    cmask = chans < C
    inside_out = (rows < H) & (cols < W) & cmask
    g = tl.load(g_ptr + n * sgn + chans * sgc + rows * sgh + cols * sgw, mask=inside_out,
                other=0.0).to(tl.float32)
    x_base = x_ptr + n * sxn + chans * sxc
    out_base = part_ptr + tl.program_id(0).to(tl.int64) * (K * K) * C + chans
    for a in tl.static_range(K):
        r = rows + (a - pad)
        row_ok = (r >= 0) & (r < H)
        for b in tl.static_range(K):
            q = cols + (b - pad)
            inside = row_ok & (q >= 0) & (q < W) & cmask
            xv = tl.load(x_base + r * sxh + q * sxw, mask=inside, other=0.0).to(tl.float32)
            partial = tl.sum(g * xv, axis=0)[None, :]
            tl.store(out_base + (a * K + b) * C, partial, mask=cmask)


def conv_blocks(channels):
    """(BLOCK_R, BLOCK_Q, BLOCK_C): up to 32 channels, about 2048 elements a tile."""
    block_c = min(32, triton.next_power_of_2(channels))
    pixels = max(16, 2048 // block_c)
    block_q = min(32, pixels)
    return pixels // block_q, block_q, block_c


def weight_grad_blocks(channels):
    """Larger patches than the forward: fewer partial sums to write and reduce."""
    block_c = min(32, triton.next_power_of_2(channels))
    pixels = max(64, 8192 // block_c)
    block_q = min(32, pixels)
    return pixels // block_q, block_q, block_c


def patch_grid(x, blocks):
    n, c, h, w = x.shape
    block_r, block_q, block_c = blocks
    return (n * triton.cdiv(h, block_r) * triton.cdiv(w, block_q), triton.cdiv(c, block_c))
