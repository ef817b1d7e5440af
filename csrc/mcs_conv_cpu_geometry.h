// The shape of one MCSConv call as the CPU kernels see it. Only included by the CPU kernels.
#pragma once

#include <cstdint>

namespace sficonv {
namespace cpu {

struct Geometry {
  int64_t n, c, h, w;
  int k, pad;
};

}  // namespace cpu
}  // namespace sficonv
