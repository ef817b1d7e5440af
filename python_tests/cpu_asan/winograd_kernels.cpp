// The Winograd F(4x4, 3x3) transforms (csrc/winograd_transforms.h) on buffers of exactly the
// size a tensor would have, built with AddressSanitizer by test_cpu_kernels_asan.py: a read or
// write past a tile at the map's edge, a channel chunk or a weight fails here even where the
// values come out right. The 36 matrix products (at::bmm in the extension) are plain loops here;
// each result is compared with a direct convolution in float64.
//
// Covers float32 and float64; contiguous and channels_last weights; maps smaller than a tile
// and with partial tiles; channel counts across the 64-channel chunks. Prints one line per
// check and "ALL OK" at the end.
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <vector>

#include "host_checks.h"  // random_values
#include "winograd_transforms.h"

using namespace sficonv::winograd;

namespace {

struct Shape {
  int64_t n, c, k, h, w;
};

const auto serial = [](int64_t begin, int64_t end, int64_t, const auto& fn) { fn(begin, end); };

// Strides of a [K, C, 3, 3] weight: contiguous, or channels_last (memory [K, 3, 3, C]).
std::vector<int64_t> weight_strides(const Shape& s, bool channels_last) {
  if (channels_last) return {9 * s.c, 1, 3 * s.c, s.c};
  return {9 * s.c, 9, 3, 1};
}

// tap (r, s) of weight (k, c) under the given strides
template <typename T>
double tap(const std::vector<T>& w, const std::vector<int64_t>& st, int64_t k, int64_t c, int r,
           int s) {
  return static_cast<double>(w[k * st[0] + c * st[1] + r * st[2] + s * st[3]]);
}

// [36][rows][inner] x [36][cols][inner]^T -> [36][rows][cols], summed in double.
template <typename T>
std::vector<T> products(const std::vector<T>& a, const std::vector<T>& b, int64_t rows,
                        int64_t cols, int64_t inner) {
  std::vector<T> out(static_cast<size_t>(36 * rows * cols));
  for (int64_t p = 0; p < 36; ++p)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) {
        double sum = 0;
        for (int64_t q = 0; q < inner; ++q)
          sum += static_cast<double>(a[(p * rows + i) * inner + q]) *
                 static_cast<double>(b[(p * cols + j) * inner + q]);
        out[(p * rows + i) * cols + j] = static_cast<T>(sum);
      }
  return out;
}

// [36][T][A] -> [36][A][T]
template <typename T>
std::vector<T> transposed(const std::vector<T>& a, int64_t rows, int64_t cols) {
  std::vector<T> out(a.size());
  for (int64_t p = 0; p < 36; ++p)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j)
        out[(p * cols + j) * rows + i] = a[(p * rows + i) * cols + j];
  return out;
}

template <typename T>
int compare(const char* what, const char* type, const Shape& s, const std::vector<T>& got,
            const std::vector<double>& want) {
  double err = 0, scale = 1e-300;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::fabs(static_cast<double>(got[i]) - want[i]));
    scale = std::max(scale, std::fabs(want[i]));
  }
  const double tolerance = sizeof(T) == 4 ? 5e-5 : 1e-10;
  const bool bad = got.size() != want.size() || !(err / scale < tolerance);
  std::printf("%-22s %-8s [%lld, %lld, %lld, %lld, %lld]: %s\n", what, type, (long long)s.n,
              (long long)s.c, (long long)s.k, (long long)s.h, (long long)s.w,
              bad ? "FAILED" : "ok");
  return bad ? 1 : 0;
}

