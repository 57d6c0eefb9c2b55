// CPU attention driver: argument checks, threads over (batch, head, query
// chunk) tasks, per-thread scratch, the ISA table chosen per call.
#include <algorithm>
#include <atomic>

#include "../common/checks.h"
#include "../common/isa_pick.h"
#include "../common/parallel.h"
#include "../common/scratch.h"
#include "attention.h"
#include "attention_isa.h"

namespace pk {
namespace attention {

namespace {

const Kernels* kernels() {
  static const IsaPick<Kernels> pick({.portable = &kernels_portable,
                                      .avx2 = PK_ISA_AVX2(&kernels_avx2),
                                      .avx512 = PK_ISA_AVX512(&kernels_avx512)});
  return pick();
}

}  // namespace

void attention_f32_cpu(const Problem& p) {
  PK_CHECK_ARG(p.batch >= 0 && p.heads >= 0 && p.sq >= 0 && p.sk >= 0 && p.d >= 0 && p.dv >= 0,
               "negative size");
  const int64_t pairs = p.batch * p.heads;
  if (pairs == 0 || p.sq == 0 || p.dv == 0) return;
  PK_CHECK_ARG(p.out, "out must not be null");
  PK_CHECK_ARG(p.sk == 0 || (p.q && p.k && p.v), "q, k and v must not be null");
  const Kernels* kern = kernels();
  const int64_t scratch_n = kern->scratch_floats(p);
  // Whole heads make the tasks where there are enough of them (each packs its
  // keys once); otherwise query chunks of the same head, each packing again.
  const int want = 4 * max_threads();
  int64_t chunks = 1;
  if (pairs < want) chunks = std::min<int64_t>((want + pairs - 1) / pairs, (p.sq + 63) / 64);
  chunks = std::max<int64_t>(chunks, 1);
  const int64_t rows_per = (p.sq + chunks - 1) / chunks;
  const int64_t tasks = pairs * chunks;
  const int64_t work = pairs * p.sq * std::max<int64_t>(p.sk, 1) * (p.d + p.dv + 8);
  const int nt = int(std::min<int64_t>(threads_for(work, int64_t(1) << 18), tasks));
  // Tasks come from a shared counter rather than fixed shares: on a busy
  // host a thread the OS preempts then holds the call up by the task it is
  // in, not by its whole share (each task is tens of microseconds).
  std::atomic<int64_t> next{0};
  parallel(std::max(nt, 1), [&](int) {
    float* s = scratch<float>(0, scratch_n);
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      const int64_t pair = t / chunks, c = t % chunks;
      const int64_t i0 = c * rows_per, i1 = std::min(p.sq, i0 + rows_per);
      if (i0 < i1) kern->head(p, pair / p.heads, pair % p.heads, i0, i1, s);
    }
  });
}

}  // namespace attention
}  // namespace pk
