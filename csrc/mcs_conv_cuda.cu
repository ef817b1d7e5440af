// MCSConv CUDA kernels. Only the ATen/c10 headers each part needs are included: a full
// <torch/extension.h> multiplies nvcc time many times over.
//
// Forward: a small prologue kernel turns the raw weight into the effective (constrained) taps in
// float32/float64. For k = 3, 5, 7 (the network uses 5): NCHW runs the double-buffered
// shared-memory tiles of mcs_conv_cuda_tiles_pipelined.cuh (forward and input gradient; the plain
// tiles of mcs_conv_cuda_tiles.cuh for rows that are not whole aligned 16-byte vectors, or with
// SFICONV_CUDA_NCHW_KERNEL=tiles), channels_last the row-blocked kernels of
// mcs_conv_cuda_rows.cuh (NCHW too with SFICONV_CUDA_NCHW_KERNEL=rows); the weight gradient
// runs the row-blocked kernels in both layouts. Other k: NCHW runs a simple tiled kernel,
// channels_last a per-element kernel. Backward: the input gradient is the same convolution with
// the mirrored filter; the weight gradient is reduced per (channel, fixed block of pixels) in
// registers and shared memory, then summed over blocks by at::sum: no atomics, so the result is
// deterministic run to run.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>

#include "error_text.h"
#include "mcs_conv.h"
#include "mcs_conv_cuda_config.h"
#include "mcs_conv_cuda_rows.cuh"
#include "mcs_conv_cuda_tiles.cuh"
#include "mcs_conv_cuda_tiles_pipelined.cuh"

namespace sficonv {
namespace {

constexpr int kTileW = 32;
constexpr int kTileH = 8;
constexpr int kMaxTiledK = 9;  // larger filters use the per-element kernel
constexpr int kThreads = 256;
constexpr int kRowBlock = 8;        // output rows per thread in the row-blocked kernels
constexpr int kGradRowsPerBlock = 32;  // rows each weight-gradient block reduces
constexpr int kMaxGrid = 65535;     // gridDim.y and gridDim.z limit
constexpr int kClColumnsPerThread = 2;  // columns each channels_last weight-gradient thread sums
constexpr int kMaxCachedDevices = 64;   // devices whose launch limits are remembered

template <typename scalar_t, typename acc_t>
__global__ void taps_kernel(const scalar_t* __restrict__ weight, acc_t* __restrict__ taps,
                            int64_t channels, int k, bool constrained, acc_t eps, bool flip) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c < channels) effective_taps<scalar_t, acc_t>(weight + c * k * k, k, constrained, eps,
                                                    flip, taps + c * k * k);
}

// dL/d(raw weight) from dL/d(effective taps), one thread per channel (constraint_grad).
template <typename scalar_t, typename acc_t>
__global__ void constraint_grad_kernel(const acc_t* __restrict__ grad_eff,
                                       const scalar_t* __restrict__ weight,
                                       scalar_t* __restrict__ grad_w, int64_t channels, int k,
                                       bool constrained, acc_t eps) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c < channels)
    constraint_grad<scalar_t, acc_t>(grad_eff + c * k * k, weight + c * k * k, k, constrained,
                                     eps, grad_w + c * k * k);
}

// NCHW: one block computes a kTileH x kTileW output tile of one plane.
template <typename scalar_t, typename acc_t>
__global__ void conv_nchw_tiled(const scalar_t* __restrict__ x, const acc_t* __restrict__ taps,
                                scalar_t* __restrict__ y, int64_t planes, int channels, int h,
                                int w, int k) {
  extern __shared__ __align__(16) unsigned char shared_raw[];  // holds float or double
  acc_t* tile = reinterpret_cast<acc_t*>(shared_raw);
  const int pad = k / 2, tw = kTileW + k - 1, th = kTileH + k - 1;
  acc_t* tap_s = tile + tw * th;
  const int tiles_x = (w + kTileW - 1) / kTileW;
  const int x0 = (blockIdx.x % tiles_x) * kTileW, y0 = (blockIdx.x / tiles_x) * kTileH;
  const int tid = threadIdx.y * kTileW + threadIdx.x;
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const scalar_t* xp = x + plane * h * w;
    const acc_t* tp = taps + (plane % channels) * k * k;
    for (int i = tid; i < tw * th; i += kTileW * kTileH) {
      const int gy = y0 - pad + i / tw, gx = x0 - pad + i % tw;
      tile[i] = (gy >= 0 && gy < h && gx >= 0 && gx < w)
                    ? static_cast<acc_t>(xp[static_cast<int64_t>(gy) * w + gx])
                    : acc_t(0);
    }
    for (int i = tid; i < k * k; i += kTileW * kTileH) tap_s[i] = tp[i];
    __syncthreads();
    const int ox = x0 + threadIdx.x, oy = y0 + threadIdx.y;
    if (ox < w && oy < h) {
      acc_t sum = 0;
      for (int a = 0; a < k; ++a)
        for (int b = 0; b < k; ++b)
          sum += tap_s[a * k + b] * tile[(threadIdx.y + a) * tw + threadIdx.x + b];
      y[plane * h * w + static_cast<int64_t>(oy) * w + ox] = static_cast<scalar_t>(sum);
    }
    __syncthreads();
  }
}

