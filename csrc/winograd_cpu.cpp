// 3x3 convolution (stride 1, padding 1) by Winograd's F(4x4, 3x3) on the CPU, forward and
// backward.
//
// Why: in float32 the fast model's train step is three quarters convolutions, already running
// near the CPU's float32 matrix-multiply speed in oneDNN (README, Performance). F(4x4, 3x3)
// computes each 4x4 block of outputs from a 6x6 block of inputs with 36 multiplies per
// (input, output) channel pair instead of 144: the convolution becomes 36 independent matrix
// products [tiles, C] x [C, K] (at::bmm, i.e. MKL), plus transforms that are passes over
// memory.
//
//   y_tile = A^T [ (G g G^T) . (B^T d B) ] A        (Lavin & Gray, 2015; points 0, +-1, +-2)
//
// Layouts: activations are channels_last (NHWC), so every transform works on rows of
// contiguous channels, and the inner loops run along channels for the compiler to vectorise.
// Transformed tiles are [36, tiles, channels]: one matrix per position of the 6x6 tile.
//
// Backward: the input gradient is the same convolution of grad_y with the kernel turned 180
// degrees and its channel axes swapped. The weight gradient is the adjoint of the map above:
//   dU = sum over tiles of (B^T d B) (x) (A dY A^T),  dg = G^T dU G,
// 36 matrix products [C, tiles] x [tiles, K].
//
// Memory: the weight tiles, tile-domain inputs and products of a call are temporaries from
// cpu_scratch.h's pool (kept for the next call), not fresh allocations: glibc maps blocks over
// 32 MiB afresh on every call, and the 512-channel layers' tiles are 37.7 MB. Outputs of
// 31 MiB or more come from the same pool (output_empty).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu_scratch.h"
#include "error_text.h"
#include "winograd.h"
#include "winograd_transforms.h"

namespace sficonv {
namespace {

using namespace winograd;

// ATen's thread pool for the transforms.
const auto aten_parallel = [](int64_t begin, int64_t end, int64_t grain, const auto& fn) {
  at::parallel_for(begin, end, grain, fn);
};

// weight [K, C, 3, 3] -> U [36, K, C] (see weight_tiles_kernel); `turned`: the tiles of the
// input gradient's kernel, w turned 180 degrees (its channel axes swapped by the caller's use
// of U untransposed). `scratch`: U lives only for this call (pooled memory, cpu_scratch.h).
at::Tensor weight_tiles(const at::Tensor& weight, bool turned, bool scratch) {
  const int64_t K = weight.size(0), C = weight.size(1);
  auto u = scratch ? scratch_empty({kPositions, K, C}, weight.options())
                   : at::empty({kPositions, K, C}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "winograd_weight_tiles", [&] {
    weight_tiles_kernel(weight.const_data_ptr<scalar_t>(), u.mutable_data_ptr<scalar_t>(), K,
                        C, WeightView(weight.strides().data(), turned), aten_parallel);
  });
  return u;
}

// The adjoint of weight_tiles (not turned): dU [36, K, C] -> grad of weight [K, C, 3, 3], in
// the weight's own memory format.
at::Tensor weight_grad_from_tiles(const at::Tensor& du, const at::Tensor& weight) {
  const int64_t K = weight.size(0), C = weight.size(1);
  auto gw = at::empty_like(weight, at::MemoryFormat::Preserve);
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "winograd_weight_grad", [&] {
    weight_grad_kernel(du.const_data_ptr<scalar_t>(), gw.mutable_data_ptr<scalar_t>(), K, C,
                       WeightView(gw.strides().data(), false), aten_parallel);
  });
  return gw;
}

void check_weight(const at::Tensor& weight) {
  SFI_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3,
            "winograd_conv3x3: weight must be [K, C, 3, 3], got ", weight.sizes());
  SFI_CHECK(weight.device().is_cpu(), "winograd_conv3x3: CPU tensors expected");
  SFI_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
            "winograd_conv3x3: float32 or float64 expected, got ", weight.scalar_type());
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight) {
  SFI_CHECK(x.dim() == 4, "winograd_conv3x3: x must be [N, C, H, W], got ", x.sizes());
  check_weight(weight);
  SFI_CHECK(weight.size(1) == x.size(1), "winograd_conv3x3: x has ", x.size(1),
            " channels, weight expects ", weight.size(1));
  // The weight's device and dtype are checked above: x must match them.
  SFI_CHECK(x.device().is_cpu(), "winograd_conv3x3: CPU tensors expected");
  SFI_CHECK(x.scalar_type() == weight.scalar_type(),
            "winograd_conv3x3: x and weight dtypes differ (", x.scalar_type(), " and ",
            weight.scalar_type(), ")");
}

// [36, tiles, C] tiles of x (any layout; made channels_last contiguous here), for this call.
at::Tensor transformed_input(const at::Tensor& x, const TileGrid& g) {
  const auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t C = x.size(1);
  auto v = scratch_empty({kPositions, g.count(), C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_input_tiles", [&] {
    input_tiles(xc.const_data_ptr<scalar_t>(), v.mutable_data_ptr<scalar_t>(), g, C,
                aten_parallel);
  });
  return v;
}

