// Training-mode BatchNorm + residual add + ReLU on the CPU, forward and backward.
//
// Unfused, ATen's BatchNorm reads x twice and writes y, the add reads y and the residual and
// writes y, ReLU reads and writes y; backward adds a threshold_backward pass and a fresh
// gradient tensor before BatchNorm's own two passes. Here forward is one statistics pass and one
// apply pass (read x and the residual, write y once); backward is one reduction pass (which
// writes the residual's gradient, the ReLU-masked grad_y) and one apply pass.
//
// Outputs of 31 MiB or more come from the kernel pool (cpu_scratch.h): glibc maps such blocks
// afresh on every call, and page-faulting them in cost more than the passes themselves (on
// the 2-core Xeon, backward with a residual at [8, 256, 64, 64]: 20.4 ms, 7.7 ms pooled).
//
// Work is split into fixed chunks: in channels_last a block of whole pixels (rows of C values,
// inner loops along the channels), in NCHW one (n, c) plane (inner loops along the plane).
// Each chunk writes its own per-channel partial sums, combined afterwards in double in chunk
// order, so results are bitwise the same whatever the thread count. Statistics are per-chunk
// means and centred sums of squares (Chan's combination): no E[x^2] - E[x]^2 cancellation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_scratch.h"
#include "error_text.h"
#include "mcs_conv.h"  // kernel_layout
#include "norm_act.h"

namespace sficonv {
namespace {

constexpr int64_t kChunkValues = 16384;  // about 64 KB of float32 per chunk: stays in L2
constexpr int kLanes = 16;               // independent partial sums in a plane reduction

// The tensor as chunks. Partial sums are [chunks()][c] in both layouts (in NCHW chunk k is
// image k, whose c planes are reduced separately), so one combine serves both.
struct Chunking {
  bool cl;
  int64_t n, c, hw, rows_per_chunk;

  Chunking(const at::Tensor& x, bool channels_last)
      : cl(channels_last), n(x.size(0)), c(x.size(1)), hw(x.size(2) * x.size(3)),
        rows_per_chunk(std::max<int64_t>(16, kChunkValues / std::max<int64_t>(c, 1))) {}
  int64_t rows() const { return n * hw; }  // values per channel
  int64_t chunks() const { return cl ? (rows() + rows_per_chunk - 1) / rows_per_chunk : n; }
  int64_t count(int64_t k) const {
    return cl ? std::min(rows_per_chunk, rows() - k * rows_per_chunk) : hw;
  }

  // cl: fn(first_row, rows, chunk); NCHW: plane_fn(plane_offset, channel, chunk) per (n, c).
  template <typename RowsFn, typename PlaneFn>
  void parallel(RowsFn rows_fn, PlaneFn plane_fn) const {
    if (cl) {
      at::parallel_for(0, chunks(), 1, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) rows_fn(k * rows_per_chunk, count(k), k);
      });
    } else {
      at::parallel_for(0, n * c, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) plane_fn(p * hw, p % c, p / c);
      });
    }
  }
};

// The gradient reaching BatchNorm's output: grad_y, zeroed where the ReLU output is <= 0. As in
// torch's threshold_backward, a NaN output is not <= 0 and passes its gradient on.
template <typename acc_t, typename scalar_t, bool RELU>
inline acc_t masked(scalar_t g, scalar_t y) {
  if (!RELU) return static_cast<acc_t>(g);
  return static_cast<acc_t>(y) <= acc_t(0) ? acc_t(0) : static_cast<acc_t>(g);
}

// ---- channels_last: one pixel row of C values per call; per-channel arrays run alongside.
// __restrict__ tells the compiler the rows do not overlap, so the loops vectorise without
// runtime alias checks.

// A chunk's first value as the pivot of its moments: a float32 sum of values with a large mean
// relative to their spread (x = 1000 + noise) lost the mean's low bits, and the variance came
// out 20-50x less accurate than PyTorch's (which sums in double). Differences of nearby values
// are exact, and the sums are handed on in double. An infinite value is no pivot (inf - inf
// would turn the channel's mean from inf into NaN).
template <typename acc_t, typename scalar_t>
inline acc_t pivot_of(scalar_t first) {
  const acc_t v = static_cast<acc_t>(first);
  return std::isfinite(v) ? v : acc_t(0);
}

