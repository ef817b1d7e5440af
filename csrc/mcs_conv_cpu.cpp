// MCSConv CPU kernels: forward, and a fused backward that produces the input gradient and the
// per-channel weight gradient in one pass over grad_out and x.
//
// Two layouts, each with inner loops that run along contiguous memory so the compiler can
// vectorise them: NCHW walks a row of one plane, channels_last walks the channels of a pixel.
// Parallel over planes (NCHW) or fixed chunks of rows (channels_last) with at::parallel_for.
// The weight gradient is reduced from fixed per-plane/per-chunk partials in a fixed order, so it
// is bitwise deterministic whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "mcs_conv.h"

namespace sficonv {
namespace {

constexpr int64_t kRowsPerChunk = 8;  // channels_last weight-gradient partials: fixed blocking
// Outputs accumulated together: 64 floats = four AVX-512 registers, i.e. four independent FMA
// chains, enough to hide the FMA latency over the k*k taps (one chain was latency bound, 4x
// slower). Narrow planes use 16 so that little work is wasted on padding.
constexpr int kWide = 64;
constexpr int kNarrow = 16;

struct Geometry {
  int64_t n, c, h, w;
  int k, pad;
};

Geometry geometry_of(const at::Tensor& x, const at::Tensor& weight) {
  const int k = static_cast<int>(weight.size(2));
  return {x.size(0), x.size(1), x.size(2), x.size(3), k, k / 2};
}

template <typename acc_t, typename scalar_t>
std::vector<acc_t> all_taps(const at::Tensor& weight_c, int k, bool constrained, double eps,
                            bool flip) {
  const int64_t channels = weight_c.size(0), kk = k * k;
  std::vector<acc_t> taps(channels * kk);
  const scalar_t* w = weight_c.data_ptr<scalar_t>();
  for (int64_t c = 0; c < channels; ++c)
    effective_taps<scalar_t, acc_t>(w + c * kk, k, constrained, static_cast<acc_t>(eps), flip,
                                    taps.data() + c * kk);
  return taps;
}

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

template <typename scalar_t, typename acc_t>
void fill_padded(const scalar_t* plane, const Geometry& g, const PaddedPlane& pp, acc_t* out) {
  std::fill(out, out + pp.size(), acc_t(0));
  for (int64_t i = 0; i < g.h; ++i) {
    acc_t* dst = out + (i + g.pad) * pp.stride + g.pad;
    const scalar_t* src = plane + i * g.w;
    for (int64_t j = 0; j < g.w; ++j) dst[j] = static_cast<acc_t>(src[j]);
  }
}

// One output plane: out[i][j] = sum_{a,b} taps[a,b] * padded[i + a][j + b]. Each block of VEC
// outputs is accumulated in registers over all k*k taps and stored once.
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

template <typename scalar_t, typename acc_t>
void correlate_plane(const acc_t* padded, const PaddedPlane& pp, const acc_t* taps,
                     const Geometry& g, scalar_t* out) {
  if (pp.vec == kWide)
    correlate_plane_vec<kWide>(padded, pp, taps, g, out);
  else
    correlate_plane_vec<kNarrow>(padded, pp, taps, g, out);
}

// dL/dw[a,b] = sum_{i,j} g[i][j] * x[i + a - pad][j + b - pad] over one plane, written to
// sums[k*k]. One tap at a time, so its VEC partial sums stay in registers over the whole plane.
// The last vector of a row stops at the row end: past it g's padding is zero, but 0 * inf in x
// would still make a NaN the reference does not have.
template <int VEC, typename acc_t>
void weight_grad_plane_vec(const acc_t* gpad, const acc_t* xpad, const PaddedPlane& pp,
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

template <typename acc_t>
std::vector<acc_t> transpose_taps(const std::vector<acc_t>& taps, int64_t channels, int kk) {
  std::vector<acc_t> out(taps.size());
  for (int64_t c = 0; c < channels; ++c)
    for (int t = 0; t < kk; ++t) out[t * channels + c] = taps[c * kk + t];
  return out;
}

// channels_last: channels [c0, c0 + CB) of output pixel (i, j), all taps accumulated in
// registers before one store.
template <int CB, typename scalar_t, typename acc_t>
inline void correlate_pixel_cl(const scalar_t* image, const acc_t* taps_t, const Geometry& g,
                               int64_t i, int64_t j, int64_t c0, scalar_t* dst) {
  acc_t acc[CB] = {};
  for (int a = 0; a < g.k; ++a) {
    const int64_t r = i + a - g.pad;
    if (r < 0 || r >= g.h) continue;
    for (int b = 0; b < g.k; ++b) {
      const int64_t q = j + b - g.pad;
      if (q < 0 || q >= g.w) continue;
      const scalar_t* src = image + (r * g.w + q) * g.c + c0;
      const acc_t* t = taps_t + (a * g.k + b) * g.c + c0;
      for (int cc = 0; cc < CB; ++cc) acc[cc] += t[cc] * static_cast<acc_t>(src[cc]);
    }
  }
  for (int cc = 0; cc < CB; ++cc) dst[cc] = static_cast<scalar_t>(acc[cc]);
}

// channels_last: PB neighbouring interior pixels (every tap inside the row, so no column checks)
// share each tap vector load: PB * CB accumulators stay in registers.
template <int CB, int PB, typename scalar_t, typename acc_t>
inline void correlate_pixels_cl(const scalar_t* image, const acc_t* taps_t, const Geometry& g,
                                int64_t i, int64_t j, int64_t c0, scalar_t* dst) {
  acc_t acc[PB][CB] = {};
  for (int a = 0; a < g.k; ++a) {
    const int64_t r = i + a - g.pad;
    if (r < 0 || r >= g.h) continue;
    for (int b = 0; b < g.k; ++b) {
      const scalar_t* src = image + (r * g.w + j + b - g.pad) * g.c + c0;
      const acc_t* t = taps_t + (a * g.k + b) * g.c + c0;
      for (int p = 0; p < PB; ++p) {
        const scalar_t* sp = src + p * g.c;
        for (int cc = 0; cc < CB; ++cc) acc[p][cc] += t[cc] * static_cast<acc_t>(sp[cc]);
      }
    }
  }
  for (int p = 0; p < PB; ++p)
    for (int cc = 0; cc < CB; ++cc) dst[p * g.c + cc] = static_cast<scalar_t>(acc[p][cc]);
}

// Channels [c0, c0 + CB) of one channels_last output row: interior pixels four at a time.
template <int CB, typename scalar_t, typename acc_t>
inline void correlate_row_block_cl(const scalar_t* image, const acc_t* taps_t, const Geometry& g,
                                   int64_t i, int64_t c0, scalar_t* out_row) {
  constexpr int PB = 4;
  const int64_t interior_end = g.w - g.pad;  // pixels j < interior_end with j >= pad need no checks
  int64_t j = 0;
  for (; j < g.w; ++j) {
    if (j >= g.pad && j + PB <= interior_end) {
      correlate_pixels_cl<CB, PB>(image, taps_t, g, i, j, c0, out_row + j * g.c + c0);
      j += PB - 1;
    } else {
      correlate_pixel_cl<CB>(image, taps_t, g, i, j, c0, out_row + j * g.c + c0);
    }
  }
}

// One channels_last output row (n, i): channel blocks of kWide, then kNarrow, then singles.
template <typename scalar_t, typename acc_t>
void correlate_row_cl(const scalar_t* image, const acc_t* taps_t, const Geometry& g, int64_t i,
                      scalar_t* out_row) {
  int64_t c0 = 0;
  for (; c0 + kWide <= g.c; c0 += kWide)
    correlate_row_block_cl<kWide>(image, taps_t, g, i, c0, out_row);
  for (; c0 + kNarrow <= g.c; c0 += kNarrow)
    correlate_row_block_cl<kNarrow>(image, taps_t, g, i, c0, out_row);
  for (; c0 < g.c; ++c0)
    for (int64_t j = 0; j < g.w; ++j)
      correlate_pixel_cl<1>(image, taps_t, g, i, j, c0, out_row + j * g.c + c0);
}

template <typename scalar_t>
void forward_nchw(const at::Tensor& x, const std::vector<at::opmath_type<scalar_t>>& taps,
                  const Geometry& g, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int kk = g.k * g.k;
  const PaddedPlane pp(g);
  at::parallel_for(0, g.n * g.c, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> padded(pp.size());
    for (int64_t p = begin; p < end; ++p) {
      fill_padded(xp + p * g.h * g.w, g, pp, padded.data());
      correlate_plane(padded.data(), pp, taps.data() + (p % g.c) * kk, g, yp + p * g.h * g.w);
    }
  });
}

template <typename scalar_t>
void forward_nhwc(const at::Tensor& x, const std::vector<at::opmath_type<scalar_t>>& taps,
                  const Geometry& g, at::Tensor& y) {
  const auto taps_t = transpose_taps(taps, g.c, g.k * g.k);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t row_len = g.w * g.c;
  at::parallel_for(0, g.n * g.h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q)
      correlate_row_cl(xp + (q / g.h) * g.h * row_len, taps_t.data(), g, q % g.h,
                       yp + q * row_len);
  });
}

