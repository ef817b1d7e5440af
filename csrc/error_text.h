// Error messages built without C++ streams, and SFI_CHECK, this extension's TORCH_CHECK.
//
// Why: TORCH_CHECK(cond, "got ", n) formats its message with a std::ostringstream made by
// inline code in *this* library. On the GPU machines of 2026-11-28 the extension held its own
// copy of libstdc++'s stream code, and every such message with a number crashed the process
// (the copy's number formatting looked for locale data that only the shared libstdc++ had set
// up); a library linked with -static-libstdc++ here drops the number instead. setup.py links
// the shared runtime to avoid the copy, but messages built here never touch a stream at all:
// numbers go through std::to_string / snprintf, sizes, dtypes and devices through c10's own
// (shared-library) text. A single std::string argument makes TORCH_CHECK pass the text on
// unformatted (c10::str's std::string case). The text matches what c10's stream operators
// print ("[2, 3]", "Float", "cuda:0", "%g" for floating point values). What is left to streams
// is c10's own inline text without numbers (AT_DISPATCH's "not implemented for 'Float8...'",
// which the checks before each dispatch keep out of reach).
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

namespace sficonv {
namespace error_text_detail {

inline void append(std::string& out, const char* text) { out += text ? text : "(null)"; }
inline void append(std::string& out, const std::string& text) { out += text; }
inline void append(std::string& out, char c) { out += c; }
inline void append(std::string& out, bool value) { out += value ? "1" : "0"; }  // as a stream
// Any other pointer would convert to bool and print "1": refused.
template <typename T>
void append(std::string& out, const T* pointer) = delete;

template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& out, T value) {
  out += std::to_string(value);
}

inline void append(std::string& out, double value) {
  char text[32];
  std::snprintf(text, sizeof(text), "%g", value);  // a stream's default: 6 significant digits
  out += text;
}

inline void append(std::string& out, c10::IntArrayRef sizes) {
  out += '[';
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(sizes[i]);
  }
  out += ']';
}

inline void append(std::string& out, c10::ScalarType type) { out += c10::toString(type); }
inline void append(std::string& out, const c10::Device& device) { out += device.str(); }
// Without it a DeviceType would become a Device and print in lower case.
inline void append(std::string& out, c10::DeviceType type) { out += c10::DeviceTypeName(type); }

}  // namespace error_text_detail

// The concatenated text of `parts`: strings, integers (8-bit ones as numbers, where a stream
// would print a character), floating point values, sizes, dtypes, devices and device types.
// Any other type is a compile error, not a silent fallback to a stream.
template <typename... Parts>
std::string error_text(const Parts&... parts) {
  static_assert(sizeof...(Parts) > 0, "SFI_CHECK needs a message");
  std::string out;
  (error_text_detail::append(out, parts), ...);
  return out;
}

}  // namespace sficonv

// TORCH_CHECK with the message built by error_text (see the top of this file): use it for every
// check in csrc/ (python_tests/test_cxx_runtime.py refuses TORCH_CHECK, c10::str and streams
// there).
#define SFI_CHECK(cond, ...) TORCH_CHECK(cond, ::sficonv::error_text(__VA_ARGS__))
