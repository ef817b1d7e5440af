// MCSConv CPU entry points: forward, and a fused backward that produces the input gradient and
// the per-channel weight gradient in one pass over grad_out and x.
//
// The kernels live in mcs_conv_cpu_nchw.h (a plane at a time) and mcs_conv_cpu_channels_last.h
// (a row of pixels at a time, channels innermost); this file picks the layout, runs them in
// parallel with at::parallel_for over planes (NCHW) or fixed chunks of rows (channels_last),
// and reduces the weight gradient from fixed per-plane/per-chunk partials in a fixed order, so
// that it is bitwise deterministic whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "error_text.h"
#include "mcs_conv.h"
#include "mcs_conv_cpu_channels_last.h"
#include "mcs_conv_cpu_geometry.h"
#include "mcs_conv_cpu_nchw.h"

namespace sficonv {
namespace {

using cpu::Geometry;
namespace nchw = cpu::nchw;
namespace channels_last = cpu::channels_last;

// channels_last weight-gradient partials: a fixed blocking of rows, so that the reduction order
// (and the result, bit for bit) does not depend on the thread count.
constexpr int64_t kRowsPerChunk = 8;

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

// [C][k*k] -> [k*k][C]: the channels_last kernels read one tap's channels contiguously.
template <typename acc_t>
std::vector<acc_t> transpose_taps(const std::vector<acc_t>& taps, int64_t channels, int kk) {
  std::vector<acc_t> out(taps.size());
  for (int64_t c = 0; c < channels; ++c)
    for (int t = 0; t < kk; ++t) out[t * channels + c] = taps[c * kk + t];
  return out;
}

template <typename scalar_t>
void forward_nchw(const at::Tensor& x, const std::vector<at::opmath_type<scalar_t>>& taps,
                  const Geometry& g, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int kk = g.k * g.k;
  const nchw::PaddedPlane pp(g);
  at::parallel_for(0, g.n * g.c, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> padded(pp.size());  // zeros: fill_padded writes its interior only
    for (int64_t p = begin; p < end; ++p) {
      nchw::fill_padded(xp + p * g.h * g.w, g, pp, padded.data());
      nchw::correlate_plane(padded.data(), pp, taps.data() + (p % g.c) * kk, g,
                            yp + p * g.h * g.w);
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
      channels_last::correlate_row(xp + (q / g.h) * g.h * row_len, taps_t.data(), g, q % g.h,
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
  const nchw::PaddedPlane pp(g);
  at::parallel_for(0, g.n * g.c, 1, [&](int64_t begin, int64_t end) {
    // Zeroed once: fill_padded writes their interiors only, the padding stays zero.
    std::vector<acc_t> gpad(pp.size()), xpad(partials ? pp.size() : 0);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t offset = p * g.h * g.w;
      const bool grad_finite = nchw::fill_padded(gp + offset, g, pp, gpad.data());
      if (gxp)
        nchw::correlate_plane(gpad.data(), pp, flipped.data() + (p % g.c) * kk, g, gxp + offset);
      if (!partials) continue;
      nchw::fill_padded(xp + offset, g, pp, xpad.data());
      nchw::weight_grad_plane(gpad.data(), xpad.data(), pp, g, grad_finite,
                              partials->data() + p * kk);
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
        if (gxp) channels_last::correlate_row(gimage, flipped_t.data(), g, i, gxp + q * row_len);
        if (part) channels_last::weight_grad_row(gimage, ximage, g, i, part);
      }
    }
  });
}

// Whether a channels_last tensor runs the channels_last kernels. With fewer channels than one
// vector they would take their scalar path: at [8, 3, 256, 256] float32 (an RGB image into a
// learnable first layer) that forward took 14 ms against 0.66 ms for the NCHW kernel, so such
// tensors go through NCHW copies instead (the output keeps the input's layout).
template <typename acc_t>
bool runs_channels_last(at::MemoryFormat layout, const Geometry& g) {
  return layout == at::MemoryFormat::ChannelsLast && g.c >= cpu::Lanes<acc_t>::count;
}

}  // namespace

at::Tensor constraint_backward_cpu(const at::Tensor& grad_eff, const at::Tensor& weight,
                                   bool constrained, double eps) {
  const int64_t channels = weight.size(0);
  const int k = static_cast<int>(weight.size(2));
  const auto raw = weight.contiguous();
  auto grad_w = at::empty(weight.sizes(), weight.options());  // contiguous
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "mcs_conv_constraint_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_INTERNAL_ASSERT(grad_eff.scalar_type() == c10::CppTypeToScalarType<acc_t>::value &&
                          grad_eff.numel() == channels * k * k);
    const auto ge = grad_eff.contiguous();
    const acc_t* g = ge.data_ptr<acc_t>();
    const scalar_t* w = raw.data_ptr<scalar_t>();
    scalar_t* out = grad_w.data_ptr<scalar_t>();
    const int64_t kk = int64_t(k) * k;
    at::parallel_for(0, channels, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c)
        constraint_grad<scalar_t, acc_t>(g + c * kk, w + c * kk, k, constrained,
                                         static_cast<acc_t>(eps), out + c * kk);
    });
  });
  return grad_w;
}