// One pass per plane over padded copies of grad_out and x: the input gradient (correlation of
// grad_out with the mirrored filter) and this plane's k*k weight-gradient partial sums.
template <typename scalar_t>
void backward_nchw(const at::Tensor& gy, const at::Tensor& x,
                   const std::vector<at::opmath_type<scalar_t>>& flipped, const Geometry& g,
                   at::Tensor* gx, std::vector<at::opmath_type<scalar_t>>* partials) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* gp = gy.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* gxp = gx ? gx->data_ptr<scalar_t>() : nullptr;
  const int kk = g.k * g.k;
  const PaddedPlane pp(g);
  at::parallel_for(0, g.n * g.c, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gpad(pp.size()), xpad(partials ? pp.size() : 0);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t offset = p * g.h * g.w;
      fill_padded(gp + offset, g, pp, gpad.data());
      if (gxp) correlate_plane(gpad.data(), pp, flipped.data() + (p % g.c) * kk, g, gxp + offset);
      if (!partials) continue;
      fill_padded(xp + offset, g, pp, xpad.data());
      acc_t* part = partials->data() + p * kk;
      if (pp.vec == kWide)
        weight_grad_plane_vec<kWide>(gpad.data(), xpad.data(), pp, g, part);
      else
        weight_grad_plane_vec<kNarrow>(gpad.data(), xpad.data(), pp, g, part);
    }
  });
}