// Any layout, any k: one thread per output element, elements ordered as stored in memory.
template <typename scalar_t, typename acc_t>
__global__ void conv_elementwise(const scalar_t* __restrict__ x, const acc_t* __restrict__ taps,
                                 scalar_t* __restrict__ y, int64_t total, int channels, int h,
                                 int w, int k, bool channels_last) {
  const int pad = k / 2;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c, i, j;
    if (channels_last) {
      c = e % channels; j = (e / channels) % w; i = (e / channels / w) % h;
      n = e / (static_cast<int64_t>(channels) * w * h);
    } else {
      j = e % w; i = (e / w) % h; c = (e / w / h) % channels;
      n = e / (static_cast<int64_t>(channels) * w * h);
    }
    const acc_t* tp = taps + c * k * k;
    acc_t sum = 0;
    for (int a = 0; a < k; ++a) {
      const int64_t r = i + a - pad;
      if (r < 0 || r >= h) continue;
      for (int b = 0; b < k; ++b) {
        const int64_t q = j + b - pad;
        if (q < 0 || q >= w) continue;
        const int64_t src = channels_last ? ((n * h + r) * w + q) * channels + c
                                          : ((n * channels + c) * h + r) * w + q;
        sum += tp[a * k + b] * static_cast<acc_t>(x[src]);
      }
    }
    y[e] = static_cast<scalar_t>(sum);
  }
}

template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* scratch) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  acc_t total = 0;
  if (threadIdx.x == 0)
    for (int i = 0; i < blockDim.x / 32; ++i) total += scratch[i];
  __syncthreads();
  return total;  // valid in thread 0
}

// dL/dw_eff partials: block (chunk, channel) sums g * shifted x over a fixed pixel chunk.
// K > 0: filter size known at compile time, all K*K sums kept in registers in one pass.
// K == 0: any k, one tap at a time.
template <typename scalar_t, typename acc_t, int K>
__global__ void weight_grad_partials(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                     acc_t* __restrict__ partials, int64_t n_pixels, int channels,
                                     int h, int w, int k_runtime, bool channels_last,
                                     int64_t chunk_len) {
  __shared__ acc_t scratch[kThreads / 32];
  const int k = K > 0 ? K : k_runtime, kk = k * k, pad = k / 2;
  const int64_t c = blockIdx.y, chunk = blockIdx.x;
  const int64_t begin = chunk * chunk_len;
  const int64_t end = begin + chunk_len < n_pixels ? begin + chunk_len : n_pixels;
  auto at = [&](int64_t n, int64_t i, int64_t j) {
    return channels_last ? ((n * h + i) * w + j) * channels + c
                         : ((n * channels + c) * h + i) * w + j;
  };
  acc_t* out = partials + (c * gridDim.x + chunk) * kk;
  if (K > 0) {
    acc_t acc[K > 0 ? K * K : 1];
    for (int t = 0; t < kk; ++t) acc[t] = 0;
    for (int64_t p = begin + threadIdx.x; p < end; p += blockDim.x) {
      const int64_t j = p % w, i = (p / w) % h, n = p / (static_cast<int64_t>(w) * h);
      const acc_t gv = static_cast<acc_t>(g[at(n, i, j)]);
#pragma unroll
      for (int a = 0; a < (K > 0 ? K : 1); ++a) {
        const int64_t r = i + a - pad;
#pragma unroll
        for (int b = 0; b < (K > 0 ? K : 1); ++b) {
          const int64_t q = j + b - pad;
          if (r >= 0 && r < h && q >= 0 && q < w)
            acc[a * k + b] += gv * static_cast<acc_t>(x[at(n, r, q)]);
        }
      }
    }
    for (int t = 0; t < kk; ++t) {
      const acc_t total = block_sum(acc[t], scratch);
      if (threadIdx.x == 0) out[t] = total;
    }
  } else {
    for (int t = 0; t < kk; ++t) {
      const int a = t / k, b = t % k;
      acc_t acc = 0;
      for (int64_t p = begin + threadIdx.x; p < end; p += blockDim.x) {
        const int64_t j = p % w, i = (p / w) % h, n = p / (static_cast<int64_t>(w) * h);
        const int64_t r = i + a - pad, q = j + b - pad;
        if (r >= 0 && r < h && q >= 0 && q < w)
          acc += static_cast<acc_t>(g[at(n, i, j)]) * static_cast<acc_t>(x[at(n, r, q)]);
      }
      const acc_t total = block_sum(acc, scratch);
      if (threadIdx.x == 0) out[t] = total;
    }
  }
}