// Moments are taken of x - pivot (see pivot_of): the sums stay small, and the mean's offset
// from the pivot keeps the low bits a float mean near a large value would lose.
template <typename scalar_t, typename acc_t>
inline void row_sum(const scalar_t* __restrict__ x, const acc_t* __restrict__ pivot,
                    acc_t* __restrict__ sum, int64_t C) {
  for (int64_t c = 0; c < C; ++c) sum[c] += static_cast<acc_t>(x[c]) - pivot[c];
}

template <typename scalar_t, typename acc_t>
inline void row_centred_squares(const scalar_t* __restrict__ x, const acc_t* __restrict__ pivot,
                                const acc_t* __restrict__ offset, acc_t* __restrict__ m2,
                                int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t d = (static_cast<acc_t>(x[c]) - pivot[c]) - offset[c];
    m2[c] += d * d;
  }
}

template <typename scalar_t, typename acc_t, bool RESIDUAL, bool RELU>
inline void row_apply(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                      const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                      scalar_t* __restrict__ y, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    acc_t v = static_cast<acc_t>(x[c]) * scale[c] + shift[c];
    if (RESIDUAL) v += static_cast<acc_t>(res[c]);
    if (RELU) v = std::max(v, acc_t(0));  // NaN stays NaN, as in torch.relu
    y[c] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, typename acc_t, bool RELU, bool RESIDUAL>
inline void row_grad_sums(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                          const scalar_t* __restrict__ x, const acc_t* __restrict__ mean,
                          acc_t* __restrict__ sum_dz, acc_t* __restrict__ sum_dzx,
                          scalar_t* __restrict__ dres, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t dz = masked<acc_t, scalar_t, RELU>(g[c], y[c]);
    sum_dz[c] += dz;
    sum_dzx[c] += dz * (static_cast<acc_t>(x[c]) - mean[c]);
    if (RESIDUAL) dres[c] = static_cast<scalar_t>(dz);
  }
}

// dz comes from dres when it was written (already masked), else from grad_y and y.
template <typename scalar_t, typename acc_t, bool RELU, bool FROM_DRES>
inline void row_grad_apply(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                           const scalar_t* __restrict__ dres, const scalar_t* __restrict__ x,
                           const acc_t* __restrict__ mean, const acc_t* __restrict__ k_dz,
                           const acc_t* __restrict__ k_x, const acc_t* __restrict__ k_0,
                           scalar_t* __restrict__ dx, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t dz = FROM_DRES ? static_cast<acc_t>(dres[c])
                               : masked<acc_t, scalar_t, RELU>(g[c], y[c]);
    dx[c] = static_cast<scalar_t>(k_dz[c] * dz + k_x[c] * (static_cast<acc_t>(x[c]) - mean[c]) +
                                  k_0[c]);
  }
}

// ---- NCHW: one plane (HW values of one channel) per call, with the channel's scalars.
// Reductions keep kLanes independent partial sums (one accumulator would not vectorise: the
// compiler may not reorder floating-point additions).

template <typename scalar_t, typename acc_t>
void plane_moments(const scalar_t* __restrict__ x, int64_t len, double* sum, acc_t* m2) {
  const acc_t pivot = pivot_of<acc_t>(x[0]);
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<acc_t>(x[i + l]) - pivot;
  acc_t s = 0;
  for (; i < len; ++i) s += static_cast<acc_t>(x[i]) - pivot;
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  const acc_t offset = s / static_cast<acc_t>(len);  // mean - pivot
  acc_t sq[kLanes] = {};
  for (i = 0; i + kLanes <= len; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const acc_t d = (static_cast<acc_t>(x[i + l]) - pivot) - offset;
      sq[l] += d * d;
    }
  acc_t q = 0;
  for (; i < len; ++i) {
    const acc_t d = (static_cast<acc_t>(x[i]) - pivot) - offset;
    q += d * d;
  }
  for (int l = 0; l < kLanes; ++l) q += sq[l];
  *sum = static_cast<double>(pivot) * static_cast<double>(len) + static_cast<double>(s);
  *m2 = q;
}

