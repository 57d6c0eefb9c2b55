// Argument checks shared by every family. Bindings validate first; these are
// the second line of defence inside the kernels' C++ entry points, so a bad
// call from C or cffi gets an exception (or an error code) instead of a crash.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace pk {

template <class... Parts>
[[noreturn]] inline void fail_arg(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

}  // namespace pk

#define PK_CHECK_ARG(cond, ...)               \
  do {                                        \
    if (!(cond)) ::pk::fail_arg(__VA_ARGS__); \
  } while (0)
