// The shared-memory tiled MCSConv CUDA kernel (csrc/mcs_conv_cuda_tiles.cuh), compiled as host
// C++ through cuda_host_emulation.h and run against a float64 reference: the correlation (the
// forward, and the input gradient with mirrored taps), with scalar and 16-byte vector staging,
// both tile widths, float, double and (through c10's host-side BFloat16 and Half) the half
// types with float accumulation, and gridDim.y capped small so that the plane loop runs. Launch
// shapes follow csrc/mcs_conv_cuda.cu. Also the double-buffered variant
// (mcs_conv_cuda_tiles_pipelined.cuh). Prints one line per check and "ALL OK" when every check
// passed.
#include "cuda_host_emulation.h"
#include "host_checks.h"
#include "mcs_conv_cuda_tiles.cuh"
#include "mcs_conv_cuda_tiles_pipelined.cuh"

#include <c10/util/BFloat16.h>  // header-only; the test adds torch's include folder
#include <c10/util/Half.h>

#include <cmath>
#include <cstdio>
#include <random>

using sficonv::tiles::Tile;
using sficonv::tiles::TileGrid;

namespace {

constexpr unsigned kMaxY = 3;  // small: exercises the kernels' plane loop

struct Case {
  int n, c, h, w;
};

long at(const Case& s, long plane, int i, int j) { return (plane * s.h + i) * s.w + j; }

template <typename T, typename TapT>
std::vector<double> correlate(const Case& s, const std::vector<T>& in,
                              const std::vector<TapT>& taps, int k) {
  return correlate_planes(static_cast<long>(s.n) * s.c, s.c, s.h, s.w, in, taps, k,
                          [&](long p, int i, int j) { return at(s, p, i, j); });
}

int report(const char* what, const Case& s, int k, int tx, bool vec, const char* type, int bad) {
  std::printf("%-15s %-6s k=%d tx=%d %-6s [%d, %d, %d, %d] %s\n", what, type, k, tx,
              vec ? "vector" : "scalar", s.n, s.c, s.h, s.w, bad ? "FAILED" : "ok");
  return bad;
}

template <int K, int TX>
TileGrid tile_grid(const Case& s, bool vector_loads) {
  TileGrid geo;
  geo.planes = static_cast<long>(s.n) * s.c;
  geo.h = s.h;
  geo.w = s.w;
  geo.tiles_x = (s.w + TX - 1) / TX;
  geo.vector_loads = vector_loads;
  return geo;
}

template <int K, int TX>
dim3 launch_grid(const TileGrid& geo) {
  constexpr int rows = Tile<K, TX>::rows;
  const long tiles = static_cast<long>(geo.tiles_x) * ((geo.h + rows - 1) / rows);
  return dim3(static_cast<unsigned>(tiles),
              std::min<unsigned>(static_cast<unsigned>(geo.planes), kMaxY));
}

// MIN_BLOCKS 0: the default kernel; otherwise the register-capped build of the same body.
template <typename T, int K, int TX, int MIN_BLOCKS = 0>
int check_forward(const Case& s, bool vec, const char* type) {
  using TL = Tile<K, TX>;
  using A = acc_of<T>;
  const size_t count = static_cast<size_t>(s.n) * s.c * s.h * s.w;
  const auto x = random_values<T>(count, 1);
  const auto taps = random_values<A>(static_cast<size_t>(s.c) * K * K, 2);
  std::vector<T> y(count, T(-999));
  const TileGrid geo = tile_grid<K, TX>(s, vec);
  cuda_host::launch(launch_grid<K, TX>(geo), dim3(TX, TL::TY), TL::shared_size * sizeof(A), [&] {
    if constexpr (MIN_BLOCKS == 0)
      sficonv::tiles::conv_tile_kernel<T, A, K, TX>(x.data(), taps.data(), y.data(), s.c, geo);
    else
      sficonv::tiles::conv_tile_kernel_capped<T, A, K, TX, MIN_BLOCKS>(x.data(), taps.data(),
                                                                       y.data(), s.c, geo);
  });
  return report(MIN_BLOCKS ? "forward capped" : "forward", s, K, TX, vec, type,
                count_bad<T>(y, correlate(s, x, taps, K)));
}

// The double-buffered kernel (vector staging only): gridDim.y stays kMaxY, so blocks loop over
// several planes and swap buffers.
template <typename T, int K, int TX>
int check_pipelined(const Case& s, const char* type) {
  using P = sficonv::tiles::PipelinedTile<T, K, TX>;
  using A = acc_of<T>;
  if (s.w % P::vec != 0) return 0;
  const size_t count = static_cast<size_t>(s.n) * s.c * s.h * s.w;
  const auto x = random_values<T>(count, 3);
  const auto taps = random_values<A>(static_cast<size_t>(s.c) * K * K, 4);
  std::vector<T> y(count, T(-999));
  const TileGrid geo = tile_grid<K, TX>(s, true);
  cuda_host::launch(launch_grid<K, TX>(geo), dim3(TX, Tile<K, TX>::TY), P::shared_bytes, [&] {
    sficonv::tiles::conv_tile_pipelined_kernel<T, A, K, TX>(x.data(), taps.data(), y.data(),
                                                             s.c, geo);
  });
  return report("pipelined", s, K, TX, true, type, count_bad<T>(y, correlate(s, x, taps, K)));
}

template <typename T, int K, int TX>
int check_all(const Case& s, const char* type) {
  // Vector staging only where the launcher allows it: w a whole number of 16-byte vectors.
  const bool vec_ok = s.w % (16 / static_cast<int>(sizeof(T))) == 0;
  int bad = check_forward<T, K, TX>(s, false, type);
  if (vec_ok) bad += check_forward<T, K, TX>(s, true, type);
  return bad;
}

}  // namespace

int main() {
  // Odd sizes; H below, at and above one tile of rows (32 or 64); W below, at and above one
  // tile of columns (32 or 64), some a whole number of vectors; more planes than gridDim.y.
  const Case shapes[] = {{2, 3, 13, 67}, {1, 1, 1, 5}, {2, 2, 70, 128}, {1, 2, 33, 8},
                         {3, 1, 64, 64}, {1, 3, 5, 36}, {1, 2, 130, 20}};
  int bad = 0;
  for (const Case& s : shapes) {
    bad += check_all<float, 5, 64>(s, "float");
    bad += check_all<float, 5, 32>(s, "float");
    bad += check_all<double, 3, 64>(s, "double");
    bad += check_all<double, 7, 32>(s, "double");
    bad += check_forward<float, 5, 64, 3>(s, false, "float");
    bad += check_all<c10::BFloat16, 5, 64>(s, "bf16");
    bad += check_all<c10::Half, 5, 32>(s, "half");
  }
  // The pipelined kernel; the last shape gives each block four planes (buffers swapped thrice).
  const Case pipelined_shapes[] = {{2, 2, 70, 128}, {1, 2, 130, 20}, {3, 1, 64, 64},
                                   {1, 3, 5, 36}, {1, 2, 33, 8}, {2, 5, 9, 40}};
  for (const Case& s : pipelined_shapes) {
    bad += check_pipelined<float, 5, 64>(s, "float");
    bad += check_pipelined<float, 3, 32>(s, "float");
    bad += check_pipelined<double, 7, 32>(s, "double");
    bad += check_pipelined<double, 5, 64>(s, "double");
    bad += check_pipelined<c10::BFloat16, 5, 64>(s, "bf16");
    bad += check_pipelined<c10::Half, 7, 32>(s, "half");
  }
  std::printf(bad ? "SOME FAILED\n" : "ALL OK\n");
  return bad ? 1 : 0;
}
