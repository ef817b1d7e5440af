// The CUDA kernels' run-time choices (SFICONV_CUDA_* environment variables) and the input
// checks whose messages carry numbers, in host code that the C++ compiler builds (not nvcc).
// Why not in mcs_conv_cuda.cu: on the GPU machines (torch 2.11, nvcc 13.0) every TORCH_CHECK
// raised from that file with an integer in its message crashed the process (segfault, H100 and
// H200, 2026-11-27), while its string-only errors were caught; the cause was not found, so
// nothing that formats a number is raised from nvcc-compiled code. Built in every build, so
// the CPU tests check the choices too (the op sficonv_ext::cuda_kernel_config).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace sficonv {

// The NCHW correlation kernel for k = 3, 5, 7 (forward and input gradient).
enum class NchwKernel { kTilesPipelined, kTiles, kRows };

struct CudaKernelConfig {
  NchwKernel nchw_kernel;
  int tile_min_blocks;  // 1 (no register cap), 3 or 4: blocks per SM asked of the plain tiles
  bool fused_backward;  // both NCHW gradients in one pass where the kernel serves the input
};

// Read and checked on every call (tests and benchmarks change the variables between calls),
// all three at once whatever the input (a layout or filter size that one of them does not
// concern included): an unknown value, or a register cap together with an explicit
// tiles-pipelined, is an error that names the choices rather than a silent default.
CudaKernelConfig cuda_kernel_config();

// "nchw_kernel=...;tile_min_blocks=...;fused_backward=..." (the op cuda_kernel_config).
std::string cuda_kernel_config_text();

// A CUDA tensor whose sizes the kernels' 32-bit per-image indices can hold (after check_inputs:
// x is 4-D). The kernels add a tile, a halo or a row block (under 1024) to H and W.
void check_cuda_device(const at::Tensor& x);
void check_cuda_sizes(const at::Tensor& x);

// The fallback weight-gradient kernel puts channels on gridDim.y (at most `limit`).
void check_weight_grad_channels(int64_t channels, int64_t limit, int k);

}  // namespace sficonv