bool is_channels_last(const at::Tensor& x) {
  return kernel_layout(x) == at::MemoryFormat::ChannelsLast;
}

template <typename scalar_t>
at::Tensor compute_taps(const at::Tensor& weight, bool constrained, double eps, bool flip) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = weight.size(0);
  const int k = static_cast<int>(weight.size(2));
  at::Tensor taps = at::empty({channels, k * k},
                              weight.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const int blocks = static_cast<int>((channels + kThreads - 1) / kThreads);
  taps_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      weight.data_ptr<scalar_t>(), taps.data_ptr<acc_t>(), channels, k, constrained,
      static_cast<acc_t>(eps), flip);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return taps;
}

// The weight gradient from dL/d(effective taps) `grad_eff` ([C, k*k], acc_t): one launch (the
// chain of tensor ops it replaces was about twenty launches, a large part of a small backward).
template <typename scalar_t>
at::Tensor constraint_backward_cuda(const at::Tensor& grad_eff, const at::Tensor& weight,
                                    bool constrained, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = weight.size(0);
  const int k = static_cast<int>(weight.size(2));
  const auto ge = grad_eff.contiguous();
  auto grad_w = at::empty(weight.sizes(), weight.options());  // contiguous, like `weight` here
  const int blocks = static_cast<int>((channels + kThreads - 1) / kThreads);
  constraint_grad_kernel<scalar_t, acc_t><<<blocks, kThreads, 0,
                                            c10::cuda::getCurrentCUDAStream()>>>(
      ge.data_ptr<acc_t>(), weight.data_ptr<scalar_t>(), grad_w.data_ptr<scalar_t>(), channels,
      k, constrained, static_cast<acc_t>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_w;
}

rows::RowGeometry row_geometry(const at::Tensor& x) {
  rows::RowGeometry geo;
  geo.channels = static_cast<int>(x.size(1));
  geo.h = static_cast<int>(x.size(2));
  geo.w = static_cast<int>(x.size(3));
  geo.channels_last = is_channels_last(x);
  geo.row_len = geo.channels_last ? x.size(3) * x.size(1) : x.size(3);
  geo.step = geo.channels_last ? geo.channels : 1;
  return geo;
}

int row_threads(int64_t row_len, int most) {
  return static_cast<int>(std::min<int64_t>(most, (row_len + 31) / 32 * 32));
}

template <typename scalar_t>
void launch_conv_rows(const at::Tensor& x, const at::Tensor& taps, at::Tensor& y, int k) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto geo = row_geometry(x);
  const int64_t groups = geo.channels_last ? x.size(0) : x.size(0) * x.size(1);
  const int threads = row_threads(geo.row_len, kThreads);
  const int64_t blocks_x = (geo.row_len + threads - 1) / threads;
  SFI_CHECK(blocks_x <= INT32_MAX, "mcs_conv: image rows too long for the CUDA kernel");
  const dim3 grid(static_cast<unsigned>(blocks_x),
                  static_cast<unsigned>((geo.h + kRowBlock - 1) / kRowBlock),
                  static_cast<unsigned>(std::min<int64_t>(groups, kMaxGrid)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const acc_t* tp = taps.data_ptr<acc_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  switch (k) {
    case 3: rows::conv_rows_kernel<scalar_t, acc_t, 3, kRowBlock>
                <<<grid, threads, 0, stream>>>(xp, tp, yp, groups, geo); break;
    case 5: rows::conv_rows_kernel<scalar_t, acc_t, 5, kRowBlock>
                <<<grid, threads, 0, stream>>>(xp, tp, yp, groups, geo); break;
    default: rows::conv_rows_kernel<scalar_t, acc_t, 7, kRowBlock>
                 <<<grid, threads, 0, stream>>>(xp, tp, yp, groups, geo);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The NCHW tile kernels (plain or double-buffered) unless SFICONV_CUDA_NCHW_KERNEL=rows.
// `config` is read (and so checked) once per op call, whatever the input: mcs_conv_cuda_config.h.
bool can_tile(const at::Tensor& x, int k, const CudaKernelConfig& config) {
  return config.nchw_kernel != NchwKernel::kRows && !is_channels_last(x) &&
         (k == 3 || k == 5 || k == 7);
}

// Threads across a tile: 64, or 32 for narrow planes (fewer idle columns).
int tile_width(int64_t w) { return w > 32 ? 64 : 32; }

// 16-byte staging needs W a whole number of vectors and an aligned base address (the plane and
// row offsets are then multiples of 16 bytes too).
tiles::TileGrid tile_grid(const at::Tensor& x, int tx) {
  tiles::TileGrid geo;
  geo.planes = x.size(0) * x.size(1);
  geo.h = static_cast<int>(x.size(2));
  geo.w = static_cast<int>(x.size(3));
  geo.tiles_x = static_cast<int>((static_cast<int64_t>(geo.w) + tx - 1) / tx);
  const int vec = 16 / static_cast<int>(x.element_size());
  geo.vector_loads =
      geo.w % vec == 0 && reinterpret_cast<std::uintptr_t>(x.data_ptr()) % 16 == 0;
  return geo;
}

dim3 tile_launch_grid(const tiles::TileGrid& geo, int tx, int rows) {
  const int64_t tiles =
      static_cast<int64_t>(geo.tiles_x) * ((static_cast<int64_t>(geo.h) + rows - 1) / rows);
  SFI_CHECK(tiles <= INT32_MAX, "mcs_conv: image too large for the tiled CUDA kernel");
  return dim3(static_cast<unsigned>(tiles),
              static_cast<unsigned>(std::min<int64_t>(geo.planes, kMaxGrid)));
}

template <typename scalar_t, int K, int TX, int MIN_BLOCKS>
void launch_conv_tiles_k(const at::Tensor& x, const at::Tensor& taps, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  using T = tiles::Tile<K, TX>;
  const auto geo = tile_grid(x, TX);
  const dim3 grid = tile_launch_grid(geo, TX, T::rows), block(TX, T::TY);
  const size_t shared = T::shared_size * sizeof(acc_t);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const acc_t* tp = taps.data_ptr<acc_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int channels = static_cast<int>(x.size(1));
  if constexpr (MIN_BLOCKS == 1) {
    tiles::conv_tile_kernel<scalar_t, acc_t, K, TX>
        <<<grid, block, shared, stream>>>(xp, tp, yp, channels, geo);
  } else {
    tiles::conv_tile_kernel_capped<scalar_t, acc_t, K, TX, MIN_BLOCKS>
        <<<grid, block, shared, stream>>>(xp, tp, yp, channels, geo);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int K, int MIN_BLOCKS>
void launch_conv_tiles_mb(const at::Tensor& x, const at::Tensor& taps, at::Tensor& y) {
  if (tile_width(x.size(3)) == 64) launch_conv_tiles_k<scalar_t, K, 64, MIN_BLOCKS>(x, taps, y);
  else launch_conv_tiles_k<scalar_t, K, 32, MIN_BLOCKS>(x, taps, y);
}

// The double-buffered tiles. Its grid fills every SM at most once at the occupancy the kernel
// reaches (one wave), each block looping over planes/gridDim.y planes of its tile position:
// the loop is what lets a block fetch one plane while it computes another.
template <typename scalar_t, int K, int TX>
void launch_conv_tiles_pipelined_k(const at::Tensor& x, const at::Tensor& taps, at::Tensor& y,
                                   const tiles::TileGrid& geo) {
  using acc_t = at::opmath_type<scalar_t>;
  using T = tiles::Tile<K, TX>;
  using P = tiles::PipelinedTile<scalar_t, K, TX>;
  auto kernel = tiles::conv_tile_pipelined_kernel<scalar_t, acc_t, K, TX>;
  // Blocks of this kernel the device holds at once: two driver queries, made once per device
  // (this instantiation is one kernel), not on every call.
  static std::array<std::atomic<int64_t>, kMaxCachedDevices> resident_on{};  // 0: not asked yet
  const int device = c10::cuda::current_device();
  int64_t resident = device < kMaxCachedDevices ? resident_on[device].load() : 0;
  if (resident == 0) {
    int per_sm = 0, sms = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel,
                                                                 tiles::kTileThreads,
                                                                 P::shared_bytes));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    resident = static_cast<int64_t>(std::max(per_sm, 1)) * std::max(sms, 1);
    if (device < kMaxCachedDevices) resident_on[device].store(resident);
  }
  const dim3 full = tile_launch_grid(geo, TX, T::rows);  // gridDim.y = min(planes, kMaxGrid)
  // Rounded down: one block more than fits would make a second wave as long as the first
  // (every block loops over planes / gridDim.y planes).
  const int64_t planes_at_once = std::max<int64_t>(resident / full.x, 1);
  const dim3 grid(full.x, static_cast<unsigned>(std::min<int64_t>(planes_at_once, full.y)));
  kernel<<<grid, dim3(TX, T::TY), P::shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<scalar_t>(), taps.data_ptr<acc_t>(), y.data_ptr<scalar_t>(),
      static_cast<int>(x.size(1)), geo);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether the double-buffered tiles can take x (16-byte copies need whole aligned vectors),
// and if so launches them.
template <typename scalar_t, int K>
bool launch_conv_tiles_pipelined(const at::Tensor& x, const at::Tensor& taps, at::Tensor& y) {
  const int tx = tile_width(x.size(3));
  const auto geo = tile_grid(x, tx);
  if (!geo.vector_loads) return false;
  if (tx == 64) launch_conv_tiles_pipelined_k<scalar_t, K, 64>(x, taps, y, geo);
  else launch_conv_tiles_pipelined_k<scalar_t, K, 32>(x, taps, y, geo);
  return true;
}

template <typename scalar_t, int K>
void launch_conv_tiles(const at::Tensor& x, const at::Tensor& taps, at::Tensor& y,
                       const CudaKernelConfig& config) {
  // A register cap (SFICONV_CUDA_TILE_MIN_BLOCKS) selects the plain tiles; with an explicit
  // tiles-pipelined it was refused by cuda_kernel_config.
  const int min_blocks = config.tile_min_blocks;
  const bool pipelined = config.nchw_kernel == NchwKernel::kTilesPipelined;
  if (pipelined && min_blocks == 1 && launch_conv_tiles_pipelined<scalar_t, K>(x, taps, y))
    return;
  switch (min_blocks) {
    case 3: launch_conv_tiles_mb<scalar_t, K, 3>(x, taps, y); break;
    case 4: launch_conv_tiles_mb<scalar_t, K, 4>(x, taps, y); break;
    default: launch_conv_tiles_mb<scalar_t, K, 1>(x, taps, y);
  }
}

// y = depthwise correlation of x with `taps` ([C, k*k]); y has x's layout.
template <typename scalar_t>
void launch_conv(const at::Tensor& x, const at::Tensor& taps, at::Tensor& y, int k,
                 const CudaKernelConfig& config) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = x.size(0), channels = x.size(1), h = x.size(2), w = x.size(3);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool cl = is_channels_last(x);
  if (can_tile(x, k, config)) {
    switch (k) {
      case 3: launch_conv_tiles<scalar_t, 3>(x, taps, y, config); break;
      case 5: launch_conv_tiles<scalar_t, 5>(x, taps, y, config); break;
      default: launch_conv_tiles<scalar_t, 7>(x, taps, y, config);
    }
    return;
  }
  if ((k == 3 || k == 5 || k == 7) && (h + kRowBlock - 1) / kRowBlock <= kMaxGrid) {
    launch_conv_rows<scalar_t>(x, taps, y, k);
    return;
  }
  if (!cl && k <= kMaxTiledK) {
    const int64_t tiles = ((w + kTileW - 1) / kTileW) * ((h + kTileH - 1) / kTileH);
    SFI_CHECK(tiles <= INT32_MAX, "mcs_conv: image too large for the tiled CUDA kernel");
    const dim3 grid(static_cast<unsigned>(tiles),
                    static_cast<unsigned>(std::min<int64_t>(n * channels, 65535)));
    const dim3 block(kTileW, kTileH);
    const size_t shared =
        ((kTileW + k - 1) * (kTileH + k - 1) + k * k) * sizeof(acc_t);
    conv_nchw_tiled<scalar_t, acc_t><<<grid, block, shared, stream>>>(
        x.data_ptr<scalar_t>(), taps.data_ptr<acc_t>(), y.data_ptr<scalar_t>(), n * channels,
        static_cast<int>(channels), static_cast<int>(h), static_cast<int>(w), k);
  } else {
    const int64_t total = x.numel();
    const int blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads,
                                                          int64_t(1) << 20));
    conv_elementwise<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), taps.data_ptr<acc_t>(), y.data_ptr<scalar_t>(), total,
        static_cast<int>(channels), static_cast<int>(h), static_cast<int>(w), k, cl);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int K>
void launch_weight_grad(const at::Tensor& g, const at::Tensor& x, at::Tensor& partials,
                        int64_t chunks, int64_t chunk_len, int k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_pixels = x.size(0) * x.size(2) * x.size(3);
  // Channels on gridDim.y: check_weight_grad_grid refused more than kMaxGrid before any work.
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(x.size(1)));
  weight_grad_partials<scalar_t, acc_t, K>
      <<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), partials.data_ptr<acc_t>(), n_pixels,
          static_cast<int>(x.size(1)), static_cast<int>(x.size(2)), static_cast<int>(x.size(3)),
          k, is_channels_last(x), chunk_len);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int K>
