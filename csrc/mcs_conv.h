// MCSConv: constrained depthwise k x k convolution, stride 1, padding k/2, no bias.
// Declarations shared by the CPU and CUDA kernels, and the index/constraint math both use.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#if defined(__CUDACC__)
#define SFI_HOST_DEVICE __host__ __device__
#else
#define SFI_HOST_DEVICE
#endif

namespace sficonv {

// |S| clamped to at least eps keeping its sign; S == 0 counts as positive (SPEC section 1).
template <typename acc_t>
SFI_HOST_DEVICE inline acc_t clamp_sum(acc_t s, acc_t eps) {
  if (s >= acc_t(0)) return s < eps ? eps : s;
  return s > -eps ? -eps : s;
}

// The filter forward applies, for one channel: `raw` holds k*k taps (row-major). Constrained:
// off-centre taps divided by their clamped sum, centre -1. Unconstrained: the raw taps.
// `flip` mirrors the filter (the input gradient is a convolution with the mirrored filter).
template <typename scalar_t, typename acc_t>
SFI_HOST_DEVICE inline void effective_taps(const scalar_t* raw, int k, bool constrained,
                                           acc_t eps, bool flip, acc_t* out) {
  const int kk = k * k, centre = kk / 2;
  acc_t scale = acc_t(1);
  if (constrained) {
    acc_t s = acc_t(0);
    for (int t = 0; t < kk; ++t)
      if (t != centre) s += static_cast<acc_t>(raw[t]);
    scale = clamp_sum(s, eps);
  }
  for (int t = 0; t < kk; ++t) {
    acc_t v = (constrained && t == centre) ? acc_t(-1)
                                           : (constrained ? static_cast<acc_t>(raw[t]) / scale
                                                          : static_cast<acc_t>(raw[t]));
    out[flip ? kk - 1 - t : t] = v;
  }
}

// The chain rule through the constraint for one channel: dL/d(raw taps) `out` (k*k, the
// weight's dtype) from dL/d(effective taps) `grad_eff` (k*k, the accumulation type), in one
// pass over the taps, on the host or the device (CUDA runs it one thread per channel: one launch
// where a chain of small tensor ops took about twenty). Constrained, w_eff[t] = w[t] / S'
// (t != centre) with S' = clamp_sum(S), so dL/dw[t] = g[t] / S' - <g, w> / S'^2, the second term
// only where |S| >= eps (the clamp passes no gradient to S below it), and dL/dw[centre] = 0.
// The centre is skipped, never multiplied by 0: an inf or NaN raw centre tap (never used) or a
// NaN in the centre's incoming gradient must not reach the other taps (inf * 0 is NaN), as in
// the reference. A NaN sum S propagates to every off-centre tap. Unconstrained: `grad_eff`.
template <typename scalar_t, typename acc_t>
SFI_HOST_DEVICE inline void constraint_grad(const acc_t* grad_eff, const scalar_t* raw, int k,
                                            bool constrained, acc_t eps, scalar_t* out) {
  const int kk = k * k, centre = kk / 2;
  if (!constrained) {
    for (int t = 0; t < kk; ++t) out[t] = static_cast<scalar_t>(grad_eff[t]);
    return;
  }
  acc_t s = acc_t(0), dot = acc_t(0);
  for (int t = 0; t < kk; ++t) {
    if (t == centre) continue;
    const acc_t w = static_cast<acc_t>(raw[t]);
    s += w;
    dot += grad_eff[t] * w;
  }
  const acc_t scale = clamp_sum(s, eps);
  const bool passes = s >= eps || s <= -eps;
  const acc_t through = passes ? dot / (scale * scale) : acc_t(0);
  for (int t = 0; t < kk; ++t)
    out[t] = t == centre ? static_cast<scalar_t>(acc_t(0))
                         : static_cast<scalar_t>(grad_eff[t] / scale - through);
}

// Output columns j for which input column j + offset lies inside [0, width).
SFI_HOST_DEVICE inline void valid_columns(int width, int offset, int* begin, int* end) {
  *begin = offset < 0 ? -offset : 0;
  *end = offset > 0 ? width - offset : width;
  if (*end < *begin) *end = *begin;
}

// Validation shared by every backend (raises c10::Error with a clear message).
void check_inputs(const at::Tensor& x, const at::Tensor& weight, double eps);

// The layout the kernels work in: channels_last when x really is laid out so, else NCHW.
at::MemoryFormat kernel_layout(const at::Tensor& x);

// Checked inputs in the kernel layout, and the output to fill.
struct ForwardArgs {
  at::MemoryFormat layout;
  at::Tensor x, weight, y;
};
ForwardArgs prepare_forward(const at::Tensor& x, const at::Tensor& weight, double eps);

// Checked inputs in the kernel layout, and the gradients to fill: grad_x zero if not needed;
// grad_weight zero if not needed or x is empty, else allocated only (the backward replaces it
// with the constraint step's output; on CUDA a zero fill would be one more launch per call).
struct BackwardArgs {
  at::MemoryFormat layout;
  at::Tensor x, grad_out, weight, grad_x, grad_weight;
};
BackwardArgs prepare_backward(const at::Tensor& grad_out, const at::Tensor& x,
                              const at::Tensor& weight, double eps, bool need_x,
                              bool need_weight);

// Chain rule through the constraint on the CPU: gradient w.r.t. the effective filter -> raw
// weight. `grad_eff` is [C, k*k] in at::opmath_type of the weight's dtype (double for double);
// returns a contiguous tensor shaped and typed like weight (constraint_grad per channel).
at::Tensor constraint_backward_cpu(const at::Tensor& grad_eff, const at::Tensor& weight,
                                   bool constrained, double eps);

at::Tensor mcs_conv_forward_cpu(const at::Tensor& x, const at::Tensor& weight, bool constrained,
                                double eps);
std::tuple<at::Tensor, at::Tensor> mcs_conv_backward_cpu(const at::Tensor& grad_out,
                                                         const at::Tensor& x,
                                                         const at::Tensor& weight,
                                                         bool constrained, double eps,
                                                         bool need_x, bool need_weight);

#ifdef SFICONV_WITH_CUDA
at::Tensor mcs_conv_forward_cuda(const at::Tensor& x, const at::Tensor& weight, bool constrained,
                                 double eps);
std::tuple<at::Tensor, at::Tensor> mcs_conv_backward_cuda(const at::Tensor& grad_out,
                                                          const at::Tensor& x,
                                                          const at::Tensor& weight,
                                                          bool constrained, double eps,
                                                          bool need_x, bool need_weight);
#endif

}  // namespace sficonv
