// Registers the sficonv_ext custom ops with PyTorch (TORCH_LIBRARY) and defines the Python
// module entry point, so `import sficonv_ext._C` loads the kernels into torch.ops.sficonv_ext.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "conv1x1.h"
#include "cpu_block_cache.h"
#include "cpu_scratch.h"
#include "mcs_conv.h"
#include "mcs_conv_cuda_config.h"
#include "norm_act.h"
#include "winograd.h"

// setup.py writes the CUDA architectures it compiled for into this header.
#if __has_include("generated/build_config.h")
#include "generated/build_config.h"
#endif

extern "C" {
// An empty module: importing it runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "sficonv_ext kernels, registered as torch.ops.sficonv_ext.*",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace sficonv {

#ifndef SFICONV_CUDA_ARCHS
#define SFICONV_CUDA_ARCHS ""
#endif

// The interface Python expects (sficonv_ext/ops/_extension.py EXTENSION_API): bump it with
// every op added, removed or re-typed below, so that a binary built from older sources is
// reported as such ("rebuild"), not half-used.
constexpr int kExtensionApi = 8;

// "key=value" pairs separated by ';' describing what this binary was built with.
std::string build_info() {
  std::string info = "api=" + std::to_string(kExtensionApi) + ";cpu=1";
#ifdef _OPENMP
  info += ";openmp=1";  // at::parallel_for runs threads (see setup.py)
#else
  info += ";openmp=0";
#endif
#ifdef SFICONV_WITH_CUDA
  info += ";cuda=1;cuda_archs=" + std::string(SFICONV_CUDA_ARCHS);
#else
  info += ";cuda=0";
#endif
  return info;
}

TORCH_LIBRARY(sficonv_ext, m) {
  m.def("mcs_conv_forward(Tensor x, Tensor weight, bool constrained, float eps) -> Tensor");
  m.def(
      "mcs_conv_backward(Tensor grad_out, Tensor x, Tensor weight, bool constrained, float eps, "
      "bool need_x, bool need_weight) -> (Tensor, Tensor)");
  m.def(
      "batch_norm_act_forward(Tensor x, Tensor weight, Tensor bias, Tensor? residual, bool relu, "
      "float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_act_backward(Tensor grad_y, Tensor x, Tensor y, Tensor weight, Tensor mean, "
      "Tensor var, bool has_residual, bool relu, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("winograd_conv3x3_forward(Tensor x, Tensor weight) -> Tensor");
  m.def(
      "winograd_conv3x3_backward(Tensor grad_y, Tensor x, Tensor weight, bool need_x, "
      "bool need_weight) -> (Tensor, Tensor)");
  m.def("winograd_weight_tiles(Tensor weight) -> Tensor");
  m.def(
      "winograd_conv3x3_inference(Tensor x, Tensor weight_tiles, Tensor bias, bool relu) -> "
      "Tensor");
  m.def("conv1x1_rows_forward(Tensor x, Tensor weight) -> Tensor");
  m.def(
      "conv1x1_rows_backward(Tensor grad_y, Tensor x, Tensor weight, bool need_x, "
      "bool need_weight) -> (Tensor, Tensor)");
  m.def("build_info() -> str", &build_info);
  // The CUDA kernel choices the SFICONV_CUDA_* variables make now (an error if they are invalid):
  // plain C++, so it runs, and is tested, in builds and on machines without CUDA too.
  m.def("cuda_kernel_config() -> str", &cuda_kernel_config_text);
  // Not tensor ops: switches for the CPU block cache (sficonv_ext.cpu_allocator).
  m.def("cpu_block_cache_enter(int token, int min_bytes, float budget) -> ()",
        &cpu_block_cache_enter);
  m.def("cpu_block_cache_exit(int token) -> ()", &cpu_block_cache_exit);
  m.def("cpu_block_cache_trim() -> int", &cpu_block_cache_trim);
  m.def("cpu_block_cache_stats() -> int[]", &cpu_block_cache_stats);
  // The kernel pool: the Winograd temporaries and the large outputs (cpu_scratch.h).
  m.def("cpu_scratch_stats() -> int[]", &cpu_scratch_stats);
  m.def("cpu_scratch_trim() -> int", &cpu_scratch_trim);
}

TORCH_LIBRARY_IMPL(sficonv_ext, CPU, m) {
  m.impl("mcs_conv_forward", &mcs_conv_forward_cpu);
  m.impl("mcs_conv_backward", &mcs_conv_backward_cpu);
  m.impl("batch_norm_act_forward", &batch_norm_act_forward_cpu);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_cpu);
  m.impl("winograd_conv3x3_forward", &winograd_conv3x3_forward_cpu);
  m.impl("winograd_conv3x3_backward", &winograd_conv3x3_backward_cpu);
  m.impl("winograd_weight_tiles", &winograd_weight_tiles_cpu);
  m.impl("winograd_conv3x3_inference", &winograd_conv3x3_inference_cpu);
  m.impl("conv1x1_rows_forward", &conv1x1_rows_forward_cpu);
  m.impl("conv1x1_rows_backward", &conv1x1_rows_backward_cpu);
}

#ifdef SFICONV_WITH_CUDA
TORCH_LIBRARY_IMPL(sficonv_ext, CUDA, m) {
  m.impl("mcs_conv_forward", &mcs_conv_forward_cuda);
  m.impl("mcs_conv_backward", &mcs_conv_backward_cuda);
}
#endif

}  // namespace sficonv