// The convolution of x [N, C, H, W] with the kernel whose tiles are u [36, C, K] (any
// strides); with a bias (contiguous [K]), relu(conv + bias) when `relu`.
at::Tensor convolve(const at::Tensor& x, const at::Tensor& u, const at::Tensor& bias = {},
                    bool relu = false) {
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), K = u.size(2);
  // From the kernel pool when it is 31 MiB or more (cpu_scratch.h): layer1's at batch 32.
  auto y = output_empty({N, K, H, W}, x.options(), at::MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return y;
  const TileGrid g(N, H, W);
  auto m = scratch_empty({kPositions, g.count(), K}, x.options());
  at::bmm_out(m, transformed_input(x, g), u);  // [36, tiles, K]
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_output_tiles", [&] {
    output_tiles(m.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), g, K,
                 bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, relu,
                 aten_parallel);
  });
  return y;
}

}  // namespace

at::Tensor winograd_conv3x3_forward_cpu(const at::Tensor& x, const at::Tensor& weight) {
  check_inputs(x, weight);
  return convolve(x, weight_tiles(weight, /*turned=*/false, /*scratch=*/true).transpose(1, 2));
}

at::Tensor winograd_weight_tiles_cpu(const at::Tensor& weight) {
  check_weight(weight);
  return weight_tiles(weight, /*turned=*/false, /*scratch=*/false);  // kept by the caller
}

at::Tensor winograd_conv3x3_inference_cpu(const at::Tensor& x, const at::Tensor& weight_tiles,
                                          const at::Tensor& bias, bool relu) {
  SFI_CHECK(weight_tiles.dim() == 3 && weight_tiles.size(0) == kPositions,
            "winograd_conv3x3_inference: weight_tiles must be [36, K, C] (from "
            "winograd_weight_tiles), got ", weight_tiles.sizes());
  const int64_t K = weight_tiles.size(1);
  SFI_CHECK(x.dim() == 4 && x.size(1) == weight_tiles.size(2),
            "winograd_conv3x3_inference: x must be [N, ", weight_tiles.size(2),
            ", H, W], got ", x.sizes());
  SFI_CHECK(bias.dim() == 1 && bias.size(0) == K, "winograd_conv3x3_inference: bias must be [",
            K, "], got ", bias.sizes());
  SFI_CHECK(x.device().is_cpu() && weight_tiles.device().is_cpu() && bias.device().is_cpu(),
            "winograd_conv3x3_inference: CPU tensors expected");
  SFI_CHECK(x.scalar_type() == weight_tiles.scalar_type() &&
                x.scalar_type() == bias.scalar_type() &&
                (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
            "winograd_conv3x3_inference: x, weight_tiles and bias must all be float32 or all "
            "float64, got ", x.scalar_type(), ", ", weight_tiles.scalar_type(), ", ",
            bias.scalar_type());
  return convolve(x, weight_tiles.transpose(1, 2), bias.contiguous(), relu);
}

std::tuple<at::Tensor, at::Tensor> winograd_conv3x3_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, bool need_x,
    bool need_weight) {
  check_inputs(x, weight);
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), K = weight.size(0);
  SFI_CHECK(grad_y.sizes() == at::IntArrayRef({N, K, H, W}),
            "winograd_conv3x3_backward: grad_y must be ", at::IntArrayRef({N, K, H, W}),
            ", got ", grad_y.sizes());
  SFI_CHECK(grad_y.scalar_type() == x.scalar_type(),
            "winograd_conv3x3_backward: grad_y dtype ", grad_y.scalar_type(), ", x dtype ",
            x.scalar_type());
  const auto gy = grad_y.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor grad_x, grad_w;
  if (need_x) {
    // The transposed convolution: the kernel turned 180 degrees, in and out channels swapped
    // (U [36, K, C] is already [in, out] for it).
    grad_x = convolve(gy, weight_tiles(weight, /*turned=*/true, /*scratch=*/true));
  }
  if (need_weight) {
    const TileGrid g(N, H, W);
    auto dy = scratch_empty({kPositions, g.count(), K}, x.options());
    if (dy.numel() > 0) {
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_grad_tiles", [&] {
        grad_tiles(gy.const_data_ptr<scalar_t>(), dy.mutable_data_ptr<scalar_t>(), g, K,
                   aten_parallel);
      });
    }
    // [36, K, tiles] x [36, tiles, C]: a sum over tiles, zero where there are none.
    auto du = scratch_empty({kPositions, K, weight.size(1)}, x.options());
    at::bmm_out(du, dy.transpose(1, 2), transformed_input(x, g));
    grad_w = weight_grad_from_tiles(du, weight);
  }
  return {grad_x.defined() ? grad_x : at::empty({0}, x.options()),
          grad_w.defined() ? grad_w : at::empty({0}, weight.options())};
}

}  // namespace sficonv
