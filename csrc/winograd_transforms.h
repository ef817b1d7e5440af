// Winograd F(4x4, 3x3) transforms (see winograd_cpu.cpp for the method): plain templates with
// no ATen, parallelised through a `parallel(begin, end, grain, fn)` callable, so that
// python_tests/cpu_asan/winograd_kernels.cpp can run them on exact-size buffers under
// AddressSanitizer (winograd_cpu.cpp passes at::parallel_for).
#pragma once

#include <algorithm>
#include <cstdint>

namespace sficonv {
namespace winograd {

constexpr int64_t kOut = 4;        // output pixels per tile side
constexpr int64_t kIn = 6;         // input pixels per tile side (kOut + 3 - 1)
constexpr int64_t kPositions = 36; // kIn * kIn
constexpr int64_t kChunk = 64;     // channels transformed per pass (stack buffers stay in L1)

// The tiles covering an [n, h, w] map: tile t is (image, tile row, tile column), row-major.
struct TileGrid {
  int64_t n, h, w, rows, cols;
  TileGrid(int64_t n_, int64_t h_, int64_t w_)
      : n(n_), h(h_), w(w_), rows((h_ + kOut - 1) / kOut), cols((w_ + kOut - 1) / kOut) {}
  int64_t count() const { return n * rows * cols; }
  int64_t image(int64_t t) const { return t / (rows * cols); }
  int64_t row(int64_t t) const { return (t / cols) % rows; }
  int64_t col(int64_t t) const { return t % cols; }
};

// B^T applied to six values d0..d5 (one column of a tile), channel by channel.
template <typename T>
inline void input_rows(const T* d0, const T* d1, const T* d2, const T* d3, const T* d4,
                       const T* d5, T* r0, T* r1, T* r2, T* r3, T* r4, T* r5, int64_t cb) {
  for (int64_t c = 0; c < cb; ++c) {
    const T a0 = d0[c], a1 = d1[c], a2 = d2[c], a3 = d3[c], a4 = d4[c], a5 = d5[c];
    r0[c] = 4 * a0 - 5 * a2 + a4;
    r1[c] = -4 * (a1 + a2) + a3 + a4;
    r2[c] = 4 * (a1 - a2) - a3 + a4;
    r3[c] = 2 * (a3 - a1) - a2 + a4;
    r4[c] = 2 * (a1 - a3) - a2 + a4;
    r5[c] = 4 * a1 - 5 * a3 + a5;
  }
}

// x: [N, H, W, C] contiguous -> v: [36, tiles, C], v[a*6+b][t] = (B^T d B)[a][b] of tile t.
template <typename T, typename Parallel>
void input_tiles(const T* x, T* v, const TileGrid& g, int64_t C, const Parallel& parallel) {
  const int64_t tiles = g.count();
  const int64_t plane = tiles * C;  // distance between two positions of v
  parallel(0, tiles, 1, [&](int64_t begin, int64_t end) {
    alignas(64) T d[kIn][kIn][kChunk];
    alignas(64) T u[kIn][kIn][kChunk];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = g.image(t), y0 = g.row(t) * kOut - 1, x0 = g.col(t) * kOut - 1;
      for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
        const int64_t cb = std::min(kChunk, C - c0);
        for (int64_t r = 0; r < kIn; ++r) {
          const int64_t y = y0 + r;
          for (int64_t s = 0; s < kIn; ++s) {
            const int64_t xx = x0 + s;
            if (y >= 0 && y < g.h && xx >= 0 && xx < g.w) {
              const T* src = x + ((n * g.h + y) * g.w + xx) * C + c0;
              std::copy(src, src + cb, d[r][s]);
            } else {
              std::fill(d[r][s], d[r][s] + cb, T(0));  // the zero padding
            }
          }
        }
        for (int64_t s = 0; s < kIn; ++s)  // B^T d: along the tile's rows
          input_rows(d[0][s], d[1][s], d[2][s], d[3][s], d[4][s], d[5][s], u[0][s], u[1][s],
                     u[2][s], u[3][s], u[4][s], u[5][s], cb);
        for (int64_t a = 0; a < kIn; ++a) {  // (B^T d) B: along the columns, into v
          T* out = v + (a * kIn) * plane + t * C + c0;
          input_rows(u[a][0], u[a][1], u[a][2], u[a][3], u[a][4], u[a][5], out, out + plane,
                     out + 2 * plane, out + 3 * plane, out + 4 * plane, out + 5 * plane, cb);
        }
      }
    }
  });
}

