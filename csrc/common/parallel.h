// Thread-count policy shared by the CPU kernels: OpenMP when the build has it,
// one thread otherwise. Small inputs stay on one thread because waking the
// pool costs more than the work.
#pragma once
#include <algorithm>
#include <cstdint>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace pk {

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline void set_max_threads(int n) {
#ifdef _OPENMP
  omp_set_num_threads(std::max(1, n));
#else
  (void)n;
#endif
}

// Threads worth using for `work` elements when each thread wants at least
// `grain` of them.
inline int threads_for(int64_t work, int64_t grain) {
  const int64_t t = std::max<int64_t>(1, work / std::max<int64_t>(1, grain));
  return static_cast<int>(std::min<int64_t>(t, max_threads()));
}

// [begin, end) of part `i` of `parts`, boundaries aligned to `align` elements.
inline void split_range(int64_t n, int parts, int i, int64_t align, int64_t* begin, int64_t* end) {
  auto cut = [&](int j) {
    if (j >= parts) return n;
    const int64_t c = (n / parts) * j / align * align;
    return std::min(c, n);
  };
  *begin = cut(i);
  *end = cut(i + 1);
}

}  // namespace pk
