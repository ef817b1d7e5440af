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
constexpr int kVec = 16;              // outputs accumulated in registers at once (one AVX-512 vector)

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
  PaddedPlane(const Geometry& g)
      : rows(g.h + 2 * g.pad),
        stride((g.w + kVec - 1) / kVec * kVec + 2 * g.pad + kVec) {}
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

// One output plane: out[i][j] = sum_{a,b} taps[a,b] * padded[i + a][j + b]. Each block of kVec
// outputs is accumulated in registers over all k*k taps and stored once.
template <typename scalar_t, typename acc_t>
void correlate_plane(const acc_t* padded, const PaddedPlane& pp, const acc_t* taps,
                     const Geometry& g, scalar_t* out) {
  for (int64_t i = 0; i < g.h; ++i) {
    for (int64_t j0 = 0; j0 < g.w; j0 += kVec) {
      acc_t acc[kVec] = {};
      for (int a = 0; a < g.k; ++a) {
        const acc_t* src = padded + (i + a) * pp.stride + j0;
        for (int b = 0; b < g.k; ++b) {
          const acc_t t = taps[a * g.k + b];
          for (int jj = 0; jj < kVec; ++jj) acc[jj] += t * src[b + jj];
        }
      }
      const int64_t n = std::min<int64_t>(kVec, g.w - j0);
      scalar_t* dst = out + i * g.w + j0;
      for (int64_t jj = 0; jj < n; ++jj) dst[jj] = static_cast<scalar_t>(acc[jj]);
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

// channels_last output row (n, i): per pixel and block of kVec channels, all taps in registers.
template <typename scalar_t, typename acc_t>
void correlate_row_cl(const scalar_t* image, const acc_t* taps_t, const Geometry& g, int64_t i,
                      scalar_t* out_row) {
  const int64_t C = g.c;
  for (int64_t j = 0; j < g.w; ++j) {
    for (int64_t c0 = 0; c0 < C; c0 += kVec) {
      const int64_t cn = std::min<int64_t>(kVec, C - c0);
      acc_t acc[kVec] = {};
      for (int a = 0; a < g.k; ++a) {
        const int64_t r = i + a - g.pad;
        if (r < 0 || r >= g.h) continue;
        for (int b = 0; b < g.k; ++b) {
          const int64_t q = j + b - g.pad;
          if (q < 0 || q >= g.w) continue;
          const scalar_t* src = image + (r * g.w + q) * C + c0;
          const acc_t* t = taps_t + (a * g.k + b) * C + c0;
          if (cn == kVec) {
            for (int cc = 0; cc < kVec; ++cc) acc[cc] += t[cc] * static_cast<acc_t>(src[cc]);
          } else {
            for (int64_t cc = 0; cc < cn; ++cc) acc[cc] += t[cc] * static_cast<acc_t>(src[cc]);
          }
        }
      }
      scalar_t* dst = out_row + j * C + c0;
      for (int64_t cc = 0; cc < cn; ++cc) dst[cc] = static_cast<scalar_t>(acc[cc]);
    }
  }
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
    std::vector<acc_t> gpad(pp.size()), xpad(partials ? pp.size() : 0), lanes(kk * kVec);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t offset = p * g.h * g.w;
      fill_padded(gp + offset, g, pp, gpad.data());
      if (gxp) correlate_plane(gpad.data(), pp, flipped.data() + (p % g.c) * kk, g, gxp + offset);
      if (!partials) continue;
      fill_padded(xp + offset, g, pp, xpad.data());
      // dL/dw[a,b] = sum_{i,j} g[i][j] * x[i + a - pad][j + b - pad]; g's padding is zero, so
      // whole vectors can run past the row end.
      std::fill(lanes.begin(), lanes.end(), acc_t(0));
      for (int64_t i = 0; i < g.h; ++i) {
        for (int64_t j0 = 0; j0 < g.w; j0 += kVec) {
          const acc_t* gv = gpad.data() + (i + g.pad) * pp.stride + g.pad + j0;
          for (int a = 0; a < g.k; ++a) {
            const acc_t* xrow = xpad.data() + (i + a) * pp.stride + j0;
            for (int b = 0; b < g.k; ++b) {
              acc_t* lane = lanes.data() + (a * g.k + b) * kVec;
              for (int jj = 0; jj < kVec; ++jj) lane[jj] += gv[jj] * xrow[b + jj];
            }
          }
        }
      }
      acc_t* part = partials->data() + p * kk;
      for (int t = 0; t < kk; ++t) {
        acc_t sum = 0;
        for (int jj = 0; jj < kVec; ++jj) sum += lanes[t * kVec + jj];
        part[t] = sum;
      }
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

at::MemoryFormat layout_of(const at::Tensor& x) {
  // channels_last only when it is really laid out so; anything else is made NCHW-contiguous.
  return (x.size(1) > 1 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous())
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

}  // namespace

at::Tensor mcs_conv_forward_cpu(const at::Tensor& x, const at::Tensor& weight, bool constrained,
                                double eps) {
  check_inputs(x, weight, eps);
  TORCH_CHECK(x.device().is_cpu(), "mcs_conv_forward_cpu: expected CPU tensors");
  const auto fmt = layout_of(x);
  const auto xc = x.contiguous(fmt);
  const auto wc = weight.contiguous();
  auto y = at::empty(x.sizes(), x.options().memory_format(fmt));
  if (y.numel() == 0) return y;
  const Geometry g = geometry_of(x, weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mcs_conv_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto taps = all_taps<acc_t, scalar_t>(wc, g.k, constrained, eps, /*flip=*/false);
    if (fmt == at::MemoryFormat::ChannelsLast)
      forward_nhwc<scalar_t>(xc, taps, g, y);
    else
      forward_nchw<scalar_t>(xc, taps, g, y);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> mcs_conv_backward_cpu(const at::Tensor& grad_out,
                                                         const at::Tensor& x,
                                                         const at::Tensor& weight,
                                                         bool constrained, double eps,
                                                         bool need_x, bool need_weight) {
  check_inputs(x, weight, eps);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "mcs_conv_backward: grad_out has shape ",
              grad_out.sizes(), " but x has shape ", x.sizes());
  const auto fmt = layout_of(x);
  const auto xc = x.contiguous(fmt);
  const auto gc = grad_out.to(x.scalar_type()).contiguous(fmt);
  const auto wc = weight.contiguous();
  at::Tensor gx = need_x ? at::empty(x.sizes(), x.options().memory_format(fmt))
                         : at::zeros(x.sizes(), x.options().memory_format(fmt));
  at::Tensor gw = at::zeros(weight.sizes(), weight.options());
  const Geometry g = geometry_of(x, weight);
  if (x.numel() == 0 || (!need_x && !need_weight)) return {gx, gw};
  const int kk = g.k * g.k;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mcs_conv_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto flipped = all_taps<acc_t, scalar_t>(wc, g.k, constrained, eps, /*flip=*/true);
    const bool cl = fmt == at::MemoryFormat::ChannelsLast;
    const int64_t n_partials = cl ? (g.n * g.h + kRowsPerChunk - 1) / kRowsPerChunk : g.n * g.c;
    std::vector<acc_t> partials(need_weight ? n_partials * kk * (cl ? g.c : 1) : 0, acc_t(0));
    auto* parts = need_weight ? &partials : nullptr;
    if (cl)
      backward_nhwc<scalar_t>(gc, xc, flipped, g, need_x ? &gx : nullptr, parts);
    else
      backward_nchw<scalar_t>(gc, xc, flipped, g, need_x ? &gx : nullptr, parts);
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
    gw = constraint_backward(grad_eff, weight, constrained, eps);
  });
  return {gx, gw};
}

}  // namespace sficonv
