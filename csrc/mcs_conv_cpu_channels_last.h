// MCSConv CPU kernels for channels_last tensors: the correlation of one output row (the forward,
// and the input gradient with mirrored taps) and one row's weight-gradient partial sums.
//
// The inner dimension is the channel: a vector holds Lanes<acc_t>::count neighbouring channels
// of one pixel. For K = 3, 5, 7 (K known at compile time) runs of kRun neighbouring pixels load
// each input pixel of a tap row once and reuse it for all K column taps; runs at the left and
// right edges know at compile time which of their window columns lie outside the image.
// Channels
// past the last whole vector and other kernel sizes take a scalar path that checks every tap.
// Infinities make exactly the NaNs of the definition (a sum over the taps inside the image):
// outside pixels enter the correlation as zeros only for finite taps, and the weight gradient
// skips them.
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

// Which columns of a run's window may lie outside the image.
enum class Edge {
  kNone,   // none: the caller guarantees every column is inside
  kLeft,   // a run starting at column 0: the window's first pad columns
  kRight,  // a run ending at the last column: the window's last pad columns
  kAny,    // checked one by one (images too narrow for the two above)
};

// Channels [c0, c0 + lanes) of RUN neighbouring output pixels starting at (i, j). ROW_CHECKS:
// skip the tap rows outside the image. EDGE: which window columns are outside the image; they
// enter as zeros, which is exact only for finite taps (an infinite tap times a stand-in zero
// would be a NaN that the definition, a sum over the taps inside, does not have):
// correlate_row_vec sends a channel block with a non-finite tap to the scalar path instead.
// kLeft and kRight know their outside columns at compile time, so edge runs cost about what
// interior runs do (checked at run time they took twice as long).
template <int K, int RUN, bool ROW_CHECKS, Edge EDGE, typename scalar_t, typename acc_t>
inline void correlate_run(const scalar_t* image, const acc_t* taps_t, const Geometry& g,
                          int64_t i, int64_t j, int64_t c0, scalar_t* dst) {
  using V = Vec<acc_t>;
  constexpr int pad = K / 2, span = RUN + K - 1;
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
    for (int s = 0; s < span; ++s) {
      const bool inside = EDGE == Edge::kNone    ? true
                          : EDGE == Edge::kLeft  ? s >= pad
                          : EDGE == Edge::kRight ? s < RUN + pad
                                                 : (j - pad + s >= 0 && j - pad + s < g.w);
      win[s] = inside ? load_vec<acc_t>(image + (first + s * g.c)) : V{};
    }
#pragma GCC unroll 8
    for (int b = 0; b < K; ++b) {
      const V t = load_vec<acc_t>(taps_t + (a * K + b) * g.c + c0);
#pragma GCC unroll 16
      for (int p = 0; p < RUN; ++p) acc[p] += t * win[p + b];
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < RUN; ++p) store_vec<acc_t>(dst + p * g.c, acc[p]);
}

// Whether the K*K taps of channels [c0, c0 + lanes) are all finite.
template <int K, typename acc_t>
inline bool taps_finite(const acc_t* taps_t, const Geometry& g, int64_t c0) {
  Vec<acc_t> probe = {};
#pragma GCC unroll 8
  for (int t = 0; t < K * K; ++t) probe += load_vec<acc_t>(taps_t + t * g.c + c0) * acc_t(0);
  return all_zero<acc_t>(probe);
}

// The interior pixels [j, end) of one row (every tap column inside): runs of kRun, then of
// kRun / 2, then single pixels.
template <int K, bool ROW_CHECKS, typename scalar_t, typename acc_t>
inline void correlate_interior(const scalar_t* image, const acc_t* taps_t, const Geometry& g,
                               int64_t i, int64_t j, int64_t end, int64_t c0, scalar_t* out) {
  constexpr int half_run = kRun / 2;
  for (; j + kRun <= end; j += kRun)
    correlate_run<K, kRun, ROW_CHECKS, Edge::kNone>(image, taps_t, g, i, j, c0, out + j * g.c);
  for (; j + half_run <= end; j += half_run)
    correlate_run<K, half_run, ROW_CHECKS, Edge::kNone>(image, taps_t, g, i, j, c0,
                                                        out + j * g.c);
  for (; j < end; ++j)
    correlate_run<K, 1, ROW_CHECKS, Edge::kNone>(image, taps_t, g, i, j, c0, out + j * g.c);
}