template <typename T>
int check_shape(const Shape& s, const char* type) {
  int failures = 0;
  const TileGrid g(s.n, s.h, s.w);
  const int64_t tiles = g.count(), pixels = s.n * s.h * s.w;
  const auto x = random_values<T>(pixels * s.c, 1);   // [N, H, W, C]
  const auto gy = random_values<T>(pixels * s.k, 2);  // [N, H, W, K]
  const auto bias = random_values<T>(s.k, 3);
  const auto at = [&](int64_t n, int64_t y, int64_t xx, int64_t ch, int64_t channels) {
    return ((n * s.h + y) * s.w + xx) * channels + ch;
  };
  std::vector<T> v(36 * tiles * s.c);
  input_tiles(x.data(), v.data(), g, s.c, serial);
  for (bool cl : {false, true}) {
    const auto st = weight_strides(s, cl);
    const auto w = random_values<T>(s.k * s.c * 9, 4);  // laid out by st
    // forward (and inference: bias and ReLU)
    std::vector<T> u(36 * s.k * s.c);
    weight_tiles_kernel(w.data(), u.data(), s.k, s.c, WeightView(st.data(), false), serial);
    const auto m = products(v, u, tiles, s.k, s.c);
    std::vector<double> want(pixels * s.k, 0.0), want_relu(pixels * s.k);
    for (int64_t n = 0; n < s.n; ++n)
      for (int64_t y = 0; y < s.h; ++y)
        for (int64_t xx = 0; xx < s.w; ++xx)
          for (int64_t k = 0; k < s.k; ++k) {
            double sum = 0;
            for (int64_t c = 0; c < s.c; ++c)
              for (int r = 0; r < 3; ++r)
                for (int q = 0; q < 3; ++q) {
                  const int64_t yy = y + r - 1, xq = xx + q - 1;
                  if (yy >= 0 && yy < s.h && xq >= 0 && xq < s.w)
                    sum += tap(w, st, k, c, r, q) * static_cast<double>(x[at(n, yy, xq, c, s.c)]);
                }
            want[at(n, y, xx, k, s.k)] = sum;
            const double b = sum + static_cast<double>(bias[k]);
            want_relu[at(n, y, xx, k, s.k)] = b < 0 ? 0 : b;
          }
    std::vector<T> out(pixels * s.k), out_relu(pixels * s.k);
    output_tiles(m.data(), out.data(), g, s.k, static_cast<const T*>(nullptr), false, serial);
    output_tiles(m.data(), out_relu.data(), g, s.k, bias.data(), true, serial);
    failures += compare(cl ? "forward, cl weight" : "forward", type, s, out, want);
    failures += compare(cl ? "bias+relu, cl weight" : "bias+relu", type, s, out_relu, want_relu);
    // weight gradient: dU = (A dY A^T)^T-summed with the input tiles, then G^T dU G
    std::vector<T> dy(36 * tiles * s.k);
    grad_tiles(gy.data(), dy.data(), g, s.k, serial);
    const auto du = products(transposed(dy, tiles, s.k), transposed(v, tiles, s.c), s.k, s.c,
                             tiles);
    std::vector<T> gw(s.k * s.c * 9);
    weight_grad_kernel(du.data(), gw.data(), s.k, s.c, WeightView(st.data(), false), serial);
    std::vector<double> want_gw(gw.size(), 0.0);
    for (int64_t k = 0; k < s.k; ++k)
      for (int64_t c = 0; c < s.c; ++c)
        for (int r = 0; r < 3; ++r)
          for (int q = 0; q < 3; ++q) {
            double sum = 0;
            for (int64_t n = 0; n < s.n; ++n)
              for (int64_t y = 0; y < s.h; ++y)
                for (int64_t xx = 0; xx < s.w; ++xx) {
                  const int64_t yy = y + r - 1, xq = xx + q - 1;
                  if (yy >= 0 && yy < s.h && xq >= 0 && xq < s.w)
                    sum += static_cast<double>(gy[at(n, y, xx, k, s.k)]) *
                           static_cast<double>(x[at(n, yy, xq, c, s.c)]);
                }
            want_gw[k * st[0] + c * st[1] + r * st[2] + q * st[3]] = sum;
          }
    failures += compare(cl ? "weight grad, cl" : "weight grad", type, s, gw, want_gw);
    // input gradient: the turned kernel's convolution of grad_y
    std::vector<T> ut(36 * s.k * s.c), vg(36 * tiles * s.k), gx(pixels * s.c);
    weight_tiles_kernel(w.data(), ut.data(), s.k, s.c, WeightView(st.data(), true), serial);
    input_tiles(gy.data(), vg.data(), g, s.k, serial);
    const auto mx = products(vg, transposed(ut, s.k, s.c), tiles, s.c, s.k);
    output_tiles(mx.data(), gx.data(), g, s.c, static_cast<const T*>(nullptr), false, serial);
    std::vector<double> want_gx(gx.size(), 0.0);
    for (int64_t n = 0; n < s.n; ++n)
      for (int64_t y = 0; y < s.h; ++y)
        for (int64_t xx = 0; xx < s.w; ++xx)
          for (int64_t k = 0; k < s.k; ++k)
            for (int64_t c = 0; c < s.c; ++c)
              for (int r = 0; r < 3; ++r)
                for (int q = 0; q < 3; ++q) {
                  const int64_t yy = y + r - 1, xq = xx + q - 1;
                  if (yy >= 0 && yy < s.h && xq >= 0 && xq < s.w)
                    want_gx[at(n, yy, xq, c, s.c)] +=
                        tap(w, st, k, c, r, q) * static_cast<double>(gy[at(n, y, xx, k, s.k)]);
                }
    failures += compare(cl ? "input grad, cl" : "input grad", type, s, gx, want_gx);
  }
  return failures;
}

}  // namespace

int main() {
  const Shape shapes[] = {{1, 3, 4, 1, 1}, {2, 5, 7, 9, 11}, {1, 70, 66, 6, 5},
                          {2, 2, 3, 13, 4}, {1, 1, 1, 8, 8}};
  int failures = 0;
  for (const auto& s : shapes) {
    failures += check_shape<float>(s, "float32");
    failures += check_shape<double>(s, "float64");
  }
  std::printf(failures ? "%d FAILED\n" : "ALL OK\n", failures);
  return failures ? 1 : 0;
}
