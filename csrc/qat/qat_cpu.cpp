// CPU qat driver: argument checks, threads over rows (forward) or chunks
// (backward), the ISA table chosen per call.
#include <algorithm>

#include "../common/checks.h"
#include "../common/isa_pick.h"
#include "../common/parallel.h"
#include "qat.h"
#include "qat_isa.h"

namespace pk {
namespace qat {

namespace {

const Kernels* kernels() {
  static const IsaPick<Kernels> pick({.portable = &kernels_portable,
                                      .avx2 = PK_ISA_AVX2(&kernels_avx2),
                                      .avx512 = PK_ISA_AVX512(&kernels_avx512)});
  return pick();
}

}  // namespace

void fake_quant_per_row_cpu(const float* x, int64_t rows, int64_t cols, int64_t ld, float* y,
                            uint8_t* mask, float* scale) {
  PK_CHECK_ARG(rows >= 0 && cols >= 0, "x: negative shape");
  PK_CHECK_ARG(ld >= cols, "x: row stride ", ld, " is smaller than the row length ", cols);
  if (rows == 0) return;
  PK_CHECK_ARG(scale && (cols == 0 || (x && y && mask)), "x, y, mask and scale must not be null");
  const Kernels* kern = kernels();
  const int nt =
      std::max(1, int(std::min<int64_t>(threads_for(rows * cols, int64_t(1) << 15), rows)));
  parallel(nt, [&](int t) {
    int64_t r0, r1;
    split_range(rows, nt, t, 1, &r0, &r1);
    if (r0 < r1) kern->fake_quant_rows(x, cols, ld, y, mask, scale, r0, r1);
  });
}

void fake_quant_backward_cpu(const float* grad, const uint8_t* mask, int64_t n, float* out) {
  PK_CHECK_ARG(n >= 0, "negative size");
  if (n == 0) return;
  PK_CHECK_ARG(grad && mask && out, "grad, mask and out must not be null");
  const Kernels* kern = kernels();
  const int nt = std::max(1, threads_for(n, int64_t(1) << 16));
  parallel(nt, [&](int t) {
    int64_t i0, i1;
    split_range(n, nt, t, 64, &i0, &i1);
    if (i0 < i1) kern->backward(grad, mask, out, i0, i1);
  });
}

}  // namespace qat
}  // namespace pk
