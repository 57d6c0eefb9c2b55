// CPU cluster driver: argument checks, threading over blocks of output
// channels (so M = 1 still uses every core), ISA choice per call.
#include <algorithm>

#include "../common/checks.h"
#include "../common/isa_pick.h"
#include "../common/parallel.h"
#include "../common/scratch.h"
#include "cluster.h"
#include "cluster_isa.h"

namespace pk {
namespace cluster {

namespace {

const Kernels* kernels() {
  static const IsaPick<Kernels> pick({.portable = &kernels_portable,
                                      .avx2 = PK_ISA_AVX2(&kernels_avx2),
                                      .avx512_vnni = PK_ISA_AVX512(&kernels_avx512_vnni),
                                      .neon = PK_ISA_NEON(&kernels_neon),
                                      .dotprod = PK_ISA_DOTPROD(&kernels_dotprod)});
  return pick();
}

void run_dynamic(const Kernels* kern, const float* x, int64_t m, int64_t k, int64_t ldx,
                 const uint8_t* codes, int bits, const float* codebook, int64_t nc, bool per_row,
                 const float* bias, int64_t n, float* y) {
  // Activations: 4-bit codes read them in the order the codes unpack
  // (dynamic_x_pos4), zero in the padding up to a whole group.
  // Rows a multiple of 256 bytes apart would all fall into one L1 set when
  // a tile reads six of them together: a cache line more keeps them apart.
  const int64_t kq = bits == 4 ? 2 * code_row_bytes(k, 4) : k;
  const int64_t ldq = kq % 256 == 0 ? kq + 64 : kq;
  int8_t* xq = scratch<int8_t>(0, m * ldq);
  int32_t* xsum = scratch<int32_t>(0, m);
  float* xs = scratch<float>(1, m);
  const int nq = std::max(1, int(std::min<int64_t>(threads_for(m * k, int64_t(1) << 15), m)));
  parallel(nq, [&](int t) {
    int64_t r0, r1;
    split_range(m, nq, t, 1, &r0, &r1);
    if (r0 < r1) kern->quantize(x, ldx, k, xq, ldq, bits == 4, xs, xsum, r0, r1);
  });
  // Codebooks: int8 tables of 16 or 256 entries, zero past nc.
  const int64_t rows = per_row ? n : 1, tab = bits == 4 ? 16 : 256;
  int8_t* cq = scratch<int8_t>(1, rows * tab);
  float* cs = scratch<float>(2, rows);
  const int nc_threads =
      std::max(1, int(std::min<int64_t>(threads_for(rows * tab, int64_t(1) << 16), rows)));
  parallel(nc_threads, [&](int t) {
    int64_t r0, r1;
    split_range(rows, nc_threads, t, 1, &r0, &r1);
    if (r0 < r1) kern->quantize(codebook, nc, nc, cq, tab, false, cs, nullptr, r0, r1);
  });
  DynArgs a;
  a.xq = xq;
  a.kq = kq;
  a.ldq = ldq;
  a.xsum = xsum;
  a.xs = xs;
  a.m = m;
  a.k = k;
  a.codes = codes;
  a.code_ld = code_row_bytes(k, bits);
  a.cq = cq;
  a.cq_ld = per_row ? tab : 0;
  a.cs = cs;
  a.cs_ld = per_row ? 1 : 0;
  a.bias = bias;
  a.n = n;
  a.y = y;
  const int nt = std::max(
      1,
      int(std::min<int64_t>(threads_for(m * n * std::max<int64_t>(k, 1), 1 << 18), (n + 63) / 64)));
  int8_t* wq = scratch<int8_t>(2, int64_t(nt) * 4 * kq);  // generic kernels' decoded rows
  parallel(nt, [&](int t) {
    int64_t n0, n1;
    split_range(n, nt, t, 4, &n0, &n1);
    if (n0 >= n1) return;
    if (bits == 4)
      kern->dynamic4(a, n0, n1, wq + t * 4 * kq);
    else
      kern->dynamic8(a, n0, n1, wq + t * 4 * kq);
  });
}

}  // namespace

void linear_cpu(const float* x, int64_t m, int64_t k, int64_t ldx, const uint8_t* codes, int bits,
                const float* codebook, int64_t n_clusters, bool per_row, const float* bias,
                int64_t n, float* y, bool dynamic) {
  PK_CHECK_ARG(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  PK_CHECK_ARG(m >= 0 && n >= 0 && k >= 0, "negative linear size");
  PK_CHECK_ARG(ldx >= k, "x: row stride ", ldx, " is smaller than the row length ", k);
  const int64_t most = bits == 4 ? kMaxClusters4 : kMaxClusters;
  PK_CHECK_ARG(n_clusters >= 1 && n_clusters <= most, "n_clusters must be in [1, ", most, "] for ",
               bits, "-bit codes, got ", n_clusters);
  if (m == 0 || n == 0) return;
  PK_CHECK_ARG(x && codes && codebook && y, "x, codes, codebook and y must not be null");
  const Kernels* kern = kernels();
  if (dynamic) {
    PK_CHECK_ARG(k < kMaxK, "K = ", k, " could overflow int32 accumulation (limit ", kMaxK, ")");
    run_dynamic(kern, x, m, k, ldx, codes, bits, codebook, n_clusters, per_row, bias, n, y);
    return;
  }
  const Args a{.x = x,
               .m = m,
               .k = k,
               .ldx = ldx,
               .codes = codes,
               .code_ld = code_row_bytes(k, bits),
               .codebook = codebook,
               .cb_ld = per_row ? n_clusters : 0,
               .nc = n_clusters,
               .bias = bias,
               .n = n,
               .y = y};
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
