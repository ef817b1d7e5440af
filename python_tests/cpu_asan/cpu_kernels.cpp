// The MCSConv CPU kernels (csrc/mcs_conv_cpu_nchw.h, csrc/mcs_conv_cpu_channels_last.h) run on
// buffers of exactly the size a tensor would have, built with AddressSanitizer by
// test_cpu_kernels_asan.py: a vector load or store one element past a row, a padded plane or a
// tensor fails here even where the values it read happen to leave the result right (a Python
// test cannot see that). Each kernel is also compared with a float64 reference.
//
// Covers float64, float32, bfloat16 and float16; k = 3, 5, 7 (vector paths) and 9 (the any-k
// loops); channel counts below, at and between whole vectors; widths and heights below k, below
// a run of 8 pixels, and with leftovers; and the checked NCHW loops that planes with non-finite
// taps or gradients take. Prints one line per check and "ALL OK" at the end.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdio>
#include <vector>

#include "host_checks.h"
#include "mcs_conv_cpu_channels_last.h"
#include "mcs_conv_cpu_nchw.h"

using sficonv::cpu::Geometry;
namespace channels_last = sficonv::cpu::channels_last;
namespace nchw = sficonv::cpu::nchw;

struct Shape {
  int n, c, h, w;
};

// dL/dw[c][a][b] = sum over n, i, j of g * x(i + a - pad, j + b - pad), in float64.
template <typename T, typename At>
std::vector<double> weight_grad_reference(const Shape& s, int k, const std::vector<T>& g,
                                          const std::vector<T>& x, At at) {
  std::vector<double> out(static_cast<size_t>(s.c) * k * k, 0.0);
  const int pad = k / 2;
  for (int p = 0; p < s.n * s.c; ++p)
    for (int i = 0; i < s.h; ++i)
      for (int j = 0; j < s.w; ++j)
        for (int a = 0; a < k; ++a)
          for (int b = 0; b < k; ++b) {
            const int r = i + a - pad, q = j + b - pad;
            if (r >= 0 && r < s.h && q >= 0 && q < s.w)
              out[(p % s.c) * k * k + a * k + b] +=
                  static_cast<double>(g[at(p, i, j)]) * static_cast<double>(x[at(p, r, q)]);
          }
  return out;
}

template <typename T>
const char* type_name() {
  if constexpr (std::is_same_v<T, double>) return "float64";
  if constexpr (std::is_same_v<T, float>) return "float32";
  if constexpr (std::is_same_v<T, c10::BFloat16>) return "bfloat16";
  return "float16";
}

int report(const char* kernel, const char* type, const Shape& s, int k, int bad) {
  std::printf("%-26s %-8s [%d, %d, %d, %d] k=%d: %s\n", kernel, type, s.n, s.c, s.h, s.w, k,
              bad ? "FAILED" : "ok");
  return bad ? 1 : 0;
}

// Seeded random input, gradient and taps ([C][k*k], accumulation type) for one check.
template <typename T>
struct Inputs {
  std::vector<T> x, g;
  std::vector<acc_of<T>> taps;
  Inputs(const Shape& s, int k, unsigned seed)
      : x(random_values<T>(static_cast<size_t>(s.n) * s.c * s.h * s.w, seed)),
        g(random_values<T>(x.size(), seed + 1)),
        taps(random_values<acc_of<T>>(static_cast<size_t>(s.c) * k * k, seed + 2)) {}
};

// channels_last: every row through correlate_row and weight_grad_row.
template <typename T>
int check_channels_last(const Shape& s, int k, unsigned seed) {
  using acc_t = acc_of<T>;
  const Geometry geo{s.n, s.c, s.h, s.w, k, k / 2};
  const Inputs<T> in(s, k, seed);
  const size_t size = in.x.size();
  const auto &x = in.x, &g = in.g;
  const auto& taps = in.taps;
  std::vector<acc_t> taps_t(taps.size());  // [tap][channel], as the kernels read them
  for (int c = 0; c < s.c; ++c)
    for (int t = 0; t < k * k; ++t) taps_t[t * s.c + c] = taps[c * k * k + t];
  const auto at = [&](long p, int i, int j) {
    return ((p / s.c * s.h + i) * static_cast<long>(s.w) + j) * s.c + p % s.c;
  };
  const long row_len = static_cast<long>(s.w) * s.c, image = row_len * s.h;
  std::vector<T> y(size);
  std::vector<acc_t> part(static_cast<size_t>(k) * k * s.c, acc_t(0));
  for (int n = 0; n < s.n; ++n)
    for (int i = 0; i < s.h; ++i) {
      channels_last::correlate_row(x.data() + n * image, taps_t.data(), geo, i,
                                   y.data() + n * image + i * row_len);
      channels_last::weight_grad_row(g.data() + n * image, x.data() + n * image, geo, i,
                                     part.data());
    }
  int failed = report("channels_last correlate", type_name<T>(), s, k,
                      count_bad<T>(y, correlate_planes(static_cast<long>(s.n) * s.c, s.c, s.h,
                                                       s.w, x, taps, k, at)));
  std::vector<double> grad(part.size());  // [channel][tap], as the reference lays it out
  for (int c = 0; c < s.c; ++c)
    for (int t = 0; t < k * k; ++t) grad[c * k * k + t] = part[t * s.c + c];
  failed += report("channels_last weight grad", type_name<T>(), s, k,
                   count_bad<T>(grad, weight_grad_reference(s, k, g, x, at)));
  return failed;
}