// One output row, channels [0, c_end) (whole vectors): a kLeft run over the first kRun pixels,
// a kRight run over the last kRun, interior runs between. (Edge pixels one at a time with
// run-time checks, 8 of each 64-pixel row, had cost about a quarter of the forward.) Rows
// narrower than kRun + pad take the run-time checks, a pixel at a time.
template <int K, bool ROW_CHECKS, typename scalar_t, typename acc_t>
void correlate_row_block(const scalar_t* image, const acc_t* taps_t, const Geometry& g,
                         int64_t i, int64_t c0, scalar_t* out) {
  constexpr int pad = K / 2;
  if (g.w < kRun + pad) {
    for (int64_t j = 0; j < g.w; ++j)
      correlate_run<K, 1, true, Edge::kAny>(image, taps_t, g, i, j, c0, out + j * g.c);
    return;
  }
  correlate_run<K, kRun, ROW_CHECKS, Edge::kLeft>(image, taps_t, g, i, 0, c0, out);
  const int64_t right = g.w - kRun;  // may overlap the left run: both write the same values
  correlate_interior<K, ROW_CHECKS>(image, taps_t, g, i, kRun, right, c0, out);
  correlate_run<K, kRun, ROW_CHECKS, Edge::kRight>(image, taps_t, g, i, right, c0,
                                                   out + right * g.c);
}

template <int K, typename scalar_t, typename acc_t>
void correlate_row_vec(const scalar_t* image, const acc_t* taps_t, const Geometry& g, int64_t i,
                       int64_t c_end, scalar_t* out_row) {
  constexpr int pad = K / 2, lanes = Lanes<acc_t>::count;
  const bool row_inside = i >= pad && i + pad < g.h;
  for (int64_t c0 = 0; c0 < c_end; c0 += lanes) {
    if (!taps_finite<K>(taps_t, g, c0)) {
      for (int64_t j = 0; j < g.w; ++j)
        for (int64_t c = c0; c < c0 + lanes; ++c)
          out_row[j * g.c + c] =
              static_cast<scalar_t>(correlate_scalar(image, taps_t, g, i, j, c));
    } else if (row_inside) {
      correlate_row_block<K, false>(image, taps_t, g, i, c0, out_row + c0);
    } else {
      correlate_row_block<K, true>(image, taps_t, g, i, c0, out_row + c0);
    }
  }
}

// Adds the weight-gradient terms of RUN pixels starting at column j, channels
// [c0, c0 + lanes), tap row a, to acc[b] (b = 0..K-1): acc[b] += grad[i, j + p] *
// x[r, j + p + b - pad]. The window's input pixels are loaded once for all K column taps.
// EDGE (kNone, kLeft at column 0, kRight ending at the last column) says which window columns
// lie outside the image: their products are skipped (known at compile time), never taken with
// a stand-in zero, so an infinite gradient value makes only the definition's NaNs.
// Sets of the K sums, pixels alternating between them: with K = 5 one set is only 5
// independent FMA chains, too few to hide the FMA latency (two FMA units, 4 cycles each); two
// sets fit the registers with AVX-512.
constexpr int kSumSets = kManyRegisters ? 2 : 1;

