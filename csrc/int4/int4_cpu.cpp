// int4 driver: checks, the float / int8 forms of x the kernels read, the
// split over output columns between threads, and the table of the active ISA.
#include <algorithm>
#include <atomic>
#include <vector>

#include "../common/checks.h"
#include "../common/half.h"
#include "../common/isa_pick.h"
#include "../common/parallel.h"
#include "../common/scratch.h"
#include "../int8/int8.h"
#include "int4_isa.h"

namespace pk {
namespace int4 {
namespace {

const Kernels* kernels() {
  static const IsaPick<Kernels> pick({.portable = &kernels_portable,
                                      .avx2 = PK_ISA_AVX2(&kernels_avx2),
                                      .avx512_vnni = PK_ISA_AVX512(&kernels_avx512_vnni)});
  return pick();
}

float load_f(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::f16:
      return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::bf16:
      return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

Weight check(int64_t m, int64_t k, int64_t ldx, const void* x, const uint8_t* packed,
             const float* scales, const uint8_t* zeros, int64_t group, int64_t n, void* y) {
  PK_CHECK_ARG(m >= 0 && n >= 0 && k >= 0, "negative linear size");
  PK_CHECK_ARG(group == 32 || group == 64 || group == 128, "group_size must be 32, 64 or 128, got ",
               group);
  PK_CHECK_ARG(k % group == 0, "group_size = ", group, " must divide K = ", k);
  PK_CHECK_ARG(ldx >= k, "x: row stride ", ldx, " is smaller than the row length ", k);
  PK_CHECK_ARG(m * n == 0 || (x && packed && scales && zeros && y),
               "x, packed, scales, zeros and y must not be null");
  // A zero point past 15 would make the kernels disagree (the SIMD ones read
  // it as a float, the reference as the format's nibble range).
  const int64_t cells = n * (k / group);
  uint8_t top = 0;
  for (int64_t i = 0; i < cells; ++i) top = std::max(top, zeros[i]);
  PK_CHECK_ARG(top <= 15, "zeros must lie in 0..15, got ", int(top));
  return Weight{packed, scales, zeros, n, k, group};
}

}  // namespace

void linear_weight_only_cpu(const void* x, DType xt, int64_t m, int64_t k, int64_t ldx,
                            const uint8_t* packed, const float* scales, const uint8_t* zeros,
                            int64_t group, const float* bias, int64_t n, void* y, DType yt) {
  const Weight w = check(m, k, ldx, x, packed, scales, zeros, group, n, y);
  if (m == 0 || n == 0) return;
  const Kernels* kern = kernels();
  // Each row of x in float32, ordered so that the nibbles of the weight's
  // bytes, as the ISA's kernel unpacks them, meet their columns at unit
  // stride (XLayout).
  float* xd = scratch<float>(0, m * k);
  const int64_t half = k / 2;
  if (kern->x_layout == XLayout::nibble_chunks) {
    for (int64_t i = 0; i < m; ++i) {
      const int64_t t0 = i / kXTile * kXTile, mt = std::min(kXTile, m - t0);
      for (int64_t c0 = 0; c0 < k; c0 += 128) {
        const int64_t w = std::min<int64_t>(128, k - c0), d = w / 8;
        float* o = xd + t0 * k + c0 * mt + (i - t0) * w;
        for (int64_t dw = 0; dw < d; ++dw)
          for (int64_t p = 0; p < 8; ++p) o[p * d + dw] = load_f(x, xt, i * ldx + c0 + 8 * dw + p);
      }
    }
  } else {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < half; ++j) {
        xd[i * k + j] = load_f(x, xt, i * ldx + 2 * j);
        xd[i * k + half + j] = load_f(x, xt, i * ldx + 2 * j + 1);
      }
  }
  // Tasks of 64 output columns (32 KiB of weight at K = 1024 .. 256 KiB at
  // 8192) taken in turn: a thread the OS preempts holds up one task, not
  // half the call.
  const int64_t tasks = (n + 63) / 64;
  const int nt =
      std::max(1, int(std::min<int64_t>(threads_for(m * n * k, int64_t(1) << 18), tasks)));
  std::atomic<int64_t> next{0};
  parallel_for(0, nt, nt, [&](int) {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < tasks;)
      kern->weight_only(xd, m, w, bias, y, yt, t * 64, std::min(n, t * 64 + 64));
  });
}

void linear_dynamic_cpu(const void* x, DType xt, int64_t m, int64_t k, int64_t ldx,
                        const uint8_t* packed, const float* scales, const uint8_t* zeros,
                        int64_t group, const float* bias, int64_t n, void* y, DType yt) {
  const Weight w = check(m, k, ldx, x, packed, scales, zeros, group, n, y);
  if (m == 0 || n == 0) return;
  const Kernels* kern = kernels();
  // x in float32 (when it is not already), quantized exactly as int8's
  // per-row quantization does, then reordered with its group sums.
  const float* xf = static_cast<const float*>(x);
  int64_t ldf = ldx;
  std::vector<float> conv;
  if (xt != DType::f32) {
    conv.resize(size_t(m * k));
    for (int64_t i = 0; i < m; ++i)
      for (int64_t p = 0; p < k; ++p) conv[i * k + p] = load_f(x, xt, i * ldx + p);
    xf = conv.data();
    ldf = k;
  }
  std::vector<int8_t> q(size_t(m * k)), qr(size_t(m * k));
  std::vector<float> ascale(static_cast<size_t>(m));
  std::vector<int32_t> asum(size_t(m * (k / group)));
  int8::quantize_per_row_cpu(xf, m, k, ldf, q.data(), ascale.data());
  const int ntp = threads_for(m * k, int64_t(1) << 15);
  parallel_for(0, ntp, ntp, [&](int t) {
    int64_t r0, r1;
    split_range(m, ntp, t, 1, &r0, &r1);
    if (r0 < r1) kern->prepare(q.data(), k, group, qr.data(), asum.data(), r0, r1);
  });
  const Act a{qr.data(), ascale.data(), asum.data()};
  const int64_t blocks = (n + 31) / 32;
  const int nt =
      std::max(1, int(std::min<int64_t>(threads_for(m * n * k, int64_t(1) << 18), blocks)));
  const int64_t per = scratch_bytes(k, group);
  uint8_t* buf = scratch<uint8_t>(1, per * nt);
  // Tasks of a 32-column block over a chunk of rows, taken in turn (see
  // weight-only); rows go in chunks only when there are many of them, as
  // each task decodes its block of the weight once.
  const int64_t rows = m >= 256 ? 128 : m, tasks = blocks * ((m + rows - 1) / rows);
  std::atomic<int64_t> next{0};
  parallel_for(0, nt, nt, [&](int t) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      const int64_t r0 = (i / blocks) * rows, b = i % blocks;
      kern->dynamic(a, w, bias, y, yt, r0, std::min(m, r0 + rows), b * 32, std::min(n, b * 32 + 32),
                    buf + t * per);
    }
  });
}

}  // namespace int4
}  // namespace pk
