// Training-mode BatchNorm + optional residual add + optional ReLU as one op (the epilogue of
// every SFIConv layer and bottleneck): declarations of the CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace sficonv {

// y = [relu](batch_norm(x) + residual) with batch statistics. Returns (y, mean, var): the batch
// mean and biased variance per channel, in the accumulation dtype (float64 for float64 input,
// else float32), for the caller's running-statistics update.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& residual, bool relu, double eps);

// (grad_x, grad_weight, grad_bias, grad_residual); grad_residual is empty when has_residual is
// false. `y` is the forward output (its sign is the ReLU mask); mean and var as returned above.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& var, bool has_residual, bool relu, double eps);

}  // namespace sficonv