// NCHW: every plane padded, correlated, and its weight-gradient sums taken.
template <typename T>
int check_nchw(const Shape& s, int k, unsigned seed) {
  using acc_t = acc_of<T>;
  const Geometry geo{s.n, s.c, s.h, s.w, k, k / 2};
  const Inputs<T> in(s, k, seed);
  const size_t size = in.x.size();
  const auto &x = in.x, &g = in.g;
  const auto& taps = in.taps;
  const auto at = [&](long p, int i, int j) { return (p * s.h + i) * static_cast<long>(s.w) + j; };
  const nchw::PaddedPlane pp(geo);
  std::vector<acc_t> xpad(pp.size()), gpad(pp.size());  // exactly what the kernels allocate
  std::vector<T> y(size), y_checked(size);
  std::vector<double> grad(static_cast<size_t>(s.c) * k * k, 0.0), checked_grad(grad);
  std::vector<acc_t> sums(static_cast<size_t>(k) * k);
  const long plane = static_cast<long>(s.h) * s.w;
  for (long p = 0; p < static_cast<long>(s.n) * s.c; ++p) {
    nchw::fill_padded(x.data() + p * plane, geo, pp, xpad.data());
    const bool grad_finite = nchw::fill_padded(g.data() + p * plane, geo, pp, gpad.data());
    nchw::correlate_plane(xpad.data(), pp, taps.data() + (p % s.c) * k * k, geo,
                          y.data() + p * plane);
    // Both weight-gradient paths: the vector one (finite values) and the checked one.
    nchw::weight_grad_plane(gpad.data(), xpad.data(), pp, geo, grad_finite, sums.data());
    for (int t = 0; t < k * k; ++t) grad[(p % s.c) * k * k + t] += sums[t];
    nchw::weight_grad_plane(gpad.data(), xpad.data(), pp, geo, false, sums.data());
    for (int t = 0; t < k * k; ++t) checked_grad[(p % s.c) * k * k + t] += sums[t];
    // The checked correlation too (planes with non-finite taps take it).
    nchw::correlate_plane_checked(xpad.data(), pp, taps.data() + (p % s.c) * k * k, geo,
                                  y_checked.data() + p * plane);
  }
  const auto y_want =
      correlate_planes(static_cast<long>(s.n) * s.c, s.c, s.h, s.w, x, taps, k, at);
  int failed = report("nchw correlate", type_name<T>(), s, k, count_bad<T>(y, y_want));
  failed += report("nchw correlate, checked", type_name<T>(), s, k,
                   count_bad<T>(y_checked, y_want));
  const auto grad_want = weight_grad_reference(s, k, g, x, at);
  failed += report("nchw weight grad", type_name<T>(), s, k, count_bad<T>(grad, grad_want));
  failed += report("nchw weight grad, checked", type_name<T>(), s, k,
                   count_bad<T>(checked_grad, grad_want));
  return failed;
}

template <typename T>
int check_type(const std::vector<Shape>& shapes, unsigned* seed) {
  int failed = 0;
  for (const Shape& s : shapes)
    for (int k : {3, 5, 7, 9}) {
      failed += check_channels_last<T>(s, k, *seed += 3);
      failed += check_nchw<T>(s, k, *seed += 3);
    }
  return failed;
}

int main() {
  // Channels: 1, 8 (a float64 vector), 16 (a float32 vector), 19, 33 (vectors plus a tail).
  // Widths: 1, 3 (< k), 9 (edge pixels and leftovers, too narrow for a run of 8 with k >= 3),
  // 21, 37 (runs plus leftovers; both leave NCHW tails after whole vectors), 64.
  const std::vector<Shape> shapes = {{1, 1, 1, 1},  {2, 8, 3, 9},   {1, 16, 9, 3},
                                     {1, 19, 5, 21}, {1, 33, 8, 37}, {1, 16, 11, 64}};
  unsigned seed = 1;
  int failed = check_type<double>(shapes, &seed);
  failed += check_type<float>(shapes, &seed);
  failed += check_type<c10::BFloat16>(shapes, &seed);
  failed += check_type<c10::Half>(shapes, &seed);
  std::printf(failed ? "SOME FAILED\n" : "ALL OK\n");
  return failed ? 1 : 0;
}