at::Tensor mcs_conv_forward_cpu(const at::Tensor& x, const at::Tensor& weight, bool constrained,
                                double eps) {
  SFI_CHECK(x.device().is_cpu(), "mcs_conv_forward_cpu: expected CPU tensors, got ",
            x.device());
  auto args = prepare_forward(x, weight, eps);
  if (args.y.numel() == 0) return args.y;
  const Geometry g = geometry_of(x, weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mcs_conv_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto taps = all_taps<acc_t, scalar_t>(args.weight, g.k, constrained, eps, false);
    if (runs_channels_last<acc_t>(args.layout, g)) {
      forward_nhwc<scalar_t>(args.x, taps, g, args.y);
    } else if (args.layout == at::MemoryFormat::ChannelsLast) {
      at::Tensor y = at::empty(x.sizes(), x.options());
      forward_nchw<scalar_t>(args.x.contiguous(), taps, g, y);
      args.y.copy_(y);
    } else {
      forward_nchw<scalar_t>(args.x, taps, g, args.y);
    }
  });
  return args.y;
}

std::tuple<at::Tensor, at::Tensor> mcs_conv_backward_cpu(const at::Tensor& grad_out,
                                                         const at::Tensor& x,
                                                         const at::Tensor& weight,
                                                         bool constrained, double eps,
                                                         bool need_x, bool need_weight) {
  SFI_CHECK(x.device().is_cpu(), "mcs_conv_backward_cpu: expected CPU tensors, got ",
            x.device());
  auto args = prepare_backward(grad_out, x, weight, eps, need_x, need_weight);
  const Geometry g = geometry_of(x, weight);
  if (x.numel() == 0 || (!need_x && !need_weight)) return {args.grad_x, args.grad_weight};
  const int kk = g.k * g.k;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mcs_conv_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto flipped = all_taps<acc_t, scalar_t>(args.weight, g.k, constrained, eps, true);
    const bool cl = runs_channels_last<acc_t>(args.layout, g);
    const int64_t n_partials = cl ? (g.n * g.h + kRowsPerChunk - 1) / kRowsPerChunk : g.n * g.c;
    std::vector<acc_t> partials(need_weight ? n_partials * kk * (cl ? g.c : 1) : 0, acc_t(0));
    auto* parts = need_weight ? &partials : nullptr;
    at::Tensor* gx = need_x ? &args.grad_x : nullptr;
    if (cl) {
      backward_nhwc<scalar_t>(args.grad_out, args.x, flipped, g, gx, parts);
    } else if (args.layout == at::MemoryFormat::ChannelsLast) {  // see runs_channels_last
      at::Tensor grad_x = need_x ? at::empty(x.sizes(), x.options()) : at::Tensor();
      backward_nchw<scalar_t>(args.grad_out.contiguous(), args.x.contiguous(), flipped, g,
                              need_x ? &grad_x : nullptr, parts);
      if (need_x) args.grad_x.copy_(grad_x);
    } else {
      backward_nchw<scalar_t>(args.grad_out, args.x, flipped, g, gx, parts);
    }
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
    args.grad_weight = constraint_backward_cpu(grad_eff, weight, constrained, eps);
  });
  return {args.grad_x, args.grad_weight};
}

}  // namespace sficonv