// A^T applied to six values m0..m5: the four outputs of one column.
template <typename T>
inline void output_rows(const T* m0, const T* m1, const T* m2, const T* m3, const T* m4,
                        const T* m5, T* o0, T* o1, T* o2, T* o3, int64_t cb) {
  for (int64_t c = 0; c < cb; ++c) {
    const T p = m1[c] + m2[c], q = m1[c] - m2[c], r = m3[c] + m4[c], s = m3[c] - m4[c];
    o0[c] = m0[c] + p + r;
    o1[c] = q + 2 * s;
    o2[c] = p + 4 * r;
    o3[c] = q + 8 * s + m5[c];
  }
}

// An output row's epilogue for inference: + bias, then ReLU (NaN kept, as torch's ReLU does).
template <typename T>
inline void store_row(const T* o, T* dst, const T* bias, bool relu, int64_t kb) {
  if (bias == nullptr && !relu) {
    std::copy(o, o + kb, dst);
  } else if (relu) {
    for (int64_t k = 0; k < kb; ++k) {
      const T v = bias == nullptr ? o[k] : o[k] + bias[k];
      dst[k] = v < 0 ? T(0) : v;
    }
  } else {
    for (int64_t k = 0; k < kb; ++k) dst[k] = o[k] + bias[k];
  }
}

// m: [36, tiles, K] -> y: [N, H, W, K], y_tile = A^T m A, cropped at the map's edges; with a
// bias, relu(y + bias) (inference's folded BatchNorm and ReLU, in the same pass).
template <typename T, typename Parallel>
void output_tiles(const T* m, T* y, const TileGrid& g, int64_t K, const T* bias, bool relu,
                  const Parallel& parallel) {
  const int64_t tiles = g.count();
  const int64_t plane = tiles * K;
  parallel(0, tiles, 1, [&](int64_t begin, int64_t end) {
    alignas(64) T w[kOut][kIn][kChunk];
    alignas(64) T o[kOut][kChunk];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = g.image(t), y0 = g.row(t) * kOut, x0 = g.col(t) * kOut;
      for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
        const int64_t kb = std::min(kChunk, K - k0);
        const T* src = m + t * K + k0;
        for (int64_t b = 0; b < kIn; ++b)  // A^T m: along the rows
          output_rows(src + b * plane, src + (kIn + b) * plane, src + (2 * kIn + b) * plane,
                      src + (3 * kIn + b) * plane, src + (4 * kIn + b) * plane,
                      src + (5 * kIn + b) * plane, w[0][b], w[1][b], w[2][b], w[3][b], kb);
        for (int64_t p = 0; p < kOut && y0 + p < g.h; ++p) {  // (A^T m) A: along the columns
          output_rows(w[p][0], w[p][1], w[p][2], w[p][3], w[p][4], w[p][5], o[0], o[1], o[2],
                      o[3], kb);
          for (int64_t q = 0; q < kOut && x0 + q < g.w; ++q)
            store_row(o[q], y + ((n * g.h + y0 + p) * g.w + x0 + q) * K + k0,
                      bias == nullptr ? nullptr : bias + k0, relu, kb);
        }
      }
    }
  });
}

// A applied to four values g0..g3 (the adjoint of output_rows): six values.
template <typename T>
inline void grad_rows(const T* g0, const T* g1, const T* g2, const T* g3, T* q0, T* q1, T* q2,
                      T* q3, T* q4, T* q5, int64_t cb) {
  for (int64_t c = 0; c < cb; ++c) {
    const T e = g0[c] + g2[c], f = g1[c] + g3[c], h = g0[c] + 4 * g2[c], k = 2 * g1[c] + 8 * g3[c];
    q0[c] = g0[c];
    q1[c] = e + f;
    q2[c] = e - f;
    q3[c] = h + k;
    q4[c] = h - k;
    q5[c] = g3[c];
  }
}