template <int K, int RUN, Edge EDGE, typename scalar_t, typename acc_t>
inline void weight_grad_run(const scalar_t* grow, const scalar_t* xrow, const Geometry& g,
                            int64_t j, int64_t c0, Vec<acc_t> (&acc)[kSumSets][K]) {
  using V = Vec<acc_t>;
  constexpr int pad = K / 2, span = RUN + K - 1;
  static_assert(EDGE != Edge::kAny, "weight_grad_run: kAny is handled by the caller");
  auto inside = [](int s) {
    return EDGE == Edge::kNone ? true : EDGE == Edge::kLeft ? s >= pad : s < RUN + pad;
  };
  const int64_t first = (j - pad) * g.c + c0;  // an offset: see correlate_run
  V win[span];
#pragma GCC unroll 16
  for (int s = 0; s < span; ++s) win[s] = inside(s) ? load_vec<acc_t>(xrow + (first + s * g.c)) : V{};
#pragma GCC unroll 16
  for (int p = 0; p < RUN; ++p) {
    const V gv = load_vec<acc_t>(grow + (j + p) * g.c + c0);
#pragma GCC unroll 8
    for (int b = 0; b < K; ++b)
      if (inside(p + b)) acc[p % kSumSets][b] += gv * win[p + b];
  }
}

// Weight-gradient partials of channels [c0, c0 + lanes), tap row a, output row i:
// part[(a, b)][c] += sum_j grad[i, j, c] * x[r, j + b - pad, c] with r = i + a - pad (a row
// inside the image). A kLeft run, interior runs, a kRight run (no overlap: these are sums);
// the K sums stay in registers over the whole row. Rows narrower than two runs go a pixel at a
// time, each tap checked.
template <int K, typename scalar_t, typename acc_t>
inline void weight_grad_tap_row(const scalar_t* grow, const scalar_t* xrow, const Geometry& g,
                                int a, int64_t c0, acc_t* part) {
  using V = Vec<acc_t>;
  constexpr int pad = K / 2, half_run = kRun / 2;
  V acc[kSumSets][K] = {};
  if (g.w < 2 * kRun) {
    for (int64_t j = 0; j < g.w; ++j) {
      const V gv = load_vec<acc_t>(grow + j * g.c + c0);
#pragma GCC unroll 8
      for (int b = 0; b < K; ++b) {
        const int64_t q = j + b - pad;
        if (q >= 0 && q < g.w) acc[0][b] += gv * load_vec<acc_t>(xrow + q * g.c + c0);
      }
    }
  } else {
    const int64_t right = g.w - kRun;
    weight_grad_run<K, kRun, Edge::kLeft, scalar_t, acc_t>(grow, xrow, g, 0, c0, acc);
    int64_t j = kRun;
    for (; j + kRun <= right; j += kRun)
      weight_grad_run<K, kRun, Edge::kNone, scalar_t, acc_t>(grow, xrow, g, j, c0, acc);
    for (; j + half_run <= right; j += half_run)
      weight_grad_run<K, half_run, Edge::kNone, scalar_t, acc_t>(grow, xrow, g, j, c0, acc);
    for (; j < right; ++j) weight_grad_run<K, 1, Edge::kNone, scalar_t, acc_t>(grow, xrow, g, j, c0, acc);
    weight_grad_run<K, kRun, Edge::kRight, scalar_t, acc_t>(grow, xrow, g, right, c0, acc);
  }
#pragma GCC unroll 8
  for (int b = 0; b < K; ++b) {
    V sum = acc[0][b];
    for (int set = 1; set < kSumSets; ++set) sum += acc[set][b];
    acc_t* dst = part + (a * K + b) * g.c + c0;
    store_vec<acc_t>(dst, load_vec<acc_t>(dst) + sum);
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
    // Channel blocks outside, tap rows inside: one block's slice of the gradient row and of
    // the K input rows stays in L1 over the K tap rows.
    for (int64_t c0 = 0; c0 < c_vec; c0 += Lanes<acc_t>::count)
      for (int a = 0; a < K; ++a) {
        const int64_t r = i + a - K / 2;
        if (r >= 0 && r < g.h) weight_grad_tap_row<K>(grow, ximage + r * g.w * g.c, g, a, c0, part);
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
