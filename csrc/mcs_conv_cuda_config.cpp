// See mcs_conv_cuda_config.h: the CUDA kernels' choices and numbered errors, built by the C++
// compiler.
#include "mcs_conv_cuda_config.h"
#include "error_text.h"


#include <climits>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

namespace sficonv {
namespace {

// The value of environment variable `name`, one of `allowed` (the first when unset or empty).
std::string env_choice(const char* name, std::initializer_list<const char*> allowed) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return *allowed.begin();
  std::string choices;
  for (const char* a : allowed) {
    if (std::strcmp(value, a) == 0) return a;
    choices += choices.empty() ? a : std::string(", ") + a;
  }
  SFI_CHECK(false, "mcs_conv CUDA kernel: ", name, "=", value, " is not one of: ", choices);
  return {};
}

bool env_set(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0';
}

const char* nchw_kernel_name(NchwKernel kernel) {
  switch (kernel) {
    case NchwKernel::kTilesPipelined: return "tiles-pipelined";
    case NchwKernel::kTiles: return "tiles";
    default: return "rows";
  }
}

}  // namespace

CudaKernelConfig cuda_kernel_config() {
  // The double-buffered tiles are the default (an H100 run of 2026-11-27 timed their forward at
  // 1.04-1.64x the plain tiles'); "tiles" and "rows" stay selectable so that benchmarks and
  // tests compare the kernels on one build.
  const std::string nchw =
      env_choice("SFICONV_CUDA_NCHW_KERNEL", {"tiles-pipelined", "tiles", "rows"});
  CudaKernelConfig config;
  config.nchw_kernel = nchw == "tiles-pipelined" ? NchwKernel::kTilesPipelined
                       : nchw == "tiles"         ? NchwKernel::kTiles
                                                 : NchwKernel::kRows;
  // The plain tile kernel's register budget, an experiment: Nsight Compute found it at 25%
  // occupancy, limited by registers; "3" or "4" asks the compiler for that many resident blocks
  // of 256 threads (__launch_bounds__). Timed on an H100 (2026-11-27): 3 level with the uncapped
  // kernel in float32, 7-8% faster in bfloat16, 4 slower. It exists for the plain tiles only:
  // setting it selects them where they serve (NCHW, k = 3, 5, 7; other calls run kernels it
  // does not change); asked for together with an explicit double-buffered kernel it is a
  // contradiction, refused on every call whatever its input, like an unknown value.
  config.tile_min_blocks =
      std::atoi(env_choice("SFICONV_CUDA_TILE_MIN_BLOCKS", {"1", "3", "4"}).c_str());
  SFI_CHECK(config.tile_min_blocks == 1 ||
                !(env_set("SFICONV_CUDA_NCHW_KERNEL") &&
                  config.nchw_kernel == NchwKernel::kTilesPipelined),
            "mcs_conv CUDA kernel: SFICONV_CUDA_TILE_MIN_BLOCKS=", config.tile_min_blocks,
            " caps the plain tile kernel, but SFICONV_CUDA_NCHW_KERNEL=tiles-pipelined asks for "
            "the double-buffered one");
  config.fused_backward = env_choice("SFICONV_CUDA_FUSED_BACKWARD", {"0", "1"}) == "1";
  return config;
}

std::string cuda_kernel_config_text() {
  const auto config = cuda_kernel_config();
  return std::string("nchw_kernel=") + nchw_kernel_name(config.nchw_kernel) +
         ";tile_min_blocks=" + std::to_string(config.tile_min_blocks) +
         ";fused_backward=" + (config.fused_backward ? "1" : "0");
}

void check_cuda_device(const at::Tensor& x) {
  SFI_CHECK(x.is_cuda(), "mcs_conv CUDA kernel: expected CUDA tensors, got ", x.device());
}

void check_cuda_sizes(const at::Tensor& x) {
  constexpr int64_t kMaxSide = INT32_MAX - 1024;
  SFI_CHECK(x.size(1) <= INT32_MAX && x.size(2) <= kMaxSide && x.size(3) <= kMaxSide,
            "mcs_conv CUDA kernel: C must fit in 32 bits and H and W must be at most ",
            kMaxSide, ", got ", x.sizes());
}

void check_weight_grad_channels(int64_t channels, int64_t limit, int k) {
  SFI_CHECK(channels <= limit, "mcs_conv CUDA kernel: the weight gradient for k = ", k,
            " in this layout supports at most ", limit, " channels, got ", channels);
}

}  // namespace sficonv
