// The CUDA kernels' run-time choices (SFICONV_CUDA_* environment variables) and the input
// checks whose messages carry numbers, in host code that the C++ compiler builds (not nvcc).
// They were moved here when errors with numbers, raised from mcs_conv_cuda.cu, crashed the
// process on the GPU machines (2026-11-27); raised from here they crashed too (H200,
// 2026-11-28): the cause was a private copy of libstdc++'s stream code in that build, whatever
// compiled the caller (sficonv_ext/ops/cxx_runtime.py). Every check of the extension now builds
// its message without streams (SFI_CHECK, error_text.h). Built in every build, so the CPU tests
// check the choices too (the op sficonv_ext::cuda_kernel_config).
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
