// A fixed-width SIMD vector for the CPU kernels, written with GCC/Clang vector extensions: one
// 64-byte vector of the accumulation type (16 floats or 8 doubles, one AVX-512 register with
// -march=native on this project's machines, two or four narrower registers elsewhere).
//
// Why not plain arrays: GCC kept arrays of accumulators and input windows on the stack (one
// extra load or store per FMA); vector-typed locals in fully unrolled loops stay in registers.
#pragma once

#include <cstdint>
#include <cstring>

namespace sficonv {
namespace cpu {

template <typename acc_t>
struct Lanes {
  static constexpr int bytes = 64;
  static constexpr int count = bytes / static_cast<int>(sizeof(acc_t));
  typedef acc_t type __attribute__((vector_size(bytes)));
};

template <typename acc_t>
using Vec = typename Lanes<acc_t>::type;

// Loads `count` consecutive values of scalar_t as one vector of acc_t (unaligned; converts
// half types element by element).
template <typename acc_t, typename scalar_t>
inline Vec<acc_t> load_vec(const scalar_t* p) {
  Vec<acc_t> v;
  if constexpr (sizeof(acc_t) == sizeof(scalar_t)) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (int e = 0; e < Lanes<acc_t>::count; ++e) v[e] = static_cast<acc_t>(p[e]);
  }
  return v;
}

template <typename acc_t, typename scalar_t>
inline void store_vec(scalar_t* p, const Vec<acc_t>& v) {
  if constexpr (sizeof(acc_t) == sizeof(scalar_t)) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    for (int e = 0; e < Lanes<acc_t>::count; ++e) p[e] = static_cast<scalar_t>(v[e]);
  }
}

}  // namespace cpu
}  // namespace sficonv
