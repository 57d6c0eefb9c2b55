// Threads for the CPU kernels. Nothing is linked for them: a call runs on
// the OpenMP runtime torch already loaded (found at run time), or, where
// there is none or in a fork()ed child, on a small pool of our own.
// parallel.cpp says why, with the measurements. `#pragma omp simd` stays:
// -fopenmp-simd is a compile-time hint only.
//
// Small inputs stay on one thread because waking threads costs more than
// the work (threads_for).
#pragma once
#include <algorithm>
#include <cstdint>
#include <string>

namespace pk {

// Threads a parallel call may use: OMP_NUM_THREADS when set (as before),
// else the CPUs this process may run on. set_max_threads(n) overrides it.
int max_threads();
void set_max_threads(int n);
// What runs parallel calls here: "openmp (<runtime path>)", "pool" or
// "serial" (for info()).
std::string threading_name();

// Runs fn(ctx, t) for t in [0, nt) on nt threads, the caller being t = 0,
// and returns when all are done. nt <= 1 (or, on our pool, a call while it
// is busy with another thread's call) runs every t on the caller.
void run_parallel(int nt, void (*fn)(void*, int), void* ctx);

template <class F>
void parallel(int nt, F&& f) {
  auto call = [](void* ctx, int t) { (*static_cast<F*>(ctx))(t); };
  run_parallel(nt, call, &f);
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

// f(i) for i in [begin, end): thread t takes one contiguous chunk, as
// OpenMP's schedule(static) does.
template <class F>
void parallel_for(int64_t begin, int64_t end, int nt, F&& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  nt = int(std::min<int64_t>(std::max(nt, 1), n));
  parallel(nt, [&](int t) {
    const int64_t q = n / nt, r = n % nt;
    const int64_t lo = begin + t * q + std::min<int64_t>(t, r);
    const int64_t hi = lo + q + (t < r ? 1 : 0);
    for (int64_t i = lo; i < hi; ++i) f(i);
  });
}

// Threads worth using for `work` elements when each thread wants at least
// `grain` of them.
inline int threads_for(int64_t work, int64_t grain) {
  const int64_t t = std::max<int64_t>(1, work / std::max<int64_t>(1, grain));
  return static_cast<int>(std::min<int64_t>(t, max_threads()));
}

}  // namespace pk
