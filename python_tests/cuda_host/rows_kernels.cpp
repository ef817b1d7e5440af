// The row-blocked MCSConv CUDA kernels (csrc/mcs_conv_cuda_rows.cuh), compiled as host C++
// through cuda_host_emulation.h and run against float64 references: the forward correlation in
// both layouts, the weight-gradient partials in both layouts, and the one-pass NCHW backward, in
// float, double, and bfloat16/float16 (accumulating in float).
// Launch shapes follow csrc/mcs_conv_cuda.cu, with gridDim.z capped small so that the
// grid-stride loops run. Prints one line per check and "ALL OK" when every check passed.
#include "cuda_host_emulation.h"
#include "host_checks.h"
#include "mcs_conv_cuda_rows.cuh"

#include <c10/util/BFloat16.h>  // header-only; the test adds torch's include folder
#include <c10/util/Half.h>

#include <cmath>
#include <cstdio>
#include <random>

using sficonv::rows::RowGeometry;

namespace {

constexpr int R = 8;                   // kRowBlock in mcs_conv_cuda.cu
constexpr int kGradRowsPerBlock = 32;  // as in mcs_conv_cuda.cu
constexpr int kClColumnsPerThread = 2;
constexpr unsigned kMaxZ = 3;          // small: exercises the kernels' grid-stride loops

struct Case {
  int n, c, h, w;
  bool cl;
};

long at(const Case& s, int n, int c, int i, int j) {
  return s.cl ? ((static_cast<long>(n) * s.h + i) * s.w + j) * s.c + c
              : ((static_cast<long>(n) * s.c + c) * s.h + i) * s.w + j;
}

RowGeometry geometry(const Case& s) {
  RowGeometry geo;
  geo.channels = s.c;
  geo.h = s.h;
  geo.w = s.w;
  geo.channels_last = s.cl;
  geo.row_len = s.cl ? static_cast<long>(s.w) * s.c : s.w;
  geo.step = s.cl ? s.c : 1;
  return geo;
}

unsigned row_threads(long row_len, int most) {
  return static_cast<unsigned>(std::min<long>(most, (row_len + 31) / 32 * 32));
}

// Planes p = n * C + c in either layout.
template <typename T, typename TapT>
std::vector<double> correlate(const Case& s, const std::vector<T>& in,
                              const std::vector<TapT>& taps, int k) {
  return correlate_planes(static_cast<long>(s.n) * s.c, s.c, s.h, s.w, in, taps, k,
                          [&](long p, int i, int j) { return at(s, p / s.c, p % s.c, i, j); });
}

// gw[c][a][b] = sum over n, i, j of g(n,c,i,j) * x(n,c,i+a-p,j+b-p).
template <typename T>
std::vector<double> weight_grad(const Case& s, const std::vector<T>& g, const std::vector<T>& x,
                                int k) {
  std::vector<double> gw(static_cast<size_t>(s.c) * k * k, 0.0);
  const int p = k / 2;
  for (int n = 0; n < s.n; ++n)
    for (int c = 0; c < s.c; ++c)
      for (int i = 0; i < s.h; ++i)
        for (int j = 0; j < s.w; ++j)
          for (int a = 0; a < k; ++a)
            for (int b = 0; b < k; ++b) {
              const int r = i + a - p, q = j + b - p;
              if (r >= 0 && r < s.h && q >= 0 && q < s.w)
                gw[c * k * k + a * k + b] += static_cast<double>(g[at(s, n, c, i, j)]) *
                                             static_cast<double>(x[at(s, n, c, r, q)]);
            }
  return gw;
}

// NCHW partials [planes][chunks][K*K] summed over images and chunks into [c][K*K].
template <typename T>
std::vector<double> sum_nchw_partials(const std::vector<T>& partials, const Case& s, long chunks,
                                      int k) {
  std::vector<double> sums(static_cast<size_t>(s.c) * k * k, 0.0);
  for (size_t e = 0; e < partials.size(); ++e) {
    const long plane = static_cast<long>(e / (chunks * k * k));
    sums[(plane % s.c) * k * k + e % (k * k)] += partials[e];
  }
  return sums;
}

int report(const char* what, const Case& s, int k, const char* type, int bad) {
  std::printf("%-22s %-6s k=%d [%d, %d, %d, %d] %-13s %s\n", what, type, k, s.n, s.c, s.h, s.w,
              s.cl ? "channels_last" : "nchw", bad ? "FAILED" : "ok");
  return bad;
}

template <typename T, int K>
int check_forward(const Case& s, const char* type) {
  const auto geo = geometry(s);
  const auto x = random_values<T>(static_cast<size_t>(s.n) * s.c * s.h * s.w, 1);
  const auto taps = random_values<acc_of<T>>(static_cast<size_t>(s.c) * K * K, 2);
  std::vector<T> y(x.size(), T(-999));
  const long groups = s.cl ? s.n : static_cast<long>(s.n) * s.c;
  const unsigned threads = row_threads(geo.row_len, 256);
  const dim3 grid(static_cast<unsigned>((geo.row_len + threads - 1) / threads),
                  static_cast<unsigned>((s.h + R - 1) / R),
                  std::min<unsigned>(static_cast<unsigned>(groups), kMaxZ));
  cuda_host::launch(grid, dim3(threads), 0, [&] {
    sficonv::rows::conv_rows_kernel<T, acc_of<T>, K, R>(x.data(), taps.data(), y.data(), groups,
                                                        geo);
  });
  return report("forward", s, K, type, count_bad<T>(y, correlate(s, x, taps, K)));
}

// The NCHW gradient kernels' launch shape, as mcs_conv_cuda.cu sets it (gridDim.z capped).
struct NchwGradLaunch {
  dim3 grid, block;
  long chunks;
};

NchwGradLaunch nchw_grad_launch(const Case& s) {
  const dim3 block(row_threads(s.w, 128));
  const dim3 grid((s.w + block.x - 1) / block.x, (s.h + kGradRowsPerBlock - 1) / kGradRowsPerBlock,
                  std::min<unsigned>(static_cast<unsigned>(s.n * s.c), kMaxZ));
  return {grid, block, static_cast<long>(grid.x) * grid.y};
}

// Weight-gradient partials summed into [c][K*K]: channels_last [blocks][c][K*K], NCHW
// [planes][chunks][K*K].
template <typename T, int K>
int check_weight_grad(const Case& s, const char* type) {
  using A = acc_of<T>;
  const auto geo = geometry(s);
  const size_t count = static_cast<size_t>(s.n) * s.c * s.h * s.w;
  const auto g = random_values<T>(count, 3), x = random_values<T>(count, 4);
  const int row_chunks = (s.h + kGradRowsPerBlock - 1) / kGradRowsPerBlock;
  std::vector<double> got(static_cast<size_t>(s.c) * K * K, 0.0);
  if (s.cl) {
    const int column_chunks = (s.w + 8 * kClColumnsPerThread - 1) / (8 * kClColumnsPerThread);
    const dim3 block(32, 8);
    const dim3 grid((s.c + 31) / 32, column_chunks, s.n * row_chunks);
    std::vector<A> partials(static_cast<size_t>(s.n) * row_chunks * column_chunks * s.c * K * K,
                            A(-777));
    cuda_host::launch(grid, block, block.x * block.y * sizeof(A), [&] {
      sficonv::rows::weight_grad_cl_kernel<T, A, K, R>(g.data(), x.data(), partials.data(), geo,
                                                       kGradRowsPerBlock, row_chunks,
                                                       kClColumnsPerThread);
    });
    for (size_t e = 0; e < partials.size(); ++e) got[e % got.size()] += partials[e];
  } else {
    const auto shape = nchw_grad_launch(s);
    std::vector<A> partials(static_cast<size_t>(s.n) * s.c * shape.chunks * K * K, A(-777));
    cuda_host::launch(shape.grid, shape.block, 0, [&] {
      sficonv::rows::weight_grad_nchw_kernel<T, A, K, R>(
          g.data(), x.data(), partials.data(), static_cast<long>(s.n) * s.c, geo,
          kGradRowsPerBlock);
    });
    got = sum_nchw_partials(partials, s, shape.chunks, K);
  }
  return report("weight gradient", s, K, type, count_bad<T>(got, weight_grad(s, g, x, K)));
}

template <typename T, int K>
int check_fused_backward(const Case& s, const char* type) {
  using A = acc_of<T>;
  const auto geo = geometry(s);
  const size_t count = static_cast<size_t>(s.n) * s.c * s.h * s.w;
  const auto g = random_values<T>(count, 5), x = random_values<T>(count, 6);
  const auto flipped = random_values<A>(static_cast<size_t>(s.c) * K * K, 7);
  std::vector<T> grad_x(count, T(-999));
  const auto shape = nchw_grad_launch(s);
  std::vector<A> partials(static_cast<size_t>(s.n) * s.c * shape.chunks * K * K, A(-777));
  cuda_host::launch(shape.grid, shape.block, 0, [&] {
    sficonv::rows::backward_fused_nchw_kernel<T, A, K, R>(
        g.data(), x.data(), flipped.data(), grad_x.data(), partials.data(),
        static_cast<long>(s.n) * s.c, geo, kGradRowsPerBlock);
  });
  const auto got_w = sum_nchw_partials(partials, s, shape.chunks, K);
  const int bad = count_bad<T>(grad_x, correlate(s, g, flipped, K)) +
                  count_bad<T>(got_w, weight_grad(s, g, x, K));
  return report("fused backward", s, K, type, bad);
}

template <typename T, int K>
int check_all(const Case& s, const char* type) {
  int bad = check_forward<T, K>(s, type) + check_weight_grad<T, K>(s, type);
  if (!s.cl) bad += check_fused_backward<T, K>(s, type);
  return bad;
}

}  // namespace

int main() {
  // Odd sizes, H below and above the row blocks, W below and above one block of threads,
  // more planes than gridDim.z, a single channel.
  const Case shapes[] = {{2, 3, 13, 67, false}, {1, 1, 1, 5, false}, {2, 2, 70, 129, false},
                         {2, 5, 9, 7, true},    {1, 40, 37, 3, true}, {3, 3, 1, 1, false}};
  int bad = 0;
  for (const Case& s : shapes) {
    bad += check_all<float, 5>(s, "float");
    bad += check_all<double, 3>(s, "double");
    bad += check_all<double, 7>(s, "double");
    bad += check_all<c10::BFloat16, 5>(s, "bf16");
    bad += check_all<c10::Half, 5>(s, "half");
  }
  std::printf(bad ? "SOME FAILED\n" : "ALL OK\n");
  return bad ? 1 : 0;
}