void launch_weight_grad_rows(const at::Tensor& g, const at::Tensor& x, at::Tensor& partials,
                             const rows::RowGeometry& geo, dim3 grid, dim3 block,
                             int row_chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (geo.channels_last) {
    rows::weight_grad_cl_kernel<scalar_t, acc_t, K, kRowBlock>
        <<<grid, block, block.x * block.y * sizeof(acc_t), stream>>>(
            g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), partials.data_ptr<acc_t>(), geo,
            kGradRowsPerBlock, row_chunks, kClColumnsPerThread);
  } else {
    rows::weight_grad_nchw_kernel<scalar_t, acc_t, K, kRowBlock><<<grid, block, 0, stream>>>(
        g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), partials.data_ptr<acc_t>(),
        x.size(0) * x.size(1), geo, kGradRowsPerBlock);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Which kernels compute the weight gradient of x with a k x k filter: the row kernels
// (channels_last or NCHW, k = 3, 5, 7, within the grid limits) or the per-pixel fallback.
enum class WeightGradPath { kRowsChannelsLast, kRowsNchw, kFallback };

int64_t grad_row_chunks(int64_t h) { return (h + kGradRowsPerBlock - 1) / kGradRowsPerBlock; }
int64_t cl_column_chunks(int64_t w) {
  return (w + 8 * kClColumnsPerThread - 1) / (8 * kClColumnsPerThread);
}