template <typename scalar_t, typename acc_t, bool RESIDUAL, bool RELU>
void plane_apply(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res, acc_t scale,
                 acc_t shift, scalar_t* __restrict__ y, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    acc_t v = static_cast<acc_t>(x[i]) * scale + shift;
    if (RESIDUAL) v += static_cast<acc_t>(res[i]);
    if (RELU) v = std::max(v, acc_t(0));
    y[i] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, typename acc_t, bool RELU, bool RESIDUAL>
void plane_grad_sums(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                     const scalar_t* __restrict__ x, acc_t mean, scalar_t* __restrict__ dres,
                     int64_t len, acc_t* sum_dz, acc_t* sum_dzx) {
  acc_t lanes_dz[kLanes] = {}, lanes_dzx[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const acc_t dz = masked<acc_t, scalar_t, RELU>(g[i + l], y[i + l]);
      lanes_dz[l] += dz;
      lanes_dzx[l] += dz * (static_cast<acc_t>(x[i + l]) - mean);
      if (RESIDUAL) dres[i + l] = static_cast<scalar_t>(dz);
    }
  acc_t total_dz = 0, total_dzx = 0;
  for (; i < len; ++i) {
    const acc_t dz = masked<acc_t, scalar_t, RELU>(g[i], y[i]);
    total_dz += dz;
    total_dzx += dz * (static_cast<acc_t>(x[i]) - mean);
    if (RESIDUAL) dres[i] = static_cast<scalar_t>(dz);
  }
  for (int l = 0; l < kLanes; ++l) {
    total_dz += lanes_dz[l];
    total_dzx += lanes_dzx[l];
  }
  *sum_dz = total_dz;
  *sum_dzx = total_dzx;
}

template <typename scalar_t, typename acc_t, bool RELU, bool FROM_DRES>
void plane_grad_apply(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                      const scalar_t* __restrict__ dres, const scalar_t* __restrict__ x,
                      acc_t mean, acc_t k_dz, acc_t k_x, acc_t k_0, scalar_t* __restrict__ dx,
                      int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    const acc_t dz = FROM_DRES ? static_cast<acc_t>(dres[i])
                               : masked<acc_t, scalar_t, RELU>(g[i], y[i]);
    dx[i] = static_cast<scalar_t>(k_dz * dz + k_x * (static_cast<acc_t>(x[i]) - mean) + k_0);
  }
}

// ---- The passes: chunks in parallel, each writing its own slice of the partial sums.

// Per-chunk sums and centred sums of squares of x, written to sum[k][c] and m2[k][c].
template <typename scalar_t, typename acc_t>
void chunk_moments(const Chunking& ch, const scalar_t* x, double* sum, acc_t* m2) {
  const int64_t C = ch.c;
  ch.parallel(
      [&](int64_t row0, int64_t rows, int64_t k) {
        std::vector<acc_t> s(C, acc_t(0)), pivot(C), offset(C);
        acc_t* q = m2 + k * C;
        std::fill(q, q + C, acc_t(0));
        for (int64_t c = 0; c < C; ++c) pivot[c] = pivot_of<acc_t>(x[row0 * C + c]);
        for (int64_t r = row0; r < row0 + rows; ++r)
          row_sum(x + r * C, pivot.data(), s.data(), C);
        for (int64_t c = 0; c < C; ++c) {
          offset[c] = s[c] / static_cast<acc_t>(rows);
          sum[k * C + c] = static_cast<double>(pivot[c]) * static_cast<double>(rows) +
                           static_cast<double>(s[c]);
        }
        for (int64_t r = row0; r < row0 + rows; ++r)
          row_centred_squares(x + r * C, pivot.data(), offset.data(), q, C);
      },
      [&](int64_t offset, int64_t c, int64_t k) {
        plane_moments(x + offset, ch.hw, sum + k * C + c, m2 + k * C + c);
      });
}

