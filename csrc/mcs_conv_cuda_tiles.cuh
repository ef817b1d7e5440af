// Shared-memory tiled MCSConv CUDA kernel for NCHW inputs and K = 3, 5, 7: the forward, and the
// input gradient (the same correlation with the mirrored taps).
//
// A block of kTileThreads threads owns one output tile of one plane: TX columns (one per
// threadIdx.x) by TY * R rows (each threadIdx.y computes R consecutive rows). It first stages the
// tile plus its K/2 halo in shared memory with every load of the block issued up front
// (independent loads, 16-byte vectors for the tile's interior when rows allow it): the
// row-blocked kernels of mcs_conv_cuda_rows.cuh issue their loads one row at a time and wait on
// each (latency-bound at about a quarter of the copy bandwidth on an H100, per Nsight Compute).
// Then each thread slides down its column in shared memory, reading each of its R + K - 1 rows
// once per column tap, as the row kernels do from global memory.
//
// On an H100 ([64, 64, 64, 64], 2026-11-26) this forward took 0.116 ms in float32 against the
// row kernel's 0.197 (42% of the copy bandwidth; Nsight Compute: 25% occupancy, limited by
// registers). A one-pass backward built the same way (both tiles staged, the K*K weight sums
// reduced over each 256-thread block) took 0.70 ms against 0.52 for the row kernels' two
// passes, so the weight gradient stays with weight_grad_nchw_kernel.
//
// Plain CUDA C++ with SFI_DYNAMIC_SHARED, so python_tests/cuda_host/ runs it as host C++ too.
#pragma once

#include <cstdint>

#include "mcs_conv_cuda_rows.cuh"  // SFI_DYNAMIC_SHARED, add_row_to_outputs