// gy: [N, H, W, K] -> [36, tiles, K], A dY A^T per tile (outputs past the map's edge are 0).
template <typename T, typename Parallel>
void grad_tiles(const T* gy, T* out, const TileGrid& g, int64_t K, const Parallel& parallel) {
  const int64_t tiles = g.count();
  const int64_t plane = tiles * K;
  parallel(0, tiles, 1, [&](int64_t begin, int64_t end) {
    alignas(64) T d[kOut][kOut][kChunk];
    alignas(64) T h[kIn][kOut][kChunk];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = g.image(t), y0 = g.row(t) * kOut, x0 = g.col(t) * kOut;
      for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
        const int64_t kb = std::min(kChunk, K - k0);
        for (int64_t p = 0; p < kOut; ++p) {
          for (int64_t q = 0; q < kOut; ++q) {
            if (y0 + p < g.h && x0 + q < g.w) {
              const T* src = gy + ((n * g.h + y0 + p) * g.w + x0 + q) * K + k0;
              std::copy(src, src + kb, d[p][q]);
            } else {
              std::fill(d[p][q], d[p][q] + kb, T(0));
            }
          }
        }
        for (int64_t q = 0; q < kOut; ++q)  // A dY: along the rows
          grad_rows(d[0][q], d[1][q], d[2][q], d[3][q], h[0][q], h[1][q], h[2][q], h[3][q],
                    h[4][q], h[5][q], kb);
        for (int64_t a = 0; a < kIn; ++a) {  // (A dY) A^T: along the columns
          T* dst = out + (a * kIn) * plane + t * K + k0;
          grad_rows(h[a][0], h[a][1], h[a][2], h[a][3], dst, dst + plane, dst + 2 * plane,
                    dst + 3 * plane, dst + 4 * plane, dst + 5 * plane, kb);
        }
      }
    }
  });
}

// G [6, 3] of F(4x4, 3x3) applied to a kernel row's 3 taps, lane by lane: 6 values. Constants
// are multiplied, not divided by (a division per value was the weight transform's main cost).
template <typename T>
inline void kernel_rows(const T* g0, const T* g1, const T* g2, T* u0, T* u1, T* u2, T* u3,
                        T* u4, T* u5, int64_t n) {
  constexpr T sixth = T(1) / 6, twentyfourth = T(1) / 24;
  for (int64_t i = 0; i < n; ++i) {
    const T e = g0[i] + g2[i], f = g0[i] + 4 * g2[i], h = 2 * g1[i];
    u0[i] = g0[i] * T(0.25);
    u1[i] = -(e + g1[i]) * sixth;
    u2[i] = -(e - g1[i]) * sixth;
    u3[i] = (f + h) * twentyfourth;
    u4[i] = (f - h) * twentyfourth;
    u5[i] = g2[i];
  }
}

// G^T applied to six values, lane by lane: the adjoint of kernel_rows.
template <typename T>
inline void kernel_rows_adjoint(const T* u0, const T* u1, const T* u2, const T* u3, const T* u4,
                                const T* u5, T* g0, T* g1, T* g2, int64_t n) {
  constexpr T sixth = T(1) / 6, twelfth = T(1) / 12, twentyfourth = T(1) / 24;
  for (int64_t i = 0; i < n; ++i) {
    const T p = u1[i] + u2[i], q = u3[i] + u4[i];
    g0[i] = u0[i] * T(0.25) - p * sixth + q * twentyfourth;
    g1[i] = (u2[i] - u1[i]) * sixth + (u3[i] - u4[i]) * twelfth;
    g2[i] = (q - p) * sixth + u5[i];
  }
}