WeightGradPath weight_grad_path(const at::Tensor& x, int k) {
  if (k != 3 && k != 5 && k != 7) return WeightGradPath::kFallback;
  const int64_t row_chunks = grad_row_chunks(x.size(2));
  // channels_last: 32 channel lanes per warp; with fewer channels most lanes would idle, and
  // the per-pixel kernel reads nearly contiguous memory anyway.
  if (is_channels_last(x)) {
    const bool fits = x.size(1) >= 16 && x.size(0) * row_chunks <= kMaxGrid &&
                      cl_column_chunks(x.size(3)) <= kMaxGrid;
    return fits ? WeightGradPath::kRowsChannelsLast : WeightGradPath::kFallback;
  }
  return row_chunks <= kMaxGrid ? WeightGradPath::kRowsNchw : WeightGradPath::kFallback;
}

// Called before any kernel of the backward runs (prepare_backward has only allocated the
// outputs): the fallback alone puts channels on gridDim.y (the row kernels loop over planes).
// The error itself is raised by host code the C++ compiler built (mcs_conv_cuda_config.h says
// why).
void check_weight_grad_grid(const at::Tensor& x, int k) {
  if (weight_grad_path(x, k) == WeightGradPath::kFallback)
    check_weight_grad_channels(x.size(1), kMaxGrid, k);
}

