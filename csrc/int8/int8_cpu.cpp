// CPU int8 driver: argument checks, the weight-sum compensation, threading
// over blocks of N (so M = 1 still uses every core), ISA choice per call.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/checks.h"
#include "../common/cpu_features.h"
#include "../common/parallel.h"
#include "int8.h"
#include "int8_isa.h"

namespace pk {
namespace int8 {

void quantize_per_row_cpu(const float* x, int64_t rows, int64_t cols, int64_t ld, int8_t* q,
                          float* scale) {
  PK_CHECK_ARG(rows >= 0 && cols >= 0, "x: negative shape");
  PK_CHECK_ARG(ld >= cols, "x: row stride ", ld, " is smaller than the row length ", cols);
  PK_CHECK_ARG(rows * cols == 0 || (x && q && scale), "x, q and scale must not be null");
  const int nt = threads_for(rows * cols, int64_t(1) << 15);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ld;
    int8_t* qr = q + r * cols;
    float amax = 0.0f;
    bool nan = false;
    for (int64_t c = 0; c < cols; ++c) {
      amax = std::max(amax, std::fabs(xr[c]));
      nan |= std::isnan(xr[c]);
    }
    const float s = nan ? NAN : amax / 127.0f;
    scale[r] = s;
    if (!(s > 0.0f) || std::isinf(s)) {  // zero row, or NaN/inf: q carries no information
      for (int64_t c = 0; c < cols; ++c) qr[c] = 0;
      continue;
    }
    for (int64_t c = 0; c < cols; ++c) {
      const float v = std::nearbyint(xr[c] / s);  // round half to even
      qr[c] = int8_t(std::min(127.0f, std::max(-127.0f, v)));
    }
  }
}

void gemm_s8s8s32_cpu(const int8_t* a, const int8_t* b, int32_t* c, int64_t m, int64_t n, int64_t k,
                      int64_t lda, int64_t ldb, int64_t ldc) {
  PK_CHECK_ARG(m >= 0 && n >= 0 && k >= 0, "negative GEMM size");
  PK_CHECK_ARG(k < kMaxK, "K = ", k, " could overflow int32 accumulation (limit ", kMaxK, ")");
  PK_CHECK_ARG(lda >= k && ldb >= k && ldc >= n, "leading dimensions too small");
  if (m == 0 || n == 0) return;
  PK_CHECK_ARG(c && (k == 0 || (a && b)), "a, b and c must not be null");
  const GemmKernels* kern = (active_isa() >= Isa::avx512 && has_avx512_vnni())
                                ? gemm_kernels_avx512_vnni()
                                : gemm_kernels_portable();
  // Blocks of 64 columns of c; each thread streams its share of b once per
  // block of rows of a.
  constexpr int64_t kNb = 64;
  const int64_t nblocks = (n + kNb - 1) / kNb;
  const int nt =
      int(std::min<int64_t>(threads_for(m * n * std::max<int64_t>(k, 1), 1 << 18), nblocks));
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t n0 = blk * kNb, n1 = std::min(n, n0 + kNb);
    // The weight-sum compensation of this block's rows of b, computed by the
    // thread about to stream those rows anyway (index j - n0 below).
    int32_t comp[kNb];
    if (kern->needs_comp) {
      for (int64_t j = n0; j < n1; ++j) {
        int32_t s = 0;
        for (int64_t p = 0; p < k; ++p) s += b[j * ldb + p];
        comp[j - n0] = 128 * s;
      }
    }
    kern->gemm(a, b + n0 * ldb, c + n0, comp, 0, m, 0, n1 - n0, k, lda, ldb, ldc);
  }
}

}  // namespace int8
}  // namespace pk