// The weight as the transforms read and write it: taps of (k, c) at k * sk + c * sc + the tap's
// offset, whatever the weight's layout (contiguous or channels_last: no copy). `turned` reverses
// both tap axes (the kernel turned 180 degrees, for the input gradient).
struct WeightView {
  int64_t sk, sc, tap_offset[9];
  // strides: the weight's four strides, in elements.
  WeightView(const int64_t* strides, bool turned) : sk(strides[0]), sc(strides[1]) {
    for (int64_t j = 0; j < 9; ++j) {
      const int64_t t = turned ? 8 - j : j;
      tap_offset[j] = (t / 3) * strides[2] + (t % 3) * strides[3];
    }
  }
};

// weight [K, C, 3, 3] -> U [36, K, C], U[a*6+b][k][c] = (G w[k][c] G^T)[a][b]: rows k, c
// fastest, so that each chunk gathers its taps from one contiguous stretch of a contiguous
// weight (or tap by tap along c from a channels_last one). The matrix products take U
// transposed where they need [C, K].
template <typename T, typename Parallel>
void weight_tiles_kernel(const T* w, T* u, int64_t K, int64_t C, const WeightView& view,
                         const Parallel& parallel) {
  const int64_t plane = K * C;
  parallel(0, K, 16, [&](int64_t begin, int64_t end) {
    alignas(64) T taps[9][kChunk];
    alignas(64) T rows[3][kIn][kChunk];
    for (int64_t k = begin; k < end; ++k) {
      for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
        const int64_t cb = std::min(kChunk, C - c0);
        for (int64_t i = 0; i < cb; ++i) {
          const T* g = w + k * view.sk + (c0 + i) * view.sc;
          for (int64_t j = 0; j < 9; ++j) taps[j][i] = g[view.tap_offset[j]];
        }
        for (int64_t i = 0; i < 3; ++i)  // G along each kernel row
          kernel_rows(taps[3 * i], taps[3 * i + 1], taps[3 * i + 2], rows[i][0], rows[i][1],
                      rows[i][2], rows[i][3], rows[i][4], rows[i][5], cb);
        for (int64_t b = 0; b < kIn; ++b) {  // then along the columns, into U
          T* out = u + b * plane + k * C + c0;
          kernel_rows(rows[0][b], rows[1][b], rows[2][b], out, out + kIn * plane,
                      out + 2 * kIn * plane, out + 3 * kIn * plane, out + 4 * kIn * plane,
                      out + 5 * kIn * plane, cb);
        }
      }
    }
  });
}

// The adjoint of weight_tiles_kernel (not turned): dU [36, K, C] -> grad of weight, written
// through `view` (the weight's own layout).
template <typename T, typename Parallel>
void weight_grad_kernel(const T* du, T* gw, int64_t K, int64_t C, const WeightView& view,
                        const Parallel& parallel) {
  const int64_t plane = K * C;
  parallel(0, K, 16, [&](int64_t begin, int64_t end) {
    alignas(64) T cols[kIn][3][kChunk];
    alignas(64) T taps[9][kChunk];
    for (int64_t k = begin; k < end; ++k) {
      for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
        const int64_t cb = std::min(kChunk, C - c0);
        for (int64_t a = 0; a < kIn; ++a) {  // G^T along b, for each a
          const T* in = du + a * kIn * plane + k * C + c0;
          kernel_rows_adjoint(in, in + plane, in + 2 * plane, in + 3 * plane, in + 4 * plane,
                              in + 5 * plane, cols[a][0], cols[a][1], cols[a][2], cb);
        }
        for (int64_t j = 0; j < 3; ++j)  // then along a: the taps of kernel column j
          kernel_rows_adjoint(cols[0][j], cols[1][j], cols[2][j], cols[3][j], cols[4][j],
                              cols[5][j], taps[j], taps[3 + j], taps[6 + j], cb);
        for (int64_t i = 0; i < cb; ++i) {
          T* g = gw + k * view.sk + (c0 + i) * view.sc;
          for (int64_t j = 0; j < 9; ++j) g[view.tap_offset[j]] = taps[j][i];
        }
      }
    }
  });
}

}  // namespace winograd
}  // namespace sficonv