// dL/d(effective filter) as [C, k*k] in the accumulation dtype, from per-block partial sums
// (fixed blocks, so a fixed reduction order: deterministic).
template <typename scalar_t>
at::Tensor effective_filter_grad(const at::Tensor& g, const at::Tensor& x, int k) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const auto geo = row_geometry(x);
  const int64_t n = x.size(0), channels = x.size(1);
  const int64_t row_chunks = grad_row_chunks(geo.h);
  const auto path = weight_grad_path(x, k);
  const bool rows_cl = path == WeightGradPath::kRowsChannelsLast;
  if (path != WeightGradPath::kFallback) {
    dim3 grid, block;
    at::Tensor partials;
    if (rows_cl) {
      block = dim3(32, 8);  // 8 = the column lanes cl_column_chunks counts with
      grid = dim3(static_cast<unsigned>((channels + 31) / 32),
                  static_cast<unsigned>(cl_column_chunks(geo.w)),
                  static_cast<unsigned>(n * row_chunks));
      partials = at::empty({n * row_chunks * cl_column_chunks(geo.w), channels, k * k},
                           acc_options);
    } else {
      block = dim3(row_threads(geo.w, 128));
      grid = dim3(static_cast<unsigned>((geo.w + block.x - 1) / block.x),
                  static_cast<unsigned>(row_chunks),
                  static_cast<unsigned>(std::min<int64_t>(n * channels, kMaxGrid)));
      partials = at::empty({n, channels, int64_t(grid.x) * grid.y, k * k}, acc_options);
    }
    switch (k) {
      case 3: launch_weight_grad_rows<scalar_t, 3>(g, x, partials, geo, grid, block,
                                                   static_cast<int>(row_chunks)); break;
      case 5: launch_weight_grad_rows<scalar_t, 5>(g, x, partials, geo, grid, block,
                                                   static_cast<int>(row_chunks)); break;
      default: launch_weight_grad_rows<scalar_t, 7>(g, x, partials, geo, grid, block,
                                                    static_cast<int>(row_chunks));
    }
    // Explicit IntArrayRef: a braced list is ambiguous among at::sum's overloads in some torch
    // versions (2.11).
    if (rows_cl) return at::sum(partials, at::IntArrayRef{0});
    return at::sum(partials, at::IntArrayRef{0, 2});
  }
  // Any k or layout: blocks of (channel, fixed pixel chunk), independent of the device.
  const int64_t n_pixels = n * x.size(2) * x.size(3);
  const int64_t chunk_len = std::max<int64_t>(4096, (n_pixels + 1023) / 1024);
  const int64_t chunks = (n_pixels + chunk_len - 1) / chunk_len;
  auto partials = at::empty({channels, chunks, k * k}, acc_options);
  switch (k) {
    case 3: launch_weight_grad<scalar_t, 3>(g, x, partials, chunks, chunk_len, k); break;
    case 5: launch_weight_grad<scalar_t, 5>(g, x, partials, chunks, chunk_len, k); break;
    case 7: launch_weight_grad<scalar_t, 7>(g, x, partials, chunks, chunk_len, k); break;
    default: launch_weight_grad<scalar_t, 0>(g, x, partials, chunks, chunk_len, k);
  }
  return at::sum(partials, at::IntArrayRef{1});
}

