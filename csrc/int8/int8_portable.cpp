// Portable int8 GEMM: plain dot products, widened to int32, which compilers
// vectorise for the baseline ISA.
#include "int8_isa.h"

namespace pk {
namespace int8 {
namespace {

void gemm(const int8_t* a, const int8_t* b, int32_t* c, const int32_t*, int64_t m0, int64_t m1,
          int64_t n0, int64_t n1, int64_t k, int64_t lda, int64_t ldb, int64_t ldc) {
  for (int64_t i = m0; i < m1; ++i) {
    const int8_t* ai = a + i * lda;
    for (int64_t j = n0; j < n1; ++j) {
      const int8_t* bj = b + j * ldb;
      int32_t s = 0;
      for (int64_t p = 0; p < k; ++p) s += int32_t(ai[p]) * int32_t(bj[p]);
      c[i * ldc + j] = s;
    }
  }
}

}  // namespace

const GemmKernels* gemm_kernels_portable() {
  static const GemmKernels table{&gemm, false};
  return &table;
}

}  // namespace int8
}  // namespace pk
