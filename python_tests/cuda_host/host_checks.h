// What the host-emulation kernel checks (rows_kernels.cpp, tile_kernels.cpp) share: seeded
// random inputs, the float64 reference correlation and the comparison with it.
#pragma once

#include <algorithm>
#include <cmath>
#include <random>
#include <type_traits>
#include <vector>

// The kernels' accumulation type: half types compute in float, as at::opmath_type makes them on
// the GPU (the checks run c10::BFloat16 and c10::Half, header-only on the host).
template <typename T>
using acc_of = std::conditional_t<sizeof(T) == 2, float, T>;

template <typename T>
std::vector<T> random_values(size_t count, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  std::vector<T> v(count);
  for (auto& e : v) e = static_cast<T>(normal(rng));
  return v;
}

// Relative to the largest reference value: float64 kernels to 1e-10, float32 to 1e-4, 2-byte
// types (rounded once on output, accumulated in float) to 1e-2.
template <typename T>
double tolerance() {
  return sizeof(T) == sizeof(double) ? 1e-10 : sizeof(T) == 4 ? 1e-4 : 1e-2;
}

// How many values of `got` (computed in T) differ from `want` by more than the tolerance; a NaN
// counts as bad.
template <typename T, typename Got>
int count_bad(const Got& got, const std::vector<double>& want) {
  double scale = 1e-30;
  for (double v : want) scale = std::max(scale, std::abs(v));
  int bad = 0;
  for (size_t e = 0; e < want.size(); ++e)
    if (!(std::abs(static_cast<double>(got[e]) - want[e]) <= tolerance<T>() * scale)) ++bad;
  return bad;
}

// out[at(p, i, j)] = sum_ab taps[p % channels][a][b] * in[at(p, i+a-pad, j+b-pad)] over the
// `planes` planes of h x w (zero outside the image), in float64; `at` maps a plane, row and
// column to the tensor's storage index, so either layout can be checked.
template <typename T, typename TapT, typename At>
std::vector<double> correlate_planes(long planes, int channels, int h, int w,
                                     const std::vector<T>& in, const std::vector<TapT>& taps,
                                     int k, At at) {
  std::vector<double> out(in.size(), 0.0);
  const int pad = k / 2;
  for (long p = 0; p < planes; ++p)
    for (int i = 0; i < h; ++i)
      for (int j = 0; j < w; ++j) {
        double acc = 0;
        for (int a = 0; a < k; ++a)
          for (int b = 0; b < k; ++b) {
            const int r = i + a - pad, q = j + b - pad;
            if (r >= 0 && r < h && q >= 0 && q < w)
              acc += static_cast<double>(taps[(p % channels) * k * k + a * k + b]) *
                     static_cast<double>(in[at(p, r, q)]);
          }
        out[at(p, i, j)] = acc;
      }
  return out;
}