// The one-pass NCHW backward of the row kernels (rows::backward_fused_nchw_kernel) measured
// slower than the row kernels' two passes on an H100 in 3 of 4 cases (faster only in float32 at
// [64, 64, 64, 64]), so it is opt-in: SFICONV_CUDA_FUSED_BACKWARD=1 (either NCHW kernel choice;
// CudaKernelConfig::fused_backward).

bool can_fuse_backward(const at::Tensor& x, int k) {
  const auto geo = row_geometry(x);
  return !geo.channels_last && (k == 3 || k == 5 || k == 7) &&
         (geo.h + kGradRowsPerBlock - 1) / kGradRowsPerBlock <= kMaxGrid;
}

template <typename scalar_t, int K>
void launch_backward_fused(const at::Tensor& g, const at::Tensor& x, const at::Tensor& flipped,
                           at::Tensor& grad_x, at::Tensor& partials,
                           const rows::RowGeometry& geo, dim3 grid, dim3 block) {
  using acc_t = at::opmath_type<scalar_t>;
  rows::backward_fused_nchw_kernel<scalar_t, acc_t, K, kRowBlock>
      <<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
          g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), flipped.data_ptr<acc_t>(),
          grad_x.data_ptr<scalar_t>(), partials.data_ptr<acc_t>(), x.size(0) * x.size(1), geo,
          kGradRowsPerBlock);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Both gradients of an NCHW input in one pass (k = 3, 5, 7): fills grad_x and returns
