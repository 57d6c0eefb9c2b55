// Per-ISA int8 GEMM micro-kernels, compiled once per instruction set (see
// topk_isa.h for why nothing here touches the standard library).
#pragma once
#include <cstdint>

namespace pk {
namespace int8 {

struct GemmKernels {
  // c[i, j] for rows i in [m0, m1) of a and rows j in [n0, n1) of b.
  // comp[j] = 128 * sum_k b[j, k] (kernels that bias a to unsigned use it).
  void (*gemm)(const int8_t* a, const int8_t* b, int32_t* c, const int32_t* comp, int64_t m0,
               int64_t m1, int64_t n0, int64_t n1, int64_t k, int64_t lda, int64_t ldb,
               int64_t ldc);
  bool needs_comp;
};

const GemmKernels* gemm_kernels_portable();
const GemmKernels* gemm_kernels_avx512_vnni();

}  // namespace int8
}  // namespace pk
