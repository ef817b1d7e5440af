// Row-blocked MCSConv CUDA kernels for filter sizes known at compile time (K = 3, 5, 7).
//
// A "row" is one image row as it lies in memory: in NCHW, W values of one (n, c) plane with
// horizontal neighbours 1 apart; in channels_last, W*C values of one image with horizontal
// neighbours C apart and channel e % C at position e. Consecutive threads take consecutive
// positions, so every load of a warp is contiguous in both layouts. Each thread produces R
// output rows of its column and loads each of the R+K-1 input rows it needs once per column
// tap, into registers: (R+K-1)*K loads for R outputs instead of K*K each.
//
// The file is plain CUDA C++ with one macro, SFI_DYNAMIC_SHARED, so that
// python_tests/cuda_host/ can compile it as host C++ (cuda_host_emulation.h) and check every
// kernel's indexing against a reference on the CPU, where CI has no GPU.
#pragma once

#include <cstdint>

#ifndef SFI_DYNAMIC_SHARED
// The block's dynamic shared memory as `type* name` (size given at launch).
#define SFI_DYNAMIC_SHARED(type, name)                        \
  extern __shared__ __align__(16) unsigned char name##_raw[]; \
  type* name = reinterpret_cast<type*>(name##_raw)
#endif

namespace sficonv {
namespace rows {

// Where a row-layout view of an [N, C, H, W] tensor starts and steps.
struct RowGeometry {
  int64_t row_len;  // values per row: W (NCHW) or W*C (channels_last)
  int step;         // distance between horizontal neighbours: 1 or C
  int channels, h, w;
  bool channels_last;

  __device__ int channel(int64_t group, int64_t e) const {
    return channels_last ? static_cast<int>(e % channels) : static_cast<int>(group % channels);
  }
  __device__ int column(int64_t e) const {
    return channels_last ? static_cast<int>(e / channels) : static_cast<int>(e);
  }
};

// The K horizontal neighbours of one row position (zero outside the image), as acc_t.
// Always inlined, so v and col_ok stay in registers.
template <typename scalar_t, typename acc_t, int K>
__device__ __forceinline__ void load_row(const scalar_t* __restrict__ src, int step,
                                         const bool (&col_ok)[K], acc_t (&v)[K]) {
  constexpr int pad = K / 2;
#pragma unroll
  for (int b = 0; b < K; ++b)
    v[b] = col_ok[b] ? static_cast<acc_t>(src[(b - pad) * static_cast<int64_t>(step)]) : acc_t(0);
}

// Adds input row rr (its K horizontal neighbours v) of the R + K - 1 rows around R consecutive
// output rows to the outputs it meets: output o meets it through filter row rr - o. Inlined into
// fully unrolled loops, so rr is a constant and the range test disappears.
template <typename acc_t, int K, int R>
__device__ __forceinline__ void add_row_to_outputs(const acc_t (&v)[K], const acc_t (&tap)[K * K],
                                                   int rr, acc_t (&acc)[R]) {
#pragma unroll
  for (int o = 0; o < R; ++o) {
    const int a = rr - o;
    if (a < 0 || a >= K) continue;
#pragma unroll
    for (int b = 0; b < K; ++b) acc[o] += tap[a * K + b] * v[b];
  }
}

// grid: x over row positions, y over blocks of R output rows, z over groups (planes in NCHW,
// images in channels_last; looped when there are more than gridDim.z).
template <typename scalar_t, typename acc_t, int K, int R>
__global__ void conv_rows_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ taps,
                                 scalar_t* __restrict__ y, int64_t groups, RowGeometry geo) {
  constexpr int pad = K / 2;
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= geo.row_len) return;
  const int i0 = blockIdx.y * R;
  const int j = geo.column(e);
  bool col_ok[K];
#pragma unroll
  for (int b = 0; b < K; ++b) col_ok[b] = j + b - pad >= 0 && j + b - pad < geo.w;
  for (int64_t group = blockIdx.z; group < groups; group += gridDim.z) {
    const int64_t base = group * geo.h * geo.row_len + e;
    const acc_t* tp = taps + static_cast<int64_t>(geo.channel(group, e)) * K * K;
    acc_t tap[K * K];
#pragma unroll
    for (int t = 0; t < K * K; ++t) tap[t] = tp[t];
    acc_t acc[R];
#pragma unroll
    for (int o = 0; o < R; ++o) acc[o] = acc_t(0);
#pragma unroll
    for (int rr = 0; rr < R + K - 1; ++rr) {
      const int r = i0 + rr - pad;
      if (r < 0 || r >= geo.h) continue;
      acc_t v[K];
      load_row<scalar_t, acc_t, K>(x + base + static_cast<int64_t>(r) * geo.row_len, geo.step,
                                   col_ok, v);
      add_row_to_outputs<acc_t, K, R>(v, tap, rr, acc);
    }
#pragma unroll
    for (int o = 0; o < R; ++o)
      if (i0 + o < geo.h)
        y[base + static_cast<int64_t>(i0 + o) * geo.row_len] = static_cast<scalar_t>(acc[o]);
  }
}

// Adds to acc[a*K+b] the products g(i, j) * x(i + a - pad, j + b - pad) of one column over
// the output rows [row_begin, row_end), R rows at a time. `g` and `x` point at the column's
// position in row 0 of its plane or image.
template <typename scalar_t, typename acc_t, int K, int R>
__device__ void accumulate_column(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                  const RowGeometry& geo, int j, int row_begin, int row_end,
                                  acc_t* acc) {
  constexpr int pad = K / 2;
  bool col_ok[K];
#pragma unroll
  for (int b = 0; b < K; ++b) col_ok[b] = j + b - pad >= 0 && j + b - pad < geo.w;
  for (int i0 = row_begin; i0 < row_end; i0 += R) {
    acc_t gv[R];
#pragma unroll
    for (int o = 0; o < R; ++o)
      gv[o] = i0 + o < row_end ? static_cast<acc_t>(g[static_cast<int64_t>(i0 + o) * geo.row_len])
                               : acc_t(0);
#pragma unroll
    for (int rr = 0; rr < R + K - 1; ++rr) {
      const int r = i0 + rr - pad;
      if (r < 0 || r >= geo.h) continue;
      acc_t v[K];
      load_row<scalar_t, acc_t, K>(x + static_cast<int64_t>(r) * geo.row_len, geo.step, col_ok,
                                   v);
#pragma unroll
      for (int o = 0; o < R; ++o) {
        const int a = rr - o;
        if (a < 0 || a >= K) continue;
#pragma unroll
        for (int b = 0; b < K; ++b) acc[a * K + b] += gv[o] * v[b];
      }
    }
  }
}

// Sum of v over the block's threads in a fixed order (deterministic); valid in thread 0.
// blockDim.x * blockDim.y must be a multiple of 32 and at most 32 * 32.
template <typename acc_t>
__device__ acc_t block_sum_fixed(acc_t v, acc_t* scratch) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int warps = blockDim.x * blockDim.y / 32;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (tid % 32 == 0) scratch[tid / 32] = v;
  __syncthreads();
  acc_t total = 0;
  if (tid == 0)
    for (int i = 0; i < warps; ++i) total += scratch[i];
  __syncthreads();
  return total;
}