namespace sficonv {
namespace tiles {

constexpr int kTileThreads = 256;
constexpr int kTileRowsPerThread = 8;  // R

// One plane tile's geometry; TX threads across, kTileThreads / TX thread rows.
template <int K, int TX>
struct Tile {
  static constexpr int pad = K / 2;
  static constexpr int R = kTileRowsPerThread;
  static constexpr int TY = kTileThreads / TX;
  static constexpr int rows = TY * R;           // output rows per tile
  static constexpr int shared_w = TX + K - 1;   // staged columns (with halo)
  static constexpr int shared_h = rows + K - 1;  // staged rows (with halo)
  static constexpr int shared_size = shared_w * shared_h;
};

// Where the tiles of an [planes, h, w] tensor lie, and how the grid covers them.
struct TileGrid {
  int64_t planes;
  int h, w;
  int tiles_x;        // tiles across a plane
  bool vector_loads;  // rows 16-byte aligned and w a whole number of vectors
};

// Stages rows [y0 - pad, y0 - pad + shared_h) and columns [x0 - pad, x0 - pad + shared_w) of one
// plane into `s` as acc_t, zero outside the image. The caller synchronises afterwards.
template <typename scalar_t, typename acc_t, int K, int TX>
__device__ __forceinline__ void stage_tile(const scalar_t* __restrict__ plane,
                                           const TileGrid& geo, int y0, int x0,
                                           acc_t* __restrict__ s) {
  using T = Tile<K, TX>;
  const int tid = threadIdx.y * TX + threadIdx.x;
  constexpr int vec = 16 / sizeof(scalar_t);
  if (geo.vector_loads && TX % vec == 0) {
    // Interior columns [x0, x0 + TX) as 16-byte vectors; w is a multiple of vec, so a vector
    // is wholly inside the image or wholly outside.
    struct alignas(16) Vec { scalar_t v[vec]; };
    constexpr int per_row = TX / vec;
    constexpr int count = T::shared_h * per_row;
#pragma unroll
    for (int base = 0; base < count; base += kTileThreads) {
      const int i = base + tid;
      if (i < count) {
        const int r = i / per_row, col = (i % per_row) * vec;
        const int gy = y0 - T::pad + r, gx = x0 + col;
        acc_t* dst = s + r * T::shared_w + T::pad + col;
        if (gy >= 0 && gy < geo.h && gx < geo.w) {
          const Vec v =
              *reinterpret_cast<const Vec*>(plane + static_cast<int64_t>(gy) * geo.w + gx);
#pragma unroll
          for (int e = 0; e < vec; ++e) dst[e] = static_cast<acc_t>(v.v[e]);
        } else {
#pragma unroll
          for (int e = 0; e < vec; ++e) dst[e] = acc_t(0);
        }
      }
    }
    // The halo columns: pad on each side of every staged row.
    if (T::pad > 0) {
      constexpr int halo = T::shared_h * 2 * T::pad;
      for (int i = tid; i < halo; i += kTileThreads) {
        const int r = i / (2 * T::pad), side = i % (2 * T::pad);
        const int col = side < T::pad ? side : TX + side;  // staged column
        const int gy = y0 - T::pad + r, gx = x0 - T::pad + col;
        const bool inside = gy >= 0 && gy < geo.h && gx >= 0 && gx < geo.w;
        s[r * T::shared_w + col] =
            inside ? static_cast<acc_t>(plane[static_cast<int64_t>(gy) * geo.w + gx]) : acc_t(0);
      }
    }
    return;
  }
#pragma unroll 4
  for (int i = tid; i < T::shared_size; i += kTileThreads) {
    const int r = i / T::shared_w, col = i % T::shared_w;
    const int gy = y0 - T::pad + r, gx = x0 - T::pad + col;
    s[i] = gy >= 0 && gy < geo.h && gx >= 0 && gx < geo.w
               ? static_cast<acc_t>(plane[static_cast<int64_t>(gy) * geo.w + gx])
               : acc_t(0);
  }
}

// The K*K taps of one plane's channel, into registers.
template <typename acc_t, int K>
__device__ __forceinline__ void load_taps(const acc_t* __restrict__ taps, int64_t plane,
                                          int channels, acc_t (&tap)[K * K]) {
  const acc_t* tp = taps + (plane % channels) * K * K;
#pragma unroll
  for (int t = 0; t < K * K; ++t) tap[t] = tp[t];
}

// One thread's R outputs down its column, from R + K - 1 staged rows `stride` apart; `first`
// points at the first row's leftmost window value. Staged values may be in the input type.
template <typename acc_t, int K, int R, typename staged_t>
__device__ __forceinline__ void correlate_column(const staged_t* first, int stride,
                                                 const acc_t (&tap)[K * K], acc_t (&acc)[R]) {
#pragma unroll
  for (int o = 0; o < R; ++o) acc[o] = acc_t(0);
#pragma unroll
  for (int rr = 0; rr < R + K - 1; ++rr) {
    const staged_t* row = first + rr * stride;
    acc_t v[K];
#pragma unroll
    for (int b = 0; b < K; ++b) v[b] = static_cast<acc_t>(row[b]);
    rows::add_row_to_outputs<acc_t, K, R>(v, tap, rr, acc);
  }
}

// Writes the R outputs of column ox from row oy0 of one output plane (those inside it).
template <typename scalar_t, typename acc_t, int R>
__device__ __forceinline__ void store_column(scalar_t* __restrict__ plane, const TileGrid& geo,
                                             int oy0, int ox, const acc_t (&acc)[R]) {
  if (ox >= geo.w) return;
#pragma unroll
  for (int o = 0; o < R; ++o)
    if (oy0 + o < geo.h)
      plane[static_cast<int64_t>(oy0 + o) * geo.w + ox] = static_cast<scalar_t>(acc[o]);
}

// The kernel body, shared by the plain tile kernel and its register-capped build below.
template <typename scalar_t, typename acc_t, int K, int TX>
__device__ __forceinline__ void conv_tile(const scalar_t* __restrict__ x,
                                          const acc_t* __restrict__ taps,
                                          scalar_t* __restrict__ y, int channels,
                                          const TileGrid& geo) {
  using T = Tile<K, TX>;
  SFI_DYNAMIC_SHARED(acc_t, s);
  const int x0 = static_cast<int>(blockIdx.x % geo.tiles_x) * TX;
  const int y0 = static_cast<int>(blockIdx.x / geo.tiles_x) * T::rows;
  const int tx = threadIdx.x, row0 = threadIdx.y * T::R;  // the thread's first row in the tile
  const int64_t plane_size = static_cast<int64_t>(geo.h) * geo.w;
  for (int64_t plane = blockIdx.y; plane < geo.planes; plane += gridDim.y) {
    stage_tile<scalar_t, acc_t, K, TX>(x + plane * plane_size, geo, y0, x0, s);
    acc_t tap[K * K];
    load_taps<acc_t, K>(taps, plane, channels, tap);
    __syncthreads();
    acc_t acc[T::R];
    correlate_column<acc_t, K, T::R>(s + row0 * T::shared_w + tx, T::shared_w, tap, acc);
    store_column<scalar_t, acc_t, T::R>(y + plane * plane_size, geo, y0 + row0, x0 + tx, acc);
    __syncthreads();  // the next plane restages s
  }
}

// y = depthwise correlation of x with taps ([C, K*K] in acc_t), NCHW; also the input gradient
// when given grad_out and the mirrored taps. Grid: x over tiles of a plane, y over planes
// (looped when there are more than gridDim.y). Dynamic shared memory: Tile::shared_size acc_t.
// No __launch_bounds__: even __launch_bounds__(256, 1) changes the code nvcc 13.0 generates
// (153 registers instead of 128 for float32, k = 5: one resident block per SM instead of two).
template <typename scalar_t, typename acc_t, int K, int TX>
__global__ void conv_tile_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ taps,
                                 scalar_t* __restrict__ y, int channels, TileGrid geo) {
  conv_tile<scalar_t, acc_t, K, TX>(x, taps, y, channels, geo);
}

// The same, capped so that MIN_BLOCKS blocks fit on an SM (an experiment, see tile_min_blocks
// in mcs_conv_cuda.cu).
template <typename scalar_t, typename acc_t, int K, int TX, int MIN_BLOCKS>
__global__ void __launch_bounds__(kTileThreads, MIN_BLOCKS)
    conv_tile_kernel_capped(const scalar_t* __restrict__ x, const acc_t* __restrict__ taps,
                            scalar_t* __restrict__ y, int channels, TileGrid geo) {
  conv_tile<scalar_t, acc_t, K, TX>(x, taps, y, channels, geo);
}

}  // namespace tiles
}  // namespace sficonv