// Chan's combination of the chunk moments, in chunk order: the batch mean and biased variance.
template <typename acc_t>
void combine_moments(const Chunking& ch, const double* sum, const acc_t* m2, double* mean,
                     double* var) {
  const int64_t C = ch.c, K = ch.chunks();
  const double total = static_cast<double>(ch.rows());
  std::vector<double> centred(C, 0.0);
  std::fill(mean, mean + C, 0.0);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < C; ++c) mean[c] += sum[k * C + c];
  for (int64_t c = 0; c < C; ++c) mean[c] /= total;
  for (int64_t k = 0; k < K; ++k) {
    const double count = static_cast<double>(ch.count(k));
    for (int64_t c = 0; c < C; ++c) {
      const double d = sum[k * C + c] / count - mean[c];
      centred[c] += static_cast<double>(m2[k * C + c]) + count * d * d;
    }
  }
  for (int64_t c = 0; c < C; ++c) var[c] = centred[c] / total;
}

// y = [relu](x * scale[c] + shift[c] [+ residual]).
template <typename scalar_t, typename acc_t, bool RESIDUAL, bool RELU>
void apply_forward(const Chunking& ch, const scalar_t* x, const scalar_t* res,
                   const acc_t* scale, const acc_t* shift, scalar_t* y) {
  const int64_t C = ch.c;
  ch.parallel(
      [&](int64_t row0, int64_t rows, int64_t) {
        for (int64_t r = row0; r < row0 + rows; ++r)
          row_apply<scalar_t, acc_t, RESIDUAL, RELU>(x + r * C, RESIDUAL ? res + r * C : nullptr,
                                                     scale, shift, y + r * C, C);
      },
      [&](int64_t offset, int64_t c, int64_t) {
        plane_apply<scalar_t, acc_t, RESIDUAL, RELU>(x + offset,
                                                     RESIDUAL ? res + offset : nullptr, scale[c],
                                                     shift[c], y + offset, ch.hw);
      });
}

// Per-chunk sum(dz) and sum(dz * (x - mean)); with a residual, also writes dres = dz.
template <typename scalar_t, typename acc_t, bool RELU, bool RESIDUAL>
void chunk_grad_sums(const Chunking& ch, const scalar_t* g, const scalar_t* y, const scalar_t* x,
                     const acc_t* mean, acc_t* sum_dz, acc_t* sum_dzx, scalar_t* dres) {
  const int64_t C = ch.c;
  ch.parallel(
      [&](int64_t row0, int64_t rows, int64_t k) {
        acc_t* sd = sum_dz + k * C;
        acc_t* sx = sum_dzx + k * C;
        std::fill(sd, sd + C, acc_t(0));
        std::fill(sx, sx + C, acc_t(0));
        for (int64_t r = row0; r < row0 + rows; ++r)
          row_grad_sums<scalar_t, acc_t, RELU, RESIDUAL>(g + r * C, y + r * C, x + r * C, mean,
                                                         sd, sx,
                                                         RESIDUAL ? dres + r * C : nullptr, C);
      },
      [&](int64_t offset, int64_t c, int64_t k) {
        plane_grad_sums<scalar_t, acc_t, RELU, RESIDUAL>(
            g + offset, y + offset, x + offset, mean[c], RESIDUAL ? dres + offset : nullptr,
            ch.hw, sum_dz + k * C + c, sum_dzx + k * C + c);
      });
}

// dx = k_dz[c] * dz + k_x[c] * (x - mean[c]) + k_0[c].
template <typename scalar_t, typename acc_t, bool RELU, bool FROM_DRES>
void apply_backward(const Chunking& ch, const scalar_t* g, const scalar_t* y, const scalar_t* x,
                    const scalar_t* dres, const acc_t* mean, const acc_t* k_dz, const acc_t* k_x,
                    const acc_t* k_0, scalar_t* dx) {
  const int64_t C = ch.c;
  ch.parallel(
      [&](int64_t row0, int64_t rows, int64_t) {
        for (int64_t r = row0; r < row0 + rows; ++r)
          row_grad_apply<scalar_t, acc_t, RELU, FROM_DRES>(
              g + r * C, y + r * C, FROM_DRES ? dres + r * C : nullptr, x + r * C, mean, k_dz,
              k_x, k_0, dx + r * C, C);
      },
      [&](int64_t offset, int64_t c, int64_t) {
        plane_grad_apply<scalar_t, acc_t, RELU, FROM_DRES>(
            g + offset, y + offset, FROM_DRES ? dres + offset : nullptr, x + offset, mean[c],
            k_dz[c], k_x[c], k_0[c], dx + offset, ch.hw);
      });
}

