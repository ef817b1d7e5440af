// Device-independent parts of the MCSConv op: input validation and argument preparation.
#include <ATen/ATen.h>

#include "error_text.h"
#include "mcs_conv.h"

namespace sficonv {

void check_inputs(const at::Tensor& x, const at::Tensor& weight, double eps) {
  SFI_CHECK(x.dim() == 4, "mcs_conv: x must be 4-D [N, C, H, W], got shape ", x.sizes());
  SFI_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.size(2) == weight.size(3),
            "mcs_conv: weight must be [C, 1, k, k], got shape ", weight.sizes());
  const int64_t k = weight.size(2);
  SFI_CHECK(k % 2 == 1, "mcs_conv: kernel size must be odd, got ", k);
  SFI_CHECK(weight.size(0) == x.size(1), "mcs_conv: weight has ", weight.size(0),
            " channels but x has ", x.size(1));
  SFI_CHECK(x.device() == weight.device(), "mcs_conv: x is on ", x.device(),
            " but weight is on ", weight.device());
  SFI_CHECK(x.scalar_type() == weight.scalar_type(), "mcs_conv: x is ", x.scalar_type(),
            " but weight is ", weight.scalar_type());
  // The kernels are built for these four (isFloatingType also admits the float8 types, which
  // would fail later, in the dispatch, after the output was allocated).
  const auto dtype = x.scalar_type();
  SFI_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                dtype == at::kBFloat16,
            "mcs_conv: expected float32, float64, float16 or bfloat16, got ", dtype);
  // Only > 0 here: a plain (unconstrained) call ignores eps. mcs_conv refuses, for a
  // constrained call, an eps that rounds to 0 in the filter's dtype.
  SFI_CHECK(eps > 0, "mcs_conv: eps must be positive, got ", eps);
}

at::MemoryFormat kernel_layout(const at::Tensor& x) {
  return (x.size(1) > 1 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous())
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

ForwardArgs prepare_forward(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_inputs(x, weight, eps);
  const auto layout = kernel_layout(x);
  return {layout, x.contiguous(layout), weight.contiguous(),
          at::empty(x.sizes(), x.options().memory_format(layout))};
}

BackwardArgs prepare_backward(const at::Tensor& grad_out, const at::Tensor& x,
                              const at::Tensor& weight, double eps, bool need_x,
                              bool need_weight) {
  check_inputs(x, weight, eps);
  SFI_CHECK(grad_out.sizes() == x.sizes(), "mcs_conv_backward: grad_out has shape ",
            grad_out.sizes(), " but x has shape ", x.sizes());
  SFI_CHECK(grad_out.device() == x.device(), "mcs_conv_backward: grad_out is on ",
            grad_out.device(), " but x is on ", x.device());
  const auto layout = kernel_layout(x);
  const auto options = x.options().memory_format(layout);
  return {layout, x.contiguous(layout), grad_out.to(x.scalar_type()).contiguous(layout),
          weight.contiguous(),
          need_x ? at::empty(x.sizes(), options) : at::empty(x.sizes(), options).zero_(),
          need_weight && x.numel() > 0 ? at::empty(weight.sizes(), weight.options())
                                       : at::zeros(weight.sizes(), weight.options())};
}

}  // namespace sficonv
