// Error messages with numbers in them, assembled without std::ostream.
//
// TORCH_CHECK(cond, "a ", n) formats through std::ostringstream compiled into this extension. Where the
// toolchain links a second copy of libstdc++'s stream code into the extension (a side-installed g++ whose
// libstdc++ differs from the one torch loads), that copy runs on locale data it never initialised, and
// streaming a number crashed the process instead of raising. So every message is one std::string built here
// with std::string and snprintf, and TORCH_CHECK receives that string alone (c10 passes it through as is).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace posenc {
namespace message_detail {

inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(c10::ScalarType t) { return c10::toString(t); }
inline std::string piece(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
std::string piece(T v) {
  return std::to_string(v);
}
inline std::string piece(c10::IntArrayRef values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + std::to_string(values[i]);
  return out + "]";
}

}  // namespace message_detail

template <class... Args>
std::string message(const Args&... args) {
  std::string out;
  ((out += message_detail::piece(args)), ...);
  return out;
}

}  // namespace posenc