// Calls fn with the two flags as compile-time constants (branch-free inner loops).
template <typename Fn>
void with_flags(bool a, bool b, Fn fn) {
  if (a && b) fn(std::true_type{}, std::true_type{});
  else if (a) fn(std::true_type{}, std::false_type{});
  else if (b) fn(std::false_type{}, std::true_type{});
  else fn(std::false_type{}, std::false_type{});
}

void check_common(const at::Tensor& x, const at::Tensor& weight, double eps, const char* op) {
  SFI_CHECK(x.device().is_cpu(), op, ": expected CPU tensors, got ", x.device());
  SFI_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got shape ", x.sizes());
  // The four the kernels are built for (isFloatingType also admits the Float8 types).
  const auto dtype = x.scalar_type();
  SFI_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                dtype == at::kBFloat16,
            op, ": expected a floating dtype (float32, float64, float16 or bfloat16), got ",
            dtype);
  SFI_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), op, ": weight must be [",
            x.size(1), "], got shape ", weight.sizes());
  SFI_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(),
            " but x is on ", x.device());
  // As F.batch_norm in training: eps = 0 turns a constant channel into inf - inf = NaN.
  SFI_CHECK(eps > 0, op, ": eps must be positive, got ", eps);
  SFI_CHECK(x.numel() / std::max<int64_t>(x.size(1), 1) > 1, op,
            ": expected more than 1 value per channel when training, got input size ",
            x.sizes());
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name, const char* op) {
  SFI_CHECK(t.sizes() == x.sizes(), op, ": ", name, " has shape ", t.sizes(),
            " but x has shape ", x.sizes());
  SFI_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " is ", t.scalar_type(),
            " but x is ", x.scalar_type());
  SFI_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
            " but x is on ", x.device());
}

