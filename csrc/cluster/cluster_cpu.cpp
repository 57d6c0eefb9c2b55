// CPU cluster driver: argument checks, threading over blocks of output
// channels (so M = 1 still uses every core), ISA choice per call.
#include <algorithm>

#include "../common/checks.h"
#include "../common/cpu_features.h"
#include "../common/parallel.h"
#include "../common/scratch.h"
#include "cluster.h"
#include "cluster_isa.h"

namespace pk {
namespace cluster {

namespace {

const Kernels* kernels() {
#ifdef PK_HAVE_AVX512
  if (active_isa() >= Isa::avx512) return kernels_avx512();
#endif
#ifdef PK_HAVE_AVX2
  if (active_isa() >= Isa::avx2) return kernels_avx2();
#endif
  return kernels_portable();
}

}  // namespace

void linear_cpu(const float* x, int64_t m, int64_t k, int64_t ldx, const uint8_t* codes, int bits,
                const float* codebook, int64_t n_clusters, bool per_row, const float* bias,
                int64_t n, float* y) {
  PK_CHECK_ARG(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  PK_CHECK_ARG(m >= 0 && n >= 0 && k >= 0, "negative linear size");
  PK_CHECK_ARG(ldx >= k, "x: row stride ", ldx, " is smaller than the row length ", k);
  const int64_t most = bits == 4 ? kMaxClusters4 : kMaxClusters;
  PK_CHECK_ARG(n_clusters >= 1 && n_clusters <= most, "n_clusters must be in [1, ", most, "] for ",
               bits, "-bit codes, got ", n_clusters);
  if (m == 0 || n == 0) return;
  PK_CHECK_ARG(x && codes && codebook && y, "x, codes, codebook and y must not be null");
  const Kernels* kern = kernels();
  Args a{
      x,          m,    k, ldx, codes, code_row_bytes(k, bits), codebook, per_row ? n_clusters : 0,
      n_clusters, bias, n, y};
  // Blocks of 4 channels (the kernels' widest tile); at least 64 per thread
  // so each thread streams a long run of codes.
  const int nt = std::max(
      1,
      int(std::min<int64_t>(threads_for(m * n * std::max<int64_t>(k, 1), 1 << 18), (n + 63) / 64)));
  float* wf = scratch<float>(0, int64_t(nt) * 4 * k);  // generic kernels' decoded rows
  parallel(nt, [&](int t) {
    int64_t n0, n1;
    split_range(n, nt, t, 4, &n0, &n1);
    if (n0 >= n1) return;
    if (bits == 4)
      kern->linear4(a, n0, n1, wf + t * 4 * k);
    else
      kern->linear8(a, n0, n1, wf + t * 4 * k);
  });
}

}  // namespace cluster
}  // namespace pk