// One block of the NCHW gradient kernels: the thread's column j, the block's rows
// [row_begin, row_end), and its slot among the partial sums, partials[plane][chunk][t] with
// chunk = blockIdx.y * gridDim.x + blockIdx.x.
struct NchwGradBlock {
  int j, row_begin, row_end;
  int64_t chunks, chunk;

  __device__ NchwGradBlock(int h, int rows_per_block)
      : j(blockIdx.x * blockDim.x + threadIdx.x),
        row_begin(blockIdx.y * rows_per_block),
        row_end(min(h, row_begin + rows_per_block)),
        chunks(static_cast<int64_t>(gridDim.x) * gridDim.y),
        chunk(static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) {}

  // Sums each of the K*K per-thread values over the block (fixed order) into the plane's slot.
  template <typename acc_t, int KK>
  __device__ void store_sums(const acc_t (&acc)[KK], acc_t* __restrict__ partials,
                             int64_t plane, acc_t* scratch) const {
    acc_t* out = partials + (plane * chunks + chunk) * KK;
#pragma unroll
    for (int t = 0; t < KK; ++t) {
      const acc_t total = block_sum_fixed(acc[t], scratch);
      if (threadIdx.x == 0) out[t] = total;
    }
  }
};

// NCHW weight-gradient partials. Block (column chunk, row chunk, plane): every thread shares
// the plane's channel, so the block reduces its K*K sums and writes one partial per tap (see
// NchwGradBlock).
template <typename scalar_t, typename acc_t, int K, int R>
__global__ void weight_grad_nchw_kernel(const scalar_t* __restrict__ g,
                                        const scalar_t* __restrict__ x,
                                        acc_t* __restrict__ partials, int64_t planes,
                                        RowGeometry geo, int rows_per_block) {
  __shared__ acc_t scratch[32];
  const NchwGradBlock blk(geo.h, rows_per_block);
  for (int64_t plane = blockIdx.z; plane < planes; plane += gridDim.z) {
    acc_t acc[K * K];
#pragma unroll
    for (int t = 0; t < K * K; ++t) acc[t] = acc_t(0);
    if (blk.j < geo.w) {
      const int64_t base = plane * geo.h * geo.row_len + blk.j;
      accumulate_column<scalar_t, acc_t, K, R>(g + base, x + base, geo, blk.j, blk.row_begin,
                                               blk.row_end, acc);
    }
    blk.store_sums(acc, partials, plane, scratch);
  }
}

