// Double-buffered variant of the shared-memory tile kernel (mcs_conv_cuda_tiles.cuh): NCHW,
// K = 3, 5, 7, forward and input gradient: the default NCHW kernel for rows of whole aligned
// 16-byte vectors (SFICONV_CUDA_NCHW_KERNEL=tiles selects the plain tiles; see mcs_conv_cuda.cu).
// On an H100 (2026-11-27) it took the forward from 42% to 55-67% of the copy rate in float32.
//
// Why: the tile kernel stages a tile, waits for it, computes, and only then asks for the next
// one, with two resident blocks per SM (registers). On an H100 that left DRAM at 29% of its
// throughput (Nsight Compute) and the forward at 42% of the copy bandwidth: too few loads in
// flight. Here each block loops over several planes of one tile position and, while it computes
// plane p from one buffer, the next plane's tile is already on its way into the other buffer:
// the interior with cp.async (global to shared memory, no registers held), the K/2 halo columns
// through a few registers written after the compute. One __syncthreads per plane.
//
// Shared rows are laid out so the interior starts 16 bytes aligned (cp.async needs it): a row
// holds `lead` slots (the left halo in its last pad), TX interior values, the right halo, and
// padding to a whole number of 16-byte vectors. Values stay in the input type until read.
//
// Plain CUDA C++ with two macros, SFI_DYNAMIC_SHARED and the async copy below, so
// python_tests/cuda_host/ runs it as host C++ (copies synchronous there).
#pragma once

#include <cstdint>

#include "mcs_conv_cuda_tiles.cuh"  // Tile, TileGrid, kTileThreads, the column helpers

