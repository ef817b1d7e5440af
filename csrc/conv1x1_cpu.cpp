// 1x1 convolutions on the CPU as one matrix product over the pixels, forward and backward,
// with outputs of 31 MiB or more from the kernel pool (cpu_scratch.h).
//
// Why: sficonv_ext/ops/conv1x1.py computes these sums as torch.mm on the channels_last rows
// ([N*H*W, C] x [C, K], a view: no copy). The product is the same here; what differs is where
// the result lives. Under glibc's defaults a block over 32 MiB is mapped afresh on every call
// and faulted in 4 KiB at a time: on the 2-core Xeon a fresh [8, 256, 64, 64] float32 tensor
// (32 MiB, layer1's activations at batch 8, 256 px) cost 13-18 ms to fill against 1.4 ms for
// a reused one (2026-11-28), more than the 1x1 convolution that writes it (about 5 ms). ATen's
// convolution cannot write into memory it is given; a matrix product can (at::mm_out).
#include <ATen/ATen.h>

#include "conv1x1.h"
#include "cpu_scratch.h"
#include "error_text.h"

namespace sficonv {
namespace {

// The [N*H*W, C] rows of a channels_last [N, C, H, W] tensor: a view of the same memory.
at::Tensor rows_of(const at::Tensor& t) {
  return t.permute({0, 2, 3, 1}).view({t.size(0) * t.size(2) * t.size(3), t.size(1)});
}

// weight [K, C, 1, 1] as the [K, C] matrix (a view unless its strides forbid one).
at::Tensor weight_matrix(const at::Tensor& weight) {
  return weight.reshape({weight.size(0), weight.size(1)});
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  SFI_CHECK(x.dim() == 4, op, ": x must be [N, C, H, W], got ", x.sizes());
  SFI_CHECK(weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1, op,
            ": weight must be [K, C, 1, 1], got ", weight.sizes());
  SFI_CHECK(weight.size(1) == x.size(1), op, ": x has ", x.size(1), " channels, weight expects ",
            weight.size(1));
  SFI_CHECK(x.device().is_cpu() && weight.device().is_cpu(), op, ": CPU tensors expected");
  SFI_CHECK(x.scalar_type() == weight.scalar_type() && at::isFloatingType(x.scalar_type()), op,
            ": x and weight must share one floating dtype, got ", x.scalar_type(), " and ",
            weight.scalar_type());
}

}  // namespace

at::Tensor conv1x1_rows_forward_cpu(const at::Tensor& x, const at::Tensor& weight) {
  check_inputs(x, weight, "conv1x1_rows_forward");
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), K = weight.size(0);
  auto y = output_empty({N, K, H, W}, x.options(), at::MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return y;
  const auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  // With no input channels the product's inner size is 0: mm_out writes zeros, as conv2d.
  auto y_rows = rows_of(y);
  at::mm_out(y_rows, rows_of(xc), weight_matrix(weight).t());
  return y;
}

std::tuple<at::Tensor, at::Tensor> conv1x1_rows_backward_cpu(const at::Tensor& grad_y,
                                                             const at::Tensor& x,
                                                             const at::Tensor& weight,
                                                             bool need_x, bool need_weight) {
  check_inputs(x, weight, "conv1x1_rows_backward");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = weight.size(0);
  SFI_CHECK(grad_y.sizes() == at::IntArrayRef({N, K, H, W}),
            "conv1x1_rows_backward: grad_y must be ", at::IntArrayRef({N, K, H, W}), ", got ",
            grad_y.sizes());
  SFI_CHECK(grad_y.scalar_type() == x.scalar_type() && grad_y.device().is_cpu(),
            "conv1x1_rows_backward: grad_y must be a CPU tensor of x's dtype, got ",
            grad_y.scalar_type(), " on ", grad_y.device());
  const auto gy = grad_y.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor grad_x, grad_w;
  if (need_x) {
    grad_x = output_empty({N, C, H, W}, x.options(), at::MemoryFormat::ChannelsLast);
    if (grad_x.numel() > 0) {
      auto grad_x_rows = rows_of(grad_x);
      at::mm_out(grad_x_rows, rows_of(gy), weight_matrix(weight));
    }
  }
  if (need_weight) {
    // [K, rows] x [rows, C]: zeros where there are no pixels.
    grad_w = at::mm(rows_of(gy).t(), rows_of(x.contiguous(at::MemoryFormat::ChannelsLast)))
                 .view({K, C, 1, 1});
  }
  return {grad_x.defined() ? grad_x : at::empty({0}, x.options()),
          grad_w.defined() ? grad_w : at::empty({0}, weight.options())};
}

}  // namespace sficonv