// NCHW input and weight gradients in one pass over grad_out (g) and x: blocks as in
// weight_grad_nchw_kernel. Each thread walks its column over the block's rows, R at a time,
// loading the R+K-1 rows of g and of x around them once: it writes the R input-gradient values
// (g correlated with the mirrored taps `flipped`) and adds the R x K*K weight products, which
// the block reduces into partials[plane][chunk][t]. The two separate kernels read g twice.
// Opt-in (SFICONV_CUDA_FUSED_BACKWARD=1) until a GPU run has checked and timed it.
template <typename scalar_t, typename acc_t, int K, int R>
__global__ void backward_fused_nchw_kernel(const scalar_t* __restrict__ g,
                                           const scalar_t* __restrict__ x,
                                           const acc_t* __restrict__ flipped,
                                           scalar_t* __restrict__ grad_x,
                                           acc_t* __restrict__ partials, int64_t planes,
                                           RowGeometry geo, int rows_per_block) {
  constexpr int pad = K / 2;
  __shared__ acc_t scratch[32];
  const NchwGradBlock blk(geo.h, rows_per_block);
  const int j = blk.j, row_end = blk.row_end;
  bool col_ok[K];
#pragma unroll
  for (int b = 0; b < K; ++b) col_ok[b] = j + b - pad >= 0 && j + b - pad < geo.w;
  for (int64_t plane = blockIdx.z; plane < planes; plane += gridDim.z) {
    acc_t wacc[K * K];
#pragma unroll
    for (int t = 0; t < K * K; ++t) wacc[t] = acc_t(0);
    if (j < geo.w) {
      const int64_t base = plane * geo.h * geo.row_len + j;
      const acc_t* tp = flipped + (plane % geo.channels) * K * K;
      acc_t tap[K * K];
#pragma unroll
      for (int t = 0; t < K * K; ++t) tap[t] = tp[t];
      for (int i0 = blk.row_begin; i0 < row_end; i0 += R) {
        acc_t gacc[R], gc[R];
#pragma unroll
        for (int o = 0; o < R; ++o) {
          gacc[o] = acc_t(0);
          gc[o] = i0 + o < row_end
                      ? static_cast<acc_t>(g[base + static_cast<int64_t>(i0 + o) * geo.row_len])
                      : acc_t(0);
        }
#pragma unroll
        for (int rr = 0; rr < R + K - 1; ++rr) {
          const int r = i0 + rr - pad;
          if (r < 0 || r >= geo.h) continue;
          const int64_t row = base + static_cast<int64_t>(r) * geo.row_len;
          acc_t gv[K], xv[K];
          load_row<scalar_t, acc_t, K>(g + row, geo.step, col_ok, gv);
          load_row<scalar_t, acc_t, K>(x + row, geo.step, col_ok, xv);
#pragma unroll
          for (int o = 0; o < R; ++o) {
            const int a = rr - o;  // filter row linking row r with output row i0 + o
            if (a < 0 || a >= K) continue;
#pragma unroll
            for (int b = 0; b < K; ++b) {
              gacc[o] += tap[a * K + b] * gv[b];
              wacc[a * K + b] += gc[o] * xv[b];
            }
          }
        }
#pragma unroll
        for (int o = 0; o < R; ++o)
          if (i0 + o < row_end)
            grad_x[base + static_cast<int64_t>(i0 + o) * geo.row_len] =
                static_cast<scalar_t>(gacc[o]);
      }
    }
    blk.store_sums(wacc, partials, plane, scratch);
  }
}