std::vector<double> as_doubles(const at::Tensor& t) {
  auto d = t.detach().to(at::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

template <typename acc_t>
std::vector<acc_t> narrowed(const std::vector<double>& v) {
  return std::vector<acc_t>(v.begin(), v.end());
}

at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_forward_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& residual_in, bool relu, double eps) {
  const char* op = "batch_norm_act_forward";
  check_common(x_in, weight, eps, op);
  SFI_CHECK(bias.dim() == 1 && bias.size(0) == x_in.size(1), op, ": bias must be [",
            x_in.size(1), "], got shape ", bias.sizes());
  const bool has_res = residual_in.has_value() && residual_in->defined();
  if (has_res) check_like(*residual_in, x_in, "residual", op);
  const auto layout = kernel_layout(x_in);
  const auto x = x_in.contiguous(layout);
  const auto res = has_res ? residual_in->contiguous(layout) : at::Tensor();
  auto y = output_empty(x.sizes(), x.options(), layout);
  const Chunking ch(x, layout == at::MemoryFormat::ChannelsLast);
  const int64_t C = ch.c;
  std::vector<double> mean(C), var(C);
  const auto w = as_doubles(weight), b = as_doubles(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<double> sum(ch.chunks() * C);
    std::vector<acc_t> m2(ch.chunks() * C);
    chunk_moments<scalar_t, acc_t>(ch, x.data_ptr<scalar_t>(), sum.data(), m2.data());
    combine_moments<acc_t>(ch, sum.data(), m2.data(), mean.data(), var.data());
    std::vector<acc_t> scale(C), shift(C);
    for (int64_t c = 0; c < C; ++c) {
      const double s = w[c] / std::sqrt(var[c] + eps);
      scale[c] = static_cast<acc_t>(s);
      shift[c] = static_cast<acc_t>(b[c] - mean[c] * s);
    }
    with_flags(has_res, relu, [&](auto with_res, auto with_relu) {
      apply_forward<scalar_t, acc_t, decltype(with_res)::value, decltype(with_relu)::value>(
          ch, x.data_ptr<scalar_t>(), has_res ? res.data_ptr<scalar_t>() : nullptr,
          scale.data(), shift.data(), y.data_ptr<scalar_t>());
    });
  });
  const auto stats_options = x.options().dtype(acc_dtype(x.scalar_type()));
  auto mean_t = at::tensor(mean, x.options().dtype(at::kDouble)).to(stats_options);
  auto var_t = at::tensor(var, x.options().dtype(at::kDouble)).to(stats_options);
  return {y, mean_t, var_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& y_in,
    const at::Tensor& weight, const at::Tensor& mean_in, const at::Tensor& var_in,
    bool has_residual, bool relu, double eps) {
  const char* op = "batch_norm_act_backward";
  check_common(x_in, weight, eps, op);
  SFI_CHECK(grad_y_in.sizes() == x_in.sizes() && grad_y_in.device() == x_in.device(), op,
            ": grad_y has shape ", grad_y_in.sizes(), " on ", grad_y_in.device(),
            ", expected ", x_in.sizes(), " on ", x_in.device());
  check_like(y_in, x_in, "y", op);
  SFI_CHECK(mean_in.numel() == x_in.size(1) && var_in.numel() == x_in.size(1), op,
            ": mean and var must have ", x_in.size(1), " values");
  const auto layout = kernel_layout(x_in);
  const auto x = x_in.contiguous(layout);
  const auto y = y_in.contiguous(layout);
  const auto g = grad_y_in.to(x.scalar_type()).contiguous(layout);
  auto dx = output_empty(x.sizes(), x.options(), layout);
  auto dres = has_residual ? output_empty(x.sizes(), x.options(), layout)
                          : at::empty({0}, x.options());
  const Chunking ch(x, layout == at::MemoryFormat::ChannelsLast);
  const int64_t C = ch.c;
  const auto mean = as_doubles(mean_in), var = as_doubles(var_in), w = as_doubles(weight);
  std::vector<double> grad_w(C), grad_b(C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto mean_acc = narrowed<acc_t>(mean);
    std::vector<acc_t> sum_dz(ch.chunks() * C), sum_dzx(ch.chunks() * C);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* dp = has_residual ? dres.data_ptr<scalar_t>() : nullptr;
    with_flags(relu, has_residual, [&](auto with_relu, auto with_res) {
      chunk_grad_sums<scalar_t, acc_t, decltype(with_relu)::value, decltype(with_res)::value>(
          ch, gp, yp, xp, mean_acc.data(), sum_dz.data(), sum_dzx.data(), dp);
    });
    // Fixed-order totals (chunk-major: the partials are read in memory order), then
    // dx = w*invstd * (dz - mean(dz) - xhat * mean(dz * xhat)).
    std::vector<double> sd(C, 0.0), sx(C, 0.0);
    for (int64_t k = 0; k < ch.chunks(); ++k)
      for (int64_t c = 0; c < C; ++c) {
        sd[c] += static_cast<double>(sum_dz[k * C + c]);
        sx[c] += static_cast<double>(sum_dzx[k * C + c]);
      }
    const double total = static_cast<double>(ch.rows());
    std::vector<acc_t> k_dz(C), k_x(C), k_0(C);
    for (int64_t c = 0; c < C; ++c) {
      const double invstd = 1.0 / std::sqrt(var[c] + eps);
      const double k1 = w[c] * invstd;
      k_dz[c] = static_cast<acc_t>(k1);
      k_x[c] = static_cast<acc_t>(-k1 * sx[c] * invstd * invstd / total);
      k_0[c] = static_cast<acc_t>(-k1 * sd[c] / total);
      grad_w[c] = sx[c] * invstd;
      grad_b[c] = sd[c];
    }
    with_flags(relu, has_residual, [&](auto with_relu, auto from_dres) {
      apply_backward<scalar_t, acc_t, decltype(with_relu)::value, decltype(from_dres)::value>(
          ch, gp, yp, xp, dp, mean_acc.data(), k_dz.data(), k_x.data(), k_0.data(),
          dx.data_ptr<scalar_t>());
    });
  });
  const auto double_options = weight.options().dtype(at::kDouble);
  return {dx, at::tensor(grad_w, double_options).to(weight.scalar_type()),
          at::tensor(grad_b, double_options).to(weight.scalar_type()), dres};
}

}  // namespace sficonv