template <typename scalar_t>
void backward_nhwc(const at::Tensor& gy, const at::Tensor& x,
                   const std::vector<at::opmath_type<scalar_t>>& flipped, const Geometry& g,
                   at::Tensor* gx, std::vector<at::opmath_type<scalar_t>>* partials) {
  using acc_t = at::opmath_type<scalar_t>;
  const int kk = g.k * g.k;
  const auto flipped_t = transpose_taps(flipped, g.c, kk);
  const scalar_t* gp = gy.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* gxp = gx ? gx->data_ptr<scalar_t>() : nullptr;
  const int64_t row_len = g.w * g.c, rows = g.n * g.h;
  const int64_t chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      // Partials are laid out [chunk][tap][channel] so the inner loop runs over channels.
      acc_t* part = partials ? partials->data() + chunk * kk * g.c : nullptr;
      const int64_t q_end = std::min(rows, (chunk + 1) * kRowsPerChunk);
      for (int64_t q = chunk * kRowsPerChunk; q < q_end; ++q) {
        const int64_t n = q / g.h, i = q % g.h;
        const scalar_t* gimage = gp + n * g.h * row_len;
        const scalar_t* ximage = xp + n * g.h * row_len;
        if (gxp) correlate_row_cl(gimage, flipped_t.data(), g, i, gxp + q * row_len);
        if (!part) continue;
        const scalar_t* grow = gimage + i * row_len;
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
              for (int64_t c = 0; c < g.c; ++c)
                acc[c] += static_cast<acc_t>(gv[c]) * static_cast<acc_t>(xv[c]);
            }
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor mcs_conv_forward_cpu(const at::Tensor& x, const at::Tensor& weight, bool constrained,
                                double eps) {
  TORCH_CHECK(x.device().is_cpu(), "mcs_conv_forward_cpu: expected CPU tensors, got ",
              x.device());
  auto args = prepare_forward(x, weight, eps);
  if (args.y.numel() == 0) return args.y;
  const Geometry g = geometry_of(x, weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mcs_conv_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto taps = all_taps<acc_t, scalar_t>(args.weight, g.k, constrained, eps, false);
    if (args.layout == at::MemoryFormat::ChannelsLast)
      forward_nhwc<scalar_t>(args.x, taps, g, args.y);
    else
      forward_nchw<scalar_t>(args.x, taps, g, args.y);
  });
  return args.y;
}

