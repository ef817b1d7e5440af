// 3x3 convolution (stride 1, padding 1) by Winograd's F(4x4, 3x3) on the CPU: declarations.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace sficonv {

// y = conv2d(x, weight, padding=1) for x [N, C, H, W] and weight [K, C, 3, 3] (float32 or
// float64). y is [N, K, H, W] in channels_last.
at::Tensor winograd_conv3x3_forward_cpu(const at::Tensor& x, const at::Tensor& weight);

// (grad_x, grad_weight) of the convolution above; each is an empty tensor when not needed.
std::tuple<at::Tensor, at::Tensor> winograd_conv3x3_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, bool need_x,
    bool need_weight);

// Inference: the weight's tiles [36, K, C], computed once (the weight does not change), and
// relu(conv2d(x, weight, bias, padding=1)) from them (the ReLU optional, NaN kept).
at::Tensor winograd_weight_tiles_cpu(const at::Tensor& weight);
at::Tensor winograd_conv3x3_inference_cpu(const at::Tensor& x, const at::Tensor& weight_tiles,
                                          const at::Tensor& bias, bool relu);

}  // namespace sficonv
