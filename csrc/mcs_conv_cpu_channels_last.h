// MCSConv CPU kernels for channels_last tensors: the correlation of one output row (the forward,
// and the input gradient with mirrored taps) and one row's weight-gradient partial sums.
//
// The inner dimension is the channel: a vector holds Lanes<acc_t>::count neighbouring channels
// of one pixel. For K = 3, 5, 7 (K known at compile time) runs of kRun neighbouring pixels load
// each input pixel of a tap row once and reuse it for all K column taps; pixels near the left
// and right edges take the same vector code one pixel at a time, checking each tap. Channels
// past the last whole vector and other kernel sizes take a scalar path that checks every tap.
// No path multiplies by a stand-in zero for a pixel outside the image: those taps are skipped,
// so infinities make exactly the NaNs the definition (a sum over the taps inside) makes.
//
// Only included by mcs_conv_cpu.cpp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu_vector.h"
#include "mcs_conv.h"
#include "mcs_conv_cpu_geometry.h"

namespace sficonv {
namespace cpu {
namespace channels_last {

// Pixels per run: with 32 vector registers (AVX-512) 8 accumulators + a K + 7 pixel window
// fit; with 16, 4 and a K + 3 pixel window do.
constexpr int kRun = kManyRegisters ? 8 : 4;

// ---- the scalar path: any K, any channel range -------------------------------------------

// Channel c of output pixel (i, j), every tap checked against the image borders.
template <typename scalar_t, typename acc_t>
inline acc_t correlate_scalar(const scalar_t* image, const acc_t* taps_t, const Geometry& g,
                              int64_t i, int64_t j, int64_t c) {
  acc_t acc = 0;
  for (int a = 0; a < g.k; ++a) {
    const int64_t r = i + a - g.pad;
    if (r < 0 || r >= g.h) continue;
    for (int b = 0; b < g.k; ++b) {
      const int64_t q = j + b - g.pad;
      if (q < 0 || q >= g.w) continue;
      acc += taps_t[(a * g.k + b) * g.c + c] * static_cast<acc_t>(image[(r * g.w + q) * g.c + c]);
    }
  }
  return acc;
}

// Weight-gradient partials of channels [c_begin, g.c) for output row (i) of one image:
// part[tap][c] += sum_j grad[i, j, c] * x[i + a - pad, j + b - pad, c].
template <typename scalar_t, typename acc_t>
inline void weight_grad_scalar(const scalar_t* gimage, const scalar_t* ximage, const Geometry& g,
                               int64_t i, int64_t c_begin, acc_t* part) {
  const scalar_t* grow = gimage + i * g.w * g.c;
  for (int a = 0; a < g.k; ++a) {
    const int64_t r = i + a - g.pad;
    if (r < 0 || r >= g.h) continue;
    for (int b = 0; b < g.k; ++b) {
      const int off = b - g.pad;
      int j0, j1;
      valid_columns(static_cast<int>(g.w), off, &j0, &j1);
      acc_t* acc = part + (a * g.k + b) * g.c;
      for (int j = j0; j < j1; ++j) {
        const scalar_t* gv = grow + j * g.c;
        const scalar_t* xv = ximage + (r * g.w + j + off) * g.c;
        for (int64_t c = c_begin; c < g.c; ++c)
          acc[c] += static_cast<acc_t>(gv[c]) * static_cast<acc_t>(xv[c]);
      }
    }
  }
}

// ---- the vector path: K = 3, 5, 7, whole vectors of channels ------------------------------

// Channels [c0, c0 + lanes) of RUN neighbouring output pixels starting at (i, j). ROW_CHECKS
// and COL_CHECKS: skip the taps whose input row or column lies outside the image (rows near the
// top or bottom, pixels near an edge); without them the caller guarantees that every tap lies
// inside. Skipped, not multiplied by zeros: an infinite tap times a zero standing for a pixel
// outside would make a NaN that the definition (a sum over the taps inside) does not have.
template <int K, int RUN, bool ROW_CHECKS, bool COL_CHECKS, typename scalar_t, typename acc_t>
inline void correlate_run(const scalar_t* image, const acc_t* taps_t, const Geometry& g,
                          int64_t i, int64_t j, int64_t c0, scalar_t* dst) {
  using V = Vec<acc_t>;
  constexpr int pad = K / 2, span = RUN + K - 1;
  bool inside[span];  // column j - pad + s lies in the image
#pragma GCC unroll 16
  for (int s = 0; s < span; ++s) inside[s] = !COL_CHECKS || (j - pad + s >= 0 && j - pad + s < g.w);
  V acc[RUN] = {};
#pragma GCC unroll 8
  for (int a = 0; a < K; ++a) {
    const int64_t r = i + a - pad;
    if (ROW_CHECKS && (r < 0 || r >= g.h)) continue;
    // Offsets, not pointers, until a pixel is known to be inside: a pointer before the
    // tensor's first element would be undefined even if never read.
    const int64_t first = (r * g.w + j - pad) * g.c + c0;
    V win[span];
#pragma GCC unroll 16
    for (int s = 0; s < span; ++s)
      win[s] = inside[s] ? load_vec<acc_t>(image + (first + s * g.c)) : V{};
#pragma GCC unroll 8
    for (int b = 0; b < K; ++b) {
      const V t = load_vec<acc_t>(taps_t + (a * K + b) * g.c + c0);
#pragma GCC unroll 16
      for (int p = 0; p < RUN; ++p)
        if (inside[p + b]) acc[p] += t * win[p + b];
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < RUN; ++p) store_vec<acc_t>(dst + p * g.c, acc[p]);
}

template <int K, typename scalar_t, typename acc_t>
void correlate_row_vec(const scalar_t* image, const acc_t* taps_t, const Geometry& g, int64_t i,
                       int64_t c_end, scalar_t* out_row) {
  constexpr int pad = K / 2, lanes = Lanes<acc_t>::count;
  const bool row_inside = i >= pad && i + pad < g.h;
  const int64_t interior_end = g.w - pad;  // pixels in [pad, interior_end) need no column checks
  for (int64_t c0 = 0; c0 < c_end; c0 += lanes) {
    int64_t j = 0;
    auto edge_pixel = [&](int64_t jj) {
      correlate_run<K, 1, true, true>(image, taps_t, g, i, jj, c0, out_row + jj * g.c + c0);
    };
    for (; j < pad && j < g.w; ++j) edge_pixel(j);
    if (row_inside) {
      for (; j + kRun <= interior_end; j += kRun)
        correlate_run<K, kRun, false, false>(image, taps_t, g, i, j, c0, out_row + j * g.c + c0);
    } else {
      for (; j + kRun <= interior_end; j += kRun)
        correlate_run<K, kRun, true, false>(image, taps_t, g, i, j, c0, out_row + j * g.c + c0);
    }
    for (; j < g.w; ++j) edge_pixel(j);
  }
}

// Weight-gradient partials of channels [c0, c0 + lanes), tap row a, output row i:
// part[(a, b)][c] += sum_j grad[i, j, c] * x[r, j + b - pad, c] with r = i + a - pad (a row
// inside the image). Runs of kRun pixels share one window of input pixels over the K column
// taps; the K sums stay in registers over the whole row.
template <int K, typename scalar_t, typename acc_t>
inline void weight_grad_tap_row(const scalar_t* grow, const scalar_t* xrow, const Geometry& g,
                                int a, int64_t c0, acc_t* part) {
  using V = Vec<acc_t>;
  constexpr int pad = K / 2, span = kRun + K - 1;
  V acc[K] = {};
  const int64_t interior_end = g.w - pad;
  auto edge_pixel = [&](int64_t j) {
    const V gv = load_vec<acc_t>(grow + j * g.c + c0);
#pragma GCC unroll 8
    for (int b = 0; b < K; ++b) {
      const int64_t q = j + b - pad;
      if (q >= 0 && q < g.w) acc[b] += gv * load_vec<acc_t>(xrow + q * g.c + c0);
    }
  };
  int64_t j = 0;
  for (; j < pad && j < g.w; ++j) edge_pixel(j);
  for (; j + kRun <= interior_end; j += kRun) {
    const scalar_t* src = xrow + (j - pad) * g.c + c0;
    V win[span];
#pragma GCC unroll 16
    for (int s = 0; s < span; ++s) win[s] = load_vec<acc_t>(src + s * g.c);
#pragma GCC unroll 16
    for (int p = 0; p < kRun; ++p) {
      const V gv = load_vec<acc_t>(grow + (j + p) * g.c + c0);
#pragma GCC unroll 8
      for (int b = 0; b < K; ++b) acc[b] += gv * win[p + b];
    }
  }
  for (; j < g.w; ++j) edge_pixel(j);
#pragma GCC unroll 8
  for (int b = 0; b < K; ++b) {
    acc_t* dst = part + (a * K + b) * g.c + c0;
    store_vec<acc_t>(dst, load_vec<acc_t>(dst) + acc[b]);
  }
}

// ---- one row, either path -----------------------------------------------------------------

// One output row (image, row i): out_row[j, c] = sum_{a,b} taps_t[a,b][c] * image[i+a-pad,
// j+b-pad, c]. taps_t is [K*K][C] (transposed so that a tap's channels are contiguous).
template <typename scalar_t, typename acc_t>
void correlate_row(const scalar_t* image, const acc_t* taps_t, const Geometry& g, int64_t i,
                   scalar_t* out_row) {
  const int64_t c_vec = g.c / Lanes<acc_t>::count * Lanes<acc_t>::count;
  int64_t c_begin = 0;
  switch (g.k) {
    case 3: correlate_row_vec<3>(image, taps_t, g, i, c_vec, out_row); c_begin = c_vec; break;
    case 5: correlate_row_vec<5>(image, taps_t, g, i, c_vec, out_row); c_begin = c_vec; break;
    case 7: correlate_row_vec<7>(image, taps_t, g, i, c_vec, out_row); c_begin = c_vec; break;
    default: break;
  }
  for (int64_t j = 0; j < g.w; ++j)
    for (int64_t c = c_begin; c < g.c; ++c)
      out_row[j * g.c + c] = static_cast<scalar_t>(correlate_scalar(image, taps_t, g, i, j, c));
}

// Adds output row i's weight-gradient terms into part ([K*K][C], acc_t).
template <typename scalar_t, typename acc_t>
void weight_grad_row(const scalar_t* gimage, const scalar_t* ximage, const Geometry& g, int64_t i,
                     acc_t* part) {
  const int64_t c_vec = g.c / Lanes<acc_t>::count * Lanes<acc_t>::count;
  int64_t c_begin = 0;
  auto vector_path = [&](auto k_constant) {
    constexpr int K = decltype(k_constant)::value;
    const scalar_t* grow = gimage + i * g.w * g.c;
    for (int a = 0; a < K; ++a) {
      const int64_t r = i + a - K / 2;
      if (r < 0 || r >= g.h) continue;
      for (int64_t c0 = 0; c0 < c_vec; c0 += Lanes<acc_t>::count)
        weight_grad_tap_row<K>(grow, ximage + r * g.w * g.c, g, a, c0, part);
    }
    c_begin = c_vec;
  };
  switch (g.k) {
    case 3: vector_path(std::integral_constant<int, 3>{}); break;
    case 5: vector_path(std::integral_constant<int, 5>{}); break;
    case 7: vector_path(std::integral_constant<int, 7>{}); break;
    default: break;
  }
  if (c_begin < g.c) weight_grad_scalar(gimage, ximage, g, i, c_begin, part);
}

}  // namespace channels_last
}  // namespace cpu
}  // namespace sficonv