// channels_last weight-gradient partials. threadIdx.x runs over 32 neighbouring channels (one
// contiguous load per warp), threadIdx.y over columns. Block (channel chunk, column chunk,
// image x row chunk) sums over its columns in a fixed order and writes
// partials[spatial_block][c][t], spatial_block = blockIdx.z * gridDim.y + blockIdx.y.
template <typename scalar_t, typename acc_t, int K, int R>
__global__ void weight_grad_cl_kernel(const scalar_t* __restrict__ g,
                                      const scalar_t* __restrict__ x,
                                      acc_t* __restrict__ partials, RowGeometry geo,
                                      int rows_per_block, int row_chunks,
                                      int columns_per_thread) {
  SFI_DYNAMIC_SHARED(acc_t, scratch);  // [blockDim.y][blockDim.x]
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t n = blockIdx.z / row_chunks;
  const int row_begin = static_cast<int>(blockIdx.z % row_chunks) * rows_per_block;
  const int row_end = min(geo.h, row_begin + rows_per_block);
  acc_t acc[K * K];
#pragma unroll
  for (int t = 0; t < K * K; ++t) acc[t] = acc_t(0);
  if (c < geo.channels) {
    const int j_first = (blockIdx.y * columns_per_thread) * blockDim.y + threadIdx.y;
    for (int m = 0; m < columns_per_thread; ++m) {
      const int j = j_first + m * blockDim.y;
      if (j >= geo.w) break;
      const int64_t base = n * geo.h * geo.row_len + static_cast<int64_t>(j) * geo.channels + c;
      accumulate_column<scalar_t, acc_t, K, R>(g + base, x + base, geo, j, row_begin, row_end,
                                               acc);
    }
  }
  const int64_t block = static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y;
#pragma unroll
  for (int t = 0; t < K * K; ++t) {
    scratch[threadIdx.y * blockDim.x + threadIdx.x] = acc[t];
    __syncthreads();
    if (threadIdx.y == 0 && c < geo.channels) {
      acc_t total = 0;
      for (int q = 0; q < static_cast<int>(blockDim.y); ++q)
        total += scratch[q * blockDim.x + threadIdx.x];
      partials[(block * geo.channels + c) * K * K + t] = total;
    }
    __syncthreads();
  }
}

}  // namespace rows
}  // namespace sficonv