// dL/d(effective filter) as [C, k*k], reduced from fixed per-block partials (deterministic).
template <typename scalar_t>
at::Tensor fused_backward_nchw(const at::Tensor& g, const at::Tensor& x,
                               const at::Tensor& flipped, at::Tensor& grad_x, int k) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto geo = row_geometry(x);
  const int64_t planes = x.size(0) * x.size(1);
  const dim3 block(row_threads(geo.w, 128));
  const dim3 grid(static_cast<unsigned>((geo.w + block.x - 1) / block.x),
                  static_cast<unsigned>((geo.h + kGradRowsPerBlock - 1) / kGradRowsPerBlock),
                  static_cast<unsigned>(std::min<int64_t>(planes, kMaxGrid)));
  auto partials = at::empty({x.size(0), x.size(1), int64_t(grid.x) * grid.y, k * k},
                            x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  switch (k) {
    case 3: launch_backward_fused<scalar_t, 3>(g, x, flipped, grad_x, partials, geo, grid, block);
            break;
    case 5: launch_backward_fused<scalar_t, 5>(g, x, flipped, grad_x, partials, geo, grid, block);
            break;
    default: launch_backward_fused<scalar_t, 7>(g, x, flipped, grad_x, partials, geo, grid,
                                                block);
  }
  return at::sum(partials, at::IntArrayRef{0, 2});
}

}  // namespace

at::Tensor mcs_conv_forward_cuda(const at::Tensor& x, const at::Tensor& weight, bool constrained,
                                 double eps) {
  check_cuda_device(x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto args = prepare_forward(x, weight, eps);
  check_cuda_sizes(x);
  const auto config = cuda_kernel_config();  // an invalid choice fails here, before dispatch
  if (args.y.numel() == 0) return args.y;
  const int k = static_cast<int>(weight.size(2));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "mcs_conv_fwd_cuda", [&] {
        const auto taps = compute_taps<scalar_t>(args.weight, constrained, eps, /*flip=*/false);
        launch_conv<scalar_t>(args.x, taps, args.y, k, config);
      });
  return args.y;
}

std::tuple<at::Tensor, at::Tensor> mcs_conv_backward_cuda(const at::Tensor& grad_out,
                                                          const at::Tensor& x,
                                                          const at::Tensor& weight,
                                                          bool constrained, double eps,
                                                          bool need_x, bool need_weight) {
  check_cuda_device(x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto args = prepare_backward(grad_out, x, weight, eps, need_x, need_weight);
  check_cuda_sizes(x);
  const auto config = cuda_kernel_config();  // an invalid choice fails here, before dispatch
  if (x.numel() == 0) return {args.grad_x, args.grad_weight};
  const int k = static_cast<int>(weight.size(2));
  if (need_weight) check_weight_grad_grid(args.x, k);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "mcs_conv_bwd_cuda", [&] {
        if (need_x && need_weight && config.fused_backward && can_fuse_backward(args.x, k)) {
          const auto flipped = compute_taps<scalar_t>(args.weight, constrained, eps, true);
          const auto grad_eff =
              fused_backward_nchw<scalar_t>(args.grad_out, args.x, flipped, args.grad_x, k);
          args.grad_weight =
              constraint_backward_cuda<scalar_t>(grad_eff, args.weight, constrained, eps);
          return;
        }
        if (need_x) {
          const auto flipped = compute_taps<scalar_t>(args.weight, constrained, eps, true);
          launch_conv<scalar_t>(args.grad_out, flipped, args.grad_x, k, config);
        }
        if (!need_weight) return;
        const auto grad_eff = effective_filter_grad<scalar_t>(args.grad_out, args.x, k);
        args.grad_weight =
            constraint_backward_cuda<scalar_t>(grad_eff, args.weight, constrained, eps);
      });
  return {args.grad_x, args.grad_weight};
}

}  // namespace sficonv