namespace sficonv {
namespace tiles {

// 16 bytes from global to shared memory, or 16 zero bytes when !valid (src must still point at
// readable memory). Asynchronous on sm_80 and later: complete only after async_copy_wait_all().
__device__ __forceinline__ void async_copy16(void* dst_shared, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(dst_shared));
  const int src_bytes = valid ? 16 : 0;  // cp.async fills the bytes not read with zeros
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
#else
  struct alignas(16) Bytes16 { unsigned char b[16]; };
  Bytes16 value{};
  if (valid) value = *reinterpret_cast<const Bytes16*>(src);
  *reinterpret_cast<Bytes16*>(dst_shared) = value;
#endif
}

// Waits for this thread's async copies (a __syncthreads must follow before others read them).
__device__ __forceinline__ void async_copy_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

constexpr int round_up(int v, int m) { return (v + m - 1) / m * m; }

// The double-buffered layout for one input type.
template <typename scalar_t, int K, int TX>
struct PipelinedTile {
  using T = Tile<K, TX>;
  static constexpr int pad = T::pad;
  static constexpr int vec = 16 / static_cast<int>(sizeof(scalar_t));
  static constexpr int lead = round_up(pad, vec);               // interior's first slot
  static constexpr int stride = round_up(lead + TX + pad, vec);  // slots per staged row
  static constexpr int buffer = stride * T::shared_h;            // slots per buffer
  static constexpr int per_row = TX / vec;                       // interior vectors per row
  static constexpr int vectors = T::shared_h * per_row;
  static constexpr int halo = T::shared_h * 2 * pad;             // halo values per tile
  static constexpr int halo_per_thread = (halo + kTileThreads - 1) / kTileThreads;
  static constexpr size_t shared_bytes = 2 * buffer * sizeof(scalar_t);
  static_assert(TX % vec == 0, "the interior must be whole 16-byte vectors");
  // The launch passes no cudaFuncSetAttribute, so the default 48 KB limit applies.
  static_assert(shared_bytes <= 48 * 1024, "more dynamic shared memory than a default launch");
};

// Starts copying the interior of one plane's tile (rows from y0 - pad, columns x0 .. x0 + TX)
// into buffer `b`; zeros where it lies outside the image. Needs geo.vector_loads.
template <typename scalar_t, int K, int TX>
__device__ __forceinline__ void start_interior(const scalar_t* __restrict__ plane,
                                               const TileGrid& geo, int y0, int x0,
                                               scalar_t* __restrict__ b, int tid) {
  using P = PipelinedTile<scalar_t, K, TX>;
#pragma unroll
  for (int base = 0; base < P::vectors; base += kTileThreads) {
    const int i = base + tid;
    if (i < P::vectors) {
      const int r = i / P::per_row, col = (i % P::per_row) * P::vec;
      const int gy = y0 - P::pad + r, gx = x0 + col;
      const bool inside = gy >= 0 && gy < geo.h && gx < geo.w;  // w is whole vectors
      const scalar_t* src = inside ? plane + static_cast<int64_t>(gy) * geo.w + gx : plane;
      async_copy16(b + r * P::stride + P::lead + col, src, inside);
    }
  }
}

// The halo values this thread stages (loaded now, stored by store_halo after the compute).
template <typename scalar_t, int K, int TX>
__device__ __forceinline__ void load_halo(const scalar_t* __restrict__ plane, const TileGrid& geo,
                                          int y0, int x0, int tid,
                                          scalar_t (&v)[PipelinedTile<scalar_t, K, TX>::halo_per_thread]) {
  using P = PipelinedTile<scalar_t, K, TX>;
#pragma unroll
  for (int j = 0; j < P::halo_per_thread; ++j) {
    const int i = tid + j * kTileThreads;
    v[j] = scalar_t(0);
    if (P::pad > 0 && i < P::halo) {
      const int r = i / (2 * P::pad), side = i % (2 * P::pad);
      const int gy = y0 - P::pad + r;
      const int gx = side < P::pad ? x0 - P::pad + side : x0 + TX + side - P::pad;
      if (gy >= 0 && gy < geo.h && gx >= 0 && gx < geo.w)
        v[j] = plane[static_cast<int64_t>(gy) * geo.w + gx];
    }
  }
}

template <typename scalar_t, int K, int TX>
__device__ __forceinline__ void store_halo(scalar_t* __restrict__ b, int tid,
                                           const scalar_t (&v)[PipelinedTile<scalar_t, K, TX>::halo_per_thread]) {
  using P = PipelinedTile<scalar_t, K, TX>;
#pragma unroll
  for (int j = 0; j < P::halo_per_thread; ++j) {
    const int i = tid + j * kTileThreads;
    if (P::pad > 0 && i < P::halo) {
      const int r = i / (2 * P::pad), side = i % (2 * P::pad);
      const int slot = side < P::pad ? P::lead - P::pad + side : P::lead + TX + side - P::pad;
      b[r * P::stride + slot] = v[j];
    }
  }
}

// y = depthwise correlation of x with taps ([C, K*K] in acc_t), NCHW, as conv_tile_kernel, for
// inputs with geo.vector_loads. Grid: x over tiles of a plane, y over planes, looped (the launch
// keeps gridDim.y small enough that every block has several planes to pipeline). Dynamic shared
// memory: PipelinedTile::shared_bytes.
template <typename scalar_t, typename acc_t, int K, int TX>
__global__ void conv_tile_pipelined_kernel(const scalar_t* __restrict__ x,
                                           const acc_t* __restrict__ taps,
                                           scalar_t* __restrict__ y, int channels, TileGrid geo) {
  using T = Tile<K, TX>;
  using P = PipelinedTile<scalar_t, K, TX>;
  SFI_DYNAMIC_SHARED(scalar_t, s);
  const int x0 = static_cast<int>(blockIdx.x % geo.tiles_x) * TX;
  const int y0 = static_cast<int>(blockIdx.x / geo.tiles_x) * T::rows;
  const int tx = threadIdx.x, row0 = threadIdx.y * T::R;
  const int tid = threadIdx.y * TX + tx;
  const int64_t plane_size = static_cast<int64_t>(geo.h) * geo.w;
  scalar_t halo[P::halo_per_thread];

  int64_t plane = blockIdx.y;
  if (plane < geo.planes) {  // the first plane: nothing to overlap with yet
    start_interior<scalar_t, K, TX>(x + plane * plane_size, geo, y0, x0, s, tid);
    load_halo<scalar_t, K, TX>(x + plane * plane_size, geo, y0, x0, tid, halo);
    store_halo<scalar_t, K, TX>(s, tid, halo);
  }
  for (int current = 0; plane < geo.planes; plane += gridDim.y, current ^= 1) {
    // This plane's tile is complete and visible, and every thread is done reading the other
    // buffer (the previous plane), so the next plane may go there.
    async_copy_wait_all();
    __syncthreads();
    const scalar_t* cur = s + current * P::buffer;
    scalar_t* next_buf = s + (current ^ 1) * P::buffer;
    const int64_t next = plane + gridDim.y;
    const bool has_next = next < geo.planes;
    if (has_next) {
      start_interior<scalar_t, K, TX>(x + next * plane_size, geo, y0, x0, next_buf, tid);
      load_halo<scalar_t, K, TX>(x + next * plane_size, geo, y0, x0, tid, halo);
    }
    acc_t tap[K * K];
    load_taps<acc_t, K>(taps, plane, channels, tap);
    acc_t acc[T::R];
    correlate_column<acc_t, K, T::R>(cur + row0 * P::stride + P::lead - P::pad + tx, P::stride,
                                     tap, acc);
    store_column<scalar_t, acc_t, T::R>(y + plane * plane_size, geo, y0 + row0, x0 + tx, acc);
    if (has_next) store_halo<scalar_t, K, TX>(next_buf, tid, halo);
  }
}

}  // namespace tiles
}  // namespace sficonv