std::tuple<at::Tensor, at::Tensor> mcs_conv_backward_cpu(const at::Tensor& grad_out,
                                                         const at::Tensor& x,
                                                         const at::Tensor& weight,
                                                         bool constrained, double eps,
                                                         bool need_x, bool need_weight) {
  TORCH_CHECK(x.device().is_cpu(), "mcs_conv_backward_cpu: expected CPU tensors, got ",
              x.device());
  auto args = prepare_backward(grad_out, x, weight, eps, need_x);
  const Geometry g = geometry_of(x, weight);
  if (x.numel() == 0 || (!need_x && !need_weight)) return {args.grad_x, args.grad_weight};
  const int kk = g.k * g.k;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mcs_conv_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto flipped = all_taps<acc_t, scalar_t>(args.weight, g.k, constrained, eps, true);
    const bool cl = args.layout == at::MemoryFormat::ChannelsLast;
    const int64_t n_partials = cl ? (g.n * g.h + kRowsPerChunk - 1) / kRowsPerChunk : g.n * g.c;
    std::vector<acc_t> partials(need_weight ? n_partials * kk * (cl ? g.c : 1) : 0, acc_t(0));
    auto* parts = need_weight ? &partials : nullptr;
    at::Tensor* gx = need_x ? &args.grad_x : nullptr;
    if (cl)
      backward_nhwc<scalar_t>(args.grad_out, args.x, flipped, g, gx, parts);
    else
      backward_nchw<scalar_t>(args.grad_out, args.x, flipped, g, gx, parts);
    if (!need_weight) return;
    // Fixed-order reduction of the partials into dL/dw_eff [C, k*k].
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    auto grad_eff = at::zeros({g.c, kk}, x.options().dtype(acc_dtype));
    acc_t* ge = grad_eff.data_ptr<acc_t>();
    for (int64_t p = 0; p < n_partials; ++p) {
      if (cl) {
        for (int t = 0; t < kk; ++t)
          for (int64_t c = 0; c < g.c; ++c) ge[c * kk + t] += partials[(p * kk + t) * g.c + c];
      } else {
        const int64_t c = p % g.c;  // plane p = (n, c): summed over n in increasing order
        for (int t = 0; t < kk; ++t) ge[c * kk + t] += partials[p * kk + t];
      }
    }
    args.grad_weight = constraint_backward(grad_eff, weight, constrained, eps);
  });
  return {args.grad_x, args.grad_weight};
}

}  // namespace sficonv
