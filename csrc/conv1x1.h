// 1x1 convolutions on the CPU as one matrix product over the pixels: declarations.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace sficonv {

// y = conv2d(x, weight) for x [N, C, H, W] (any layout; channels_last is read in place) and
// weight [K, C, 1, 1], of one floating dtype. y is [N, K, H, W] in channels_last.
at::Tensor conv1x1_rows_forward_cpu(const at::Tensor& x, const at::Tensor& weight);

// (grad_x, grad_weight) of the convolution above; each is an empty tensor when not needed.
// grad_x is channels_last, grad_weight [K, C, 1, 1] contiguous.
std::tuple<at::Tensor, at::Tensor> conv1x1_rows_backward_cpu(const at::Tensor& grad_y,
                                                             const at::Tensor& x,
                                                             const at::Tensor& weight,
                                                             bool need_x, bool need_weight);

}  // namespace sficonv
