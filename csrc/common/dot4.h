// Four dot products of one row against four others, the inner loop of the
// portable (compiler-vectorised) kernels: float rows against float or int8
// weights in float, int8 rows against int8 in exact int32. Internal linkage:
// each ISA file compiles its own copy with its own flags.
#pragma once
#include <cstdint>

namespace pk {
namespace {

template <class Acc, class X, class W>
inline void dot4(const X* x, const W* w0, const W* w1, const W* w2, const W* w3, int64_t k,
                 Acc s[4]) {
  Acc s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t p = 0; p < k; ++p) {
    s0 += Acc(x[p]) * Acc(w0[p]);
    s1 += Acc(x[p]) * Acc(w1[p]);
    s2 += Acc(x[p]) * Acc(w2[p]);
    s3 += Acc(x[p]) * Acc(w3[p]);
  }
  s[0] = s0, s[1] = s1, s[2] = s2, s[3] = s3;
}

}  // namespace
}  // namespace pk
