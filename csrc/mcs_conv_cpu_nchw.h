// MCSConv CPU kernels for NCHW tensors: one plane at a time, copied first into a zero-padded
// buffer of the accumulation type so that the inner loops need no bounds checks. The
// correlation of a plane (the forward, and the input gradient with mirrored taps) and one
// plane's k*k weight-gradient sums.
//
// The padding zeros are multiplied like pixels. That is exact while the other factor is finite
// (x * 0 = 0), but an infinite tap or gradient value times a padding zero would be a NaN that
// the definition, a sum over the taps inside the image, does not have. So a plane whose taps
// (correlation) or gradient values (weight gradient) are not all finite goes through a checked
// scalar loop that skips the taps outside the image.
//
// Only included by mcs_conv_cpu.cpp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu_vector.h"
#include "mcs_conv_cpu_geometry.h"

namespace sficonv {
namespace cpu {
namespace nchw {

// Outputs accumulated together by the any-k loops (k other than 3, 5, 7): 64 values (in float,
// four AVX-512 registers), i.e. four independent FMA chains, enough to hide the FMA latency over the
// k*k taps (one chain was latency bound, 4x slower). Narrow planes use 16 so that little work
// is wasted on padding. The padded width is rounded to these blocks, so every vector load of
// either path stays inside the buffer (python_tests/cpu_asan checks it).
constexpr int kWide = 64;
constexpr int kNarrow = 16;

// A plane copied into a zero-padded accumulation-type buffer: a halo of `pad` on every side
// and the width rounded up to whole vectors, so the inner loops need no bounds checks.
struct PaddedPlane {
  int64_t rows, stride;
  int vec;
  explicit PaddedPlane(const Geometry& g)
      : rows(g.h + 2 * g.pad), stride(0), vec(g.w >= 48 ? kWide : kNarrow) {
    stride = (g.w + vec - 1) / vec * vec + 2 * g.pad + vec;
  }
  int64_t size() const { return rows * stride; }
};

// Copies the plane into the interior of `out`; returns whether every value is finite. `out`
// must already hold zeros everywhere else: a buffer zeroed once when allocated and used with
// this geometry only keeps them, since every call writes the same interior and nothing else
// (zero-filling the whole buffer for every plane had cost about as much as the copy).
template <typename scalar_t, typename acc_t>
bool fill_padded(const scalar_t* plane, const Geometry& g, const PaddedPlane& pp, acc_t* out) {
  using V = Vec<acc_t>;
  V probe = {};  // sum of value * 0 (a NaN once any value is not finite)
  acc_t tail_probe = 0;
  for (int64_t i = 0; i < g.h; ++i) {
    acc_t* dst = out + (i + g.pad) * pp.stride + g.pad;
    const scalar_t* src = plane + i * g.w;
    constexpr int lanes = Lanes<acc_t>::count;
    int64_t j = 0;
    for (; j + lanes <= g.w; j += lanes) {  // whole vectors: half types widened at once
      const V v = load_vec<acc_t>(src + j);
      store_vec<acc_t>(dst + j, v);
      probe += v * acc_t(0);
    }
    for (; j < g.w; ++j) {
      dst[j] = static_cast<acc_t>(src[j]);
      tail_probe += dst[j] * acc_t(0);
    }
  }
  return all_zero<acc_t>(probe) && tail_probe == acc_t(0);
}

template <typename acc_t>
inline bool all_finite(const acc_t* values, int count) {
  acc_t probe = 0;
  for (int e = 0; e < count; ++e) probe += values[e] * acc_t(0);
  return probe == acc_t(0);
}

// The correlation of one plane, any k, skipping the taps outside the image (see the top of
// this file): for planes whose taps are not all finite.
template <typename scalar_t, typename acc_t>
void correlate_plane_checked(const acc_t* padded, const PaddedPlane& pp, const acc_t* taps,
                             const Geometry& g, scalar_t* out) {
  for (int64_t i = 0; i < g.h; ++i)
    for (int64_t j = 0; j < g.w; ++j) {
      acc_t acc = 0;
      for (int a = 0; a < g.k; ++a) {
        if (i + a - g.pad < 0 || i + a - g.pad >= g.h) continue;
        for (int b = 0; b < g.k; ++b) {
          if (j + b - g.pad < 0 || j + b - g.pad >= g.w) continue;
          acc += taps[a * g.k + b] * padded[(i + a) * pp.stride + j + b];
        }
      }
      out[i * g.w + j] = static_cast<scalar_t>(acc);
    }
}

// The weight-gradient sums of one plane, any k, skipping the taps outside the image: for
// planes whose gradient values are not all finite.
template <typename acc_t>
void weight_grad_plane_checked(const acc_t* gpad, const acc_t* xpad, const PaddedPlane& pp,
                               const Geometry& g, acc_t* sums) {
  for (int a = 0; a < g.k; ++a)
    for (int b = 0; b < g.k; ++b) {
      acc_t acc = 0;
      for (int64_t i = 0; i < g.h; ++i) {
        if (i + a - g.pad < 0 || i + a - g.pad >= g.h) continue;
        for (int64_t j = 0; j < g.w; ++j) {
          if (j + b - g.pad < 0 || j + b - g.pad >= g.w) continue;
          acc += gpad[(i + g.pad) * pp.stride + g.pad + j] * xpad[(i + a) * pp.stride + j + b];
        }
      }
      sums[a * g.k + b] = acc;
    }
}

// Stores the first n of VEC accumulators. Only fixed-length loops touch `acc`, which lets the
// compiler keep it in vector registers (a variable index would force it onto the stack).
template <int VEC, typename scalar_t, typename acc_t>
inline void store_first(const acc_t (&acc)[VEC], int64_t n, scalar_t* dst) {
  if (n == VEC) {
    for (int jj = 0; jj < VEC; ++jj) dst[jj] = static_cast<scalar_t>(acc[jj]);
    return;
  }
  acc_t tmp[VEC];
  for (int jj = 0; jj < VEC; ++jj) tmp[jj] = acc[jj];
  for (int64_t jj = 0; jj < n; ++jj) dst[jj] = static_cast<scalar_t>(tmp[jj]);
}

// One output plane, any k: out[i][j] = sum_{a,b} taps[a,b] * padded[i + a][j + b]. Each block
// of VEC outputs is accumulated in registers over all k*k taps and stored once.
template <int VEC, typename scalar_t, typename acc_t>
void correlate_plane_vec(const acc_t* padded, const PaddedPlane& pp, const acc_t* taps,
                         const Geometry& g, scalar_t* out) {
  for (int64_t i = 0; i < g.h; ++i) {
    for (int64_t j0 = 0; j0 < g.w; j0 += VEC) {
      acc_t acc[VEC] = {};
      for (int a = 0; a < g.k; ++a) {
        for (int b = 0; b < g.k; ++b) {
          // A pointer per tap, indexed by jj alone: with -fwrapv (Python's flags) an index like
          // b + jj may wrap, and GCC then emits gathers instead of contiguous loads.
          const acc_t* src = padded + (i + a) * pp.stride + j0 + b;
          const acc_t t = taps[a * g.k + b];
          for (int jj = 0; jj < VEC; ++jj) acc[jj] += t * src[jj];
        }
      }
      store_first(acc, std::min<int64_t>(VEC, g.w - j0), out + i * g.w + j0);
    }
  }
}

// The same for K = 3, 5, 7: ROWS output rows by one vector of columns at a time. For each
// column tap b, the K taps of that column are broadcast once, and each input row is loaded once
// and feeds every output row it touches: ROWS independent FMA chains and about 0.4 loads per FMA
// (ROWS = 8, K = 5), against two (a tap broadcast and an input vector) in the loop above.
template <int K, int ROWS, typename scalar_t, typename acc_t>
inline void correlate_rows_k(const acc_t* padded, const PaddedPlane& pp, const acc_t* taps,
                             const Geometry& g, int64_t i, int64_t j0, scalar_t* out) {
  using V = Vec<acc_t>;
  constexpr int lanes = Lanes<acc_t>::count;
  V acc[ROWS] = {};
#pragma GCC unroll 8
  for (int b = 0; b < K; ++b) {
    V column[K];
#pragma GCC unroll 8
    for (int a = 0; a < K; ++a) column[a] = V{} + taps[a * K + b];
    const acc_t* src = padded + i * pp.stride + j0 + b;
#pragma GCC unroll 16
    for (int rr = 0; rr < ROWS + K - 1; ++rr) {
      const V xv = load_vec<acc_t>(src + rr * pp.stride);
#pragma GCC unroll 16
      for (int o = 0; o < ROWS; ++o) {
        const int a = rr - o;  // output row i + o uses this input row as its tap row a
        if (a >= 0 && a < K) acc[o] += column[a] * xv;
      }
    }
  }
  const int64_t n = std::min<int64_t>(lanes, g.w - j0);
#pragma GCC unroll 16
  for (int o = 0; o < ROWS; ++o) {
    scalar_t* dst = out + (i + o) * g.w + j0;
    if (n == lanes) {
      store_vec<acc_t>(dst, acc[o]);
    } else {
      for (int64_t e = 0; e < n; ++e) dst[e] = static_cast<scalar_t>(acc[o][e]);
    }
  }
}

// Output rows per block: ROWS accumulators + K tap broadcasts + an input vector must fit the
// vector registers (32 with AVX-512, 16 otherwise).
constexpr int kRowBlock = kManyRegisters ? 8 : 4;

template <int K, typename scalar_t, typename acc_t>
void correlate_plane_k(const acc_t* padded, const PaddedPlane& pp, const acc_t* taps,
                       const Geometry& g, scalar_t* out) {
  constexpr int lanes = Lanes<acc_t>::count, rows = kRowBlock;
  int64_t i = 0;
  for (; i + rows <= g.h; i += rows)
    for (int64_t j0 = 0; j0 < g.w; j0 += lanes)
      correlate_rows_k<K, rows>(padded, pp, taps, g, i, j0, out);
  for (; i < g.h; ++i)
    for (int64_t j0 = 0; j0 < g.w; j0 += lanes)
      correlate_rows_k<K, 1>(padded, pp, taps, g, i, j0, out);
}

template <typename scalar_t, typename acc_t>
void correlate_plane(const acc_t* padded, const PaddedPlane& pp, const acc_t* taps,
                     const Geometry& g, scalar_t* out) {
  if (!all_finite(taps, g.k * g.k)) return correlate_plane_checked(padded, pp, taps, g, out);
  switch (g.k) {
    case 3: return correlate_plane_k<3>(padded, pp, taps, g, out);
    case 5: return correlate_plane_k<5>(padded, pp, taps, g, out);
    case 7: return correlate_plane_k<7>(padded, pp, taps, g, out);
    default: break;
  }
  if (pp.vec == kWide)
    correlate_plane_vec<kWide>(padded, pp, taps, g, out);
  else
    correlate_plane_vec<kNarrow>(padded, pp, taps, g, out);
}

// dL/dw[a,b] = sum_{i,j} g[i][j] * x[i + a - pad][j + b - pad] over one plane, written to
// sums[k*k], for K = 3, 5, 7. For each tap row a, one gradient vector feeds the K column taps
// (K vector sums, kept in registers over the plane; two sets of them, alternating between
// vectors, so that 2K independent FMA chains hide the FMA latency). Columns past the last whole
// vector of a row go through a scalar loop: reading past the row end would multiply g's zero
// padding by x, and 0 * inf would make a NaN the reference does not have.
template <int K, typename acc_t>
void weight_grad_plane_k(const acc_t* gpad, const acc_t* xpad, const PaddedPlane& pp,
                         const Geometry& g, acc_t* sums) {
  using V = Vec<acc_t>;
  constexpr int lanes = Lanes<acc_t>::count, pad = K / 2;
  const int64_t full = g.w / lanes * lanes;
  for (int a = 0; a < K; ++a) {
    V acc[2][K] = {};
    acc_t tail[K] = {};
    for (int64_t i = 0; i < g.h; ++i) {
      const acc_t* grow = gpad + (i + pad) * pp.stride + pad;
      const acc_t* xrow = xpad + (i + a) * pp.stride;
      int64_t j0 = 0;
      auto add_vector = [&](int set, int64_t j) {
        const V gv = load_vec<acc_t>(grow + j);
        const acc_t* xv = xrow + j;  // see correlate_plane_vec: one pointer, constant offsets
#pragma GCC unroll 8
        for (int b = 0; b < K; ++b) acc[set][b] += gv * load_vec<acc_t>(xv + b);
      };
      for (; j0 + 2 * lanes <= full; j0 += 2 * lanes) {
        add_vector(0, j0);
        add_vector(1, j0 + lanes);
      }
      if (j0 < full) add_vector(0, j0);
      for (int64_t j = full; j < g.w; ++j)
        for (int b = 0; b < K; ++b) tail[b] += grow[j] * xrow[j + b];
    }
    for (int b = 0; b < K; ++b) {
      const V both = acc[0][b] + acc[1][b];
      acc_t total = tail[b];
      for (int e = 0; e < lanes; ++e) total += both[e];
      sums[a * K + b] = total;
    }
  }
}

// The same for any k: one tap at a time, its VEC partial sums in registers over the plane.
template <int VEC, typename acc_t>
void weight_grad_plane_any_k(const acc_t* gpad, const acc_t* xpad, const PaddedPlane& pp,
                             const Geometry& g, acc_t* sums) {
  const int64_t full = g.w / VEC * VEC;
  for (int a = 0; a < g.k; ++a) {
    for (int b = 0; b < g.k; ++b) {
      acc_t acc[VEC] = {};
      for (int64_t i = 0; i < g.h; ++i) {
        const acc_t* grow = gpad + (i + g.pad) * pp.stride + g.pad;
        const acc_t* xrow = xpad + (i + a) * pp.stride + b;  // see correlate_plane_vec
        for (int64_t j0 = 0; j0 < full; j0 += VEC) {
          const acc_t* gv = grow + j0;
          const acc_t* xv = xrow + j0;
          for (int jj = 0; jj < VEC; ++jj) acc[jj] += gv[jj] * xv[jj];
        }
        for (int64_t j = full; j < g.w; ++j) acc[j - full] += grow[j] * xrow[j];
      }
      acc_t total = 0;
      for (int jj = 0; jj < VEC; ++jj) total += acc[jj];
      sums[a * g.k + b] = total;
    }
  }
}

// `grad_finite`: what fill_padded returned for the gradient plane.
template <typename acc_t>
void weight_grad_plane(const acc_t* gpad, const acc_t* xpad, const PaddedPlane& pp,
                       const Geometry& g, bool grad_finite, acc_t* sums) {
  if (!grad_finite) return weight_grad_plane_checked(gpad, xpad, pp, g, sums);
  switch (g.k) {
    case 3: return weight_grad_plane_k<3>(gpad, xpad, pp, g, sums);
    case 5: return weight_grad_plane_k<5>(gpad, xpad, pp, g, sums);
    case 7: return weight_grad_plane_k<7>(gpad, xpad, pp, g, sums);
    default: break;
  }
  if (pp.vec == kWide)
    weight_grad_plane_any_k<kWide>(gpad, xpad, pp, g, sums);
  else
    weight_grad_plane_any_k<kNarrow>(gpad, xpad, pp, g, sums);
}

}  // namespace nchw
}  // namespace cpu
}  // namespace sficonv
