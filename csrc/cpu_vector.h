// A fixed-width SIMD vector for the CPU kernels, written with GCC/Clang vector extensions: one
// register of the widest kind the build targets (-march; setup.py uses native): 64 bytes with
// AVX-512 (16 floats or 8 doubles), 32 with AVX, else 16. The kernels size their register
// blocks from it (kRun, kRowBlock): a 64-byte vector on an AVX2 build is two registers, and
// blocks sized for 32 AVX-512 registers then spilled (2.5-3.5x slower than the previous
// kernels in an x86-64-v3 build on this project's CPU).
//
// Why not plain arrays: GCC kept arrays of accumulators and input windows on the stack (one
// extra load or store per FMA); vector-typed locals in fully unrolled loops stay in registers.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace sficonv {
namespace cpu {
// Internal linkage: the calling convention of a function returning a vector depends on -march,
// so these must never link against a copy built with other flags.
namespace {

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif
// Vector registers the register blocks may plan on: 32 with AVX-512, 16 otherwise on x86-64.
constexpr bool kManyRegisters = kVectorBytes == 64;

template <typename acc_t>
struct Lanes {
  static constexpr int bytes = kVectorBytes;
  static constexpr int count = bytes / static_cast<int>(sizeof(acc_t));
  typedef acc_t type __attribute__((vector_size(bytes)));
};

template <typename acc_t>
using Vec = typename Lanes<acc_t>::type;

namespace detail {

constexpr int kFloats = Lanes<float>::count;

// 16-bit storage types widened to float a whole vector at a time: GCC does not vectorise the
// element-by-element c10 conversions (bfloat16 channels_last ran 3x slower than float32).
typedef uint16_t U16xN __attribute__((vector_size(kVectorBytes / 2)));
typedef uint32_t U32xN __attribute__((vector_size(kVectorBytes)));

inline Vec<float> widen_bfloat16(const void* p) {
  U16xN raw;
  std::memcpy(&raw, p, sizeof(raw));
  const U32xN bits = __builtin_convertvector(raw, U32xN) << 16;  // bf16 is float's top half
  Vec<float> v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// float -> bfloat16 rounding to nearest even, NaN -> 0x7FC0: what c10::BFloat16 does.
inline void narrow_bfloat16(void* p, const Vec<float>& v) {
  U32xN bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const U32xN rounded = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16;
  const U32xN is_nan = (U32xN)(v != v);  // all ones where NaN
  const U32xN out = (rounded & ~is_nan) | ((U32xN{} + 0x7FC0u) & is_nan);
  const U16xN narrow = __builtin_convertvector(out, U16xN);
  std::memcpy(p, &narrow, sizeof(narrow));
}

// float16 with the F16C/AVX-512 conversion instructions where the build targets them (GCC 12's
// _Float16 vectors converted one element at a time: 4.4 ms for a channels_last forward that
// takes 0.5 in bfloat16); otherwise element by element with c10::Half.
inline Vec<float> widen_half(const c10::Half* p) {
  Vec<float> v;
#if defined(__AVX512F__)
  // The zero-masked forms: the plain ones pass GCC 12 an undefined source it warns about.
  const __m512 wide =
      _mm512_maskz_cvtph_ps(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  std::memcpy(&v, &wide, sizeof(v));
#elif defined(__F16C__) && defined(__AVX__)
  const __m256 wide = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&v, &wide, sizeof(v));
#else
  for (int e = 0; e < kFloats; ++e) v[e] = static_cast<float>(p[e]);
#endif
  return v;
}

inline void narrow_half(c10::Half* p, const Vec<float>& v) {  // rounds to nearest even
#if defined(__AVX512F__)
  __m512 wide;
  std::memcpy(&wide, &v, sizeof(wide));
  _mm256_storeu_si256(
      reinterpret_cast<__m256i*>(p),
      _mm512_maskz_cvtps_ph(0xFFFF, wide, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__) && defined(__AVX__)
  __m256 wide;
  std::memcpy(&wide, &v, sizeof(wide));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(wide, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  for (int e = 0; e < kFloats; ++e) p[e] = static_cast<c10::Half>(v[e]);
#endif
}

}  // namespace detail

// Loads `count` consecutive values of scalar_t as one vector of acc_t (unaligned).
template <typename acc_t, typename scalar_t>
inline Vec<acc_t> load_vec(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    return detail::widen_bfloat16(p);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    return detail::widen_half(p);
  } else {
    static_assert(std::is_same_v<scalar_t, acc_t>, "load_vec: unsupported type pair");
    Vec<acc_t> v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
}

// Stores one vector of acc_t as `count` consecutive values of scalar_t (unaligned; half types
// rounded to nearest even, as c10's conversions do).
template <typename acc_t, typename scalar_t>
inline void store_vec(scalar_t* p, const Vec<acc_t>& v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    detail::narrow_bfloat16(p, v);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    detail::narrow_half(p, v);
  } else {
    static_assert(std::is_same_v<scalar_t, acc_t>, "store_vec: unsupported type pair");
    std::memcpy(p, &v, sizeof(v));
  }
}

// Whether every lane is zero. Finiteness probes sum value * 0 over values: zero while all are
// finite, NaN once one is not.
template <typename acc_t>
inline bool all_zero(const Vec<acc_t>& v) {
  for (int e = 0; e < Lanes<acc_t>::count; ++e)
    if (!(v[e] == acc_t(0))) return false;
  return true;
}

}  // namespace
}  // namespace cpu
}  // namespace sficonv
