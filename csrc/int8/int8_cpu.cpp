// CPU int8 driver: argument checks, the weight-sum compensation, threading
// over blocks of N (so M = 1 still uses every core), ISA choice per call.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "../common/checks.h"
#include "../common/half.h"
#include "../common/isa_pick.h"
#include "../common/parallel.h"
#include "../common/scratch.h"
#include "int8.h"
#include "int8_grid7.h"
#include "int8_isa.h"

namespace pk {
namespace int8 {

namespace {

// The checks and threading both per-row quantizers share; row(xr, qr, &scale)
// quantizes one row.
template <class Row>
void quantize_rows_cpu(const float* x, int64_t rows, int64_t cols, int64_t ld, int8_t* q,
                       float* scale, Row row) {
  PK_CHECK_ARG(rows >= 0 && cols >= 0, "x: negative shape");
  PK_CHECK_ARG(ld >= cols, "x: row stride ", ld, " is smaller than the row length ", cols);
  PK_CHECK_ARG(rows * cols == 0 || (x && q && scale), "x, q and scale must not be null");
  const int nt = threads_for(rows * cols, int64_t(1) << 15);
  parallel_for(0, rows, nt, [&](int64_t r) { row(x + r * ld, q + r * cols, scale + r); });
}

}  // namespace

void quantize_per_row_cpu(const float* x, int64_t rows, int64_t cols, int64_t ld, int8_t* q,
                          float* scale) {
  quantize_rows_cpu(x, rows, cols, ld, q, scale, [cols](const float* xr, int8_t* qr, float* sr) {
    float amax = 0.0f;
    bool nan = false;
    for (int64_t c = 0; c < cols; ++c) {
      amax = std::max(amax, std::fabs(xr[c]));
      nan |= std::isnan(xr[c]);
    }
    const float s = nan ? NAN : amax / 127.0f;
    *sr = s;
    if (!(s > 0.0f) || std::isinf(s)) {  // zero row, or NaN/inf: q carries no information
      for (int64_t c = 0; c < cols; ++c) qr[c] = 0;
      return;
    }
    for (int64_t c = 0; c < cols; ++c) {
      const float v = std::nearbyint(xr[c] / s);  // round half to even
      qr[c] = int8_t(std::min(127.0f, std::max(-127.0f, v)));
    }
  });
}

void quantize_per_row7_cpu(const float* x, int64_t rows, int64_t cols, int64_t ld, int8_t* q,
                           float* scale) {
  quantize_rows_cpu(x, rows, cols, ld, q, scale, [cols](const float* xr, int8_t* qr, float* sr) {
    float lo = 0.0f, hi = 0.0f;
    bool nan = false;
    for (int64_t c = 0; c < cols; ++c) {
      nan |= std::isnan(xr[c]);
      lo = std::min(lo, xr[c]);
      hi = std::max(hi, xr[c]);
    }
    const Grid7 g = grid7(lo, hi, nan);
    *sr = g.scale;
    for (int64_t c = 0; c < cols; ++c) qr[c] = int8_t(g.usable ? q7(xr[c], g) : 0);
  });
}

#ifndef PK_AMX_MIN_ROWS
#define PK_AMX_MIN_ROWS 8
#endif

#ifndef PK_PACK_MIN_ROWS
#define PK_PACK_MIN_ROWS 24
#endif

namespace {

const GemmKernels* kernels() {
  static const IsaPick<GemmKernels> pick({.portable = &gemm_kernels_portable,
                                          .avx2 = PK_ISA_AVX2(&gemm_kernels_avx2),
                                          .avx512_vnni = PK_ISA_AVX512(&gemm_kernels_avx512_vnni),
                                          .amx = PK_ISA_AMX(&gemm_kernels_amx),
                                          .neon = PK_ISA_NEON(&gemm_kernels_neon),
                                          .dotprod = PK_ISA_DOTPROD(&gemm_kernels_dotprod),
                                          .i8mm = PK_ISA_I8MM(&gemm_kernels_i8mm)});
  return pick();
}

// Below this many rows the AMX table hands a packed GEMM to the AVX-512
// VNNI kernel (same packed weight, same activations, same results): a tile
// of 1..few rows does a full tile's work.
std::atomic<int64_t> g_amx_min_rows{int64_t(PK_AMX_MIN_ROWS)};

const GemmKernels* packed_kernels(const GemmKernels* kern, [[maybe_unused]] int64_t m) {
#ifdef PK_HAVE_AVX512
  if (kern->tiles && m < g_amx_min_rows.load()) return gemm_kernels_avx512_vnni();
#endif
  return kern;
}

// Below this many rows of a, int8_gemm runs on the row-major operands: with
// few rows, packing b would cost more than it saves. Measured crossover here
// (Zen 4, 2 threads): 16 to 32 rows depending on the shape.
constexpr int64_t kPackMinRows = int64_t(PK_PACK_MIN_ROWS);

// Below this many rows of a (K a multiple of 64), AMX's int8_gemm packs a
// and reads b in place (gemm_bt); from here on packing b and streaming a
// past it is faster. PK_AMX_BT_MAX_ROWS overrides it at build time.
#ifndef PK_AMX_BT_MAX_ROWS
#define PK_AMX_BT_MAX_ROWS 512
#endif
constexpr int64_t kBtMaxRows = int64_t(PK_AMX_BT_MAX_ROWS);

// Splits a packed GEMM over threads: blocks of 4 panels (64 columns, the
// width of one register tile) and, when there are fewer blocks than threads,
// chunks of rows too. Each block of b is then streamed by one thread only.
#ifndef PK_A_CHUNK
#define PK_A_CHUNK (256 << 10)
#endif

// A table's fused epilogue, the portable one where the table has none.
auto epilogue_kernel(const GemmKernels* kern) {
  return kern->epilogue ? kern->epilogue : gemm_kernels_portable()->epilogue;
}

// Epilogue::norm over the whole rows of y (M x N, row stride n) after the
// GEMM and its block epilogue: rows are complete only once every block of
// theirs is done, so this is a pass of its own, over rows in L2/L3.
void norm_pass(const GemmKernels* kern, const Epilogue& e, float* y, int64_t m, int64_t n) {
  if (e.norm == Norm::none) return;
  const auto nr = kern->norm_rows ? kern->norm_rows : gemm_kernels_portable()->norm_rows;
  const int nt = std::max(1, int(std::min<int64_t>(threads_for(m * n, int64_t(1) << 15), m)));
  parallel_for(0, nt, nt, [&](int t) {
    int64_t r0, r1;
    split_range(m, nt, t, 1, &r0, &r1);
    if (r0 < r1) nr(e, y, n, r0, r1, n);
  });
}

// Rows of a packed GEMM computed before their fused epilogue runs (a multiple
// of the 6-row register tiles).
constexpr int64_t kEpilogueRows = 48;

// With a non-trivial epilogue (y fp32) each task applies it to the block it
// has just written, while that block is still in the thread's cache.
void run_packed(const GemmKernels* kern, const PackedGemm& g, int64_t m,
                const Epilogue* ep = nullptr) {
  const auto epi = epilogue_kernel(kern);
  kern = packed_kernels(kern, m);
  auto post = [&](int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
    if (ep) epi(*ep, static_cast<float*>(g.c), g.ldc, m0, m1, p0 * 16, std::min(g.n, p1 * 16));
  };
  const int64_t panels = packed_n(g.n) / 16;
  const int64_t nblocks = (panels + 3) / 4;
  const int nt = threads_for(m * panels * 16 * g.kp, int64_t(1) << 19);
  if (kern->tiles) {
    // One call per thread over a contiguous range of blocks and all rows
    // (the tile kernel orders its own loops for cache reuse); rows are
    // split, in multiples of 32, only when blocks are fewer than threads.
    const int64_t mchunks =
        std::max<int64_t>(1, std::min<int64_t>((nt + nblocks - 1) / nblocks, (m + 31) / 32));
    const int64_t bparts = std::min<int64_t>(nblocks, std::max<int64_t>(1, nt / mchunks));
    const int64_t rows = ((m + mchunks - 1) / mchunks + 31) / 32 * 32;
    const int64_t tasks = bparts * mchunks;
    parallel_for(0, tasks, int(tasks), [&](int64_t t) {
      int64_t b0, b1;
      split_range(nblocks, int(bparts), int(t / mchunks), 1, &b0, &b1);
      const int64_t m0 = (t % mchunks) * rows, m1 = std::min(m, m0 + rows);
      if (m0 < m1 && b0 < b1) {
        kern->gemm_packed(g, m0, m1, b0 * 4, std::min(panels, b1 * 4));
        post(m0, m1, b0 * 4, std::min(panels, b1 * 4));
      }
    });
    return;
  }
  // Rows in chunks whose activations (PK_A_CHUNK bytes) stay in L2 while a
  // thread goes through the blocks of b for them; otherwise every block would
  // stream all of a again from L3 (at 4096 x 384, a is 1.5 MiB).
  const int64_t l2_rows =
      std::max<int64_t>(kEpilogueRows, int64_t(PK_A_CHUNK) / std::max<int64_t>(g.lda, 1) /
                                           kEpilogueRows * kEpilogueRows);
  const int64_t mchunks = std::max<int64_t>(
      1, std::min<int64_t>(std::max((nt + nblocks - 1) / nblocks, (m + l2_rows - 1) / l2_rows), m));
  const int64_t tasks = nblocks * mchunks;
  const int64_t rows = (m + mchunks - 1) / mchunks;
  parallel_for(0, tasks, std::max(1, int(std::min<int64_t>(nt, tasks))), [&](int64_t t) {
    const int64_t mc = t / nblocks, blk = t % nblocks;
    const int64_t m0 = mc * rows, m1 = std::min(m, m0 + rows);
    // With an epilogue, rows go in steps whose output block (48 x 64 fp32,
    // 12 KiB) is still in L1 when the epilogue reads it; the block of b stays
    // in L1 across the steps either way.
    const int64_t step = ep ? kEpilogueRows : m1 - m0;
    for (int64_t r = m0; r < m1; r += step) {
      const int64_t e = std::min(m1, r + step);
      kern->gemm_packed(g, r, e, blk * 4, std::min(panels, blk * 4 + 4));
      post(r, e, blk * 4, std::min(panels, blk * 4 + 4));
    }
  });
}

// Quantizes x (M x K) into the kernel's activation format in rows of ldq
// (7-bit when zp is not null: zp[r] written where the table keeps it).
void quantize_rows(const GemmKernels* kern, const void* x, DType xt, int64_t m, int64_t k,
                   int64_t ldx, uint8_t* q, int64_t ldq, float* scale, int32_t* zp) {
  const int nt = std::max(1, int(std::min<int64_t>(threads_for(m * k, int64_t(1) << 15), m)));
  parallel_for(0, nt, nt, [&](int t) {
    int64_t r0, r1;
    split_range(m, nt, t, 1, &r0, &r1);
    if (r0 >= r1) return;
    if (zp)
      kern->quantize_a7(x, xt, ldx, k, q, ldq, scale, zp, r0, r1);
    else
      kern->quantize_a(x, xt, ldx, k, q, ldq, scale, r0, r1);
  });
}

}  // namespace

int64_t set_amx_min_rows(int64_t rows) { return g_amx_min_rows.exchange(rows < 1 ? 1 : rows); }
int64_t amx_min_rows() { return g_amx_min_rows.load(); }

void pack_weight_cpu(const int8_t* w, int64_t n, int64_t k, int64_t ldw, int8_t* packed,
                     int32_t* comp) {
  PK_CHECK_ARG(n >= 0 && k >= 0, "w: negative shape");
  PK_CHECK_ARG(k < kMaxK, "K = ", k, " could overflow int32 accumulation (limit ", kMaxK, ")");
  PK_CHECK_ARG(ldw >= k, "w: row stride ", ldw, " is smaller than the row length ", k);
  if (n == 0) return;
  PK_CHECK_ARG(packed && comp && (k == 0 || w), "w, packed and comp must not be null");
  const GemmKernels* kern = kernels();
  const int64_t panels = packed_n(n) / 16;
  const int nt = std::max(
      1, int(std::min<int64_t>(threads_for(packed_n(n) * packed_k(k), int64_t(1) << 18), panels)));
  parallel_for(0, nt, nt, [&](int t) {
    int64_t p0, p1;
    split_range(panels, nt, t, 1, &p0, &p1);
    if (p0 < p1) kern->pack(w, n, k, ldw, packed, comp, p0, p1);
  });
}

void gemm_s8s8s32_cpu(const int8_t* a, const int8_t* b, int32_t* c, int64_t m, int64_t n, int64_t k,
                      int64_t lda, int64_t ldb, int64_t ldc) {
  PK_CHECK_ARG(m >= 0 && n >= 0 && k >= 0, "negative GEMM size");
  PK_CHECK_ARG(k < kMaxK, "K = ", k, " could overflow int32 accumulation (limit ", kMaxK, ")");
  PK_CHECK_ARG(lda >= k && ldb >= k && ldc >= n, "leading dimensions too small");
  if (m == 0 || n == 0) return;
  PK_CHECK_ARG(c && (k == 0 || (a && b)), "a, b and c must not be null");
  const GemmKernels* kern = kernels();
  if (kern->gemm_bt && k > 0 && k % 64 == 0 && m >= g_amx_min_rows.load() && m < kBtMaxRows) {
    // AMX: c^T = b a^T on tiles with b read in place; only a (the smaller
    // operand here) is packed, O(MK).
    const int64_t mp = packed_n(m);
    int8_t* ap = scratch<int8_t>(0, mp * k);
    pack_weight_cpu(a, m, k, lda, ap, scratch<int32_t>(1, mp));
    const int64_t nblocks = (n + 31) / 32;
    const int nt = int(std::min<int64_t>(threads_for(m * n * k, int64_t(1) << 19), nblocks));
    parallel(nt, [&](int t) {
      int64_t b0, b1;
      split_range(nblocks, nt, t, 1, &b0, &b1);
      if (b0 < b1) kern->gemm_bt(ap, m, b, ldb, k, c, ldc, b0 * 32, std::min(n, b1 * 32));
    });
    return;
  }
  if (m >= kPackMinRows) {
    // Pack b and bias a to unsigned once; the packed kernel then reads both
    // at full width. O(NK + MK) extra work against O(MNK).
    const int64_t kp = packed_k(k);
    int8_t* bp = scratch<int8_t>(0, packed_n(n) * kp);
    int32_t* comp = scratch<int32_t>(1, packed_n(n));
    pack_weight_cpu(b, n, k, ldb, bp, comp);
    const int64_t ldu = scratch_ld(kp);
    uint8_t* au = scratch<uint8_t>(2, m * ldu);
    const int nt = std::max(1, int(std::min<int64_t>(threads_for(m * k, int64_t(1) << 16), m)));
    if (!kern->signed_a) {
      parallel_for(0, m, nt, [&](int64_t i) {
        uint8_t* dst = au + i * ldu;
        const int8_t* src = a + i * lda;
        for (int64_t p = 0; p < k; ++p) dst[p] = uint8_t(src[p]) ^ 0x80;
        for (int64_t p = k; p < ldu; ++p) dst[p] = 128;
      });
      const PackedGemm g{
          .a = au, .lda = ldu, .b = bp, .kp = kp, .comp = comp, .n = n, .c = c, .ldc = ldc};
      run_packed(kern, g, m);
      return;
    }
    // Signed activations must lie in [-127, 127]: a = a' - e with a' = a
    // where a > -128 and -127 where a = -128 (e = 1 there), so c = a' b^T -
    // e b^T. The second product runs over the rows holding -128 only.
    uint8_t* flag = scratch<uint8_t>(3, m);
    parallel_for(0, m, nt, [&](int64_t i) {
      int8_t* dst = reinterpret_cast<int8_t*>(au + i * ldu);
      const int8_t* src = a + i * lda;
      int any = 0;
      for (int64_t p = 0; p < k; ++p) {
        any |= src[p] == -128;
        dst[p] = src[p] == -128 ? int8_t(-127) : src[p];
      }
      for (int64_t p = k; p < ldu; ++p) dst[p] = 0;
      flag[i] = uint8_t(any);
    });
    const PackedGemm g{
        .a = au, .lda = ldu, .b = bp, .kp = kp, .comp = comp, .n = n, .c = c, .ldc = ldc};
    run_packed(kern, g, m);
    std::vector<int64_t> rows;
    for (int64_t i = 0; i < m; ++i)
      if (flag[i]) rows.push_back(i);
    if (rows.empty()) return;
    const int64_t me = int64_t(rows.size());
    // The rows of e overwrite a' (no longer needed); their products go to a
    // fresh buffer, subtracted in wrapping arithmetic (the true result fits).
    for (int64_t r = 0; r < me; ++r) {
      const int8_t* src = a + rows[r] * lda;
      int8_t* dst = reinterpret_cast<int8_t*>(au + r * ldu);
      for (int64_t p = 0; p < k; ++p) dst[p] = int8_t(src[p] == -128);
      for (int64_t p = k; p < ldu; ++p) dst[p] = 0;
    }
    std::vector<int32_t> ce(static_cast<size_t>(me * n));
    const PackedGemm ge{
        .a = au, .lda = ldu, .b = bp, .kp = kp, .comp = comp, .n = n, .c = ce.data(), .ldc = n};
    run_packed(kern, ge, me);
    parallel_for(0, me, std::max(1, int(std::min<int64_t>(nt, me))), [&](int64_t r) {
      int32_t* cr = c + rows[r] * ldc;
      const int32_t* er = ce.data() + r * n;
      for (int64_t j = 0; j < n; ++j) cr[j] = int32_t(uint32_t(cr[j]) - uint32_t(er[j]));
    });
    return;
  }
  // Few rows: the row-major kernel, threads over blocks of 64 columns of c
  // (so a single token still uses every core).
  constexpr int64_t kNb = 64;
  const int64_t nblocks = (n + kNb - 1) / kNb;
  const int nt =
      int(std::min<int64_t>(threads_for(m * n * std::max<int64_t>(k, 1), 1 << 18), nblocks));
  parallel_for(0, nblocks, nt, [&](int64_t blk) {
    kern->gemm(a, b, c, 0, m, blk * kNb, std::min(n, blk * kNb + kNb), k, lda, ldb, ldc);
  });
}

namespace {

// The checks every dynamic linear makes: sizes, K's int32 limit, the row
// stride of its input (`what`: x, or q already quantized).
void check_linear(int64_t m, int64_t n, int64_t k, int64_t ld, const char* what) {
  PK_CHECK_ARG(m >= 0 && n >= 0 && k >= 0, "negative linear size");
  PK_CHECK_ARG(k < kMaxK, "K = ", k, " could overflow int32 accumulation (limit ", kMaxK, ")");
  PK_CHECK_ARG(ld >= k, what, ": row stride ", ld, " is smaller than the row length ", k);
}

// An epilogue's activation code and residual checked against y; whether it
// does anything (then y must be fp32).
bool check_epilogue(const Epilogue& e, DType yt, int64_t n) {
  PK_CHECK_ARG(int32_t(e.act) >= 0 && int32_t(e.act) <= int32_t(Act::silu), "activation code ",
               int32_t(e.act), " is not one of 0..4");
  PK_CHECK_ARG(int32_t(e.norm) >= 0 && int32_t(e.norm) <= int32_t(Norm::rms), "norm code ",
               int32_t(e.norm), " is not one of 0..2");
  PK_CHECK_ARG(e.norm == Norm::none || (e.eps >= 0.0f && e.eps < INFINITY),
               "eps must be finite and >= 0, got ", e.eps);
  PK_CHECK_ARG(!e.gated, "a gated output is linear_dynamic_gated_cpu's");
  const bool fused = e.act != Act::none || e.residual || e.norm != Norm::none;
  PK_CHECK_ARG(!fused || yt == DType::f32, "a fused activation, residual or norm needs fp32 y");
  PK_CHECK_ARG(!e.residual || e.ldr >= n, "residual: row stride ", e.ldr,
               " is smaller than N = ", n);
  return fused;
}

// x quantized per row (8 or 7 bits) into the kernel's activation format, in
// this thread's scratch.
struct QuantizedRows {
  uint8_t* q;
  int64_t ldq;
  float* scale;
  int32_t* zp;  // 7-bit only
};
QuantizedRows quantize_input(const GemmKernels* kern, const void* x, DType xt, int64_t m, int64_t k,
                             int64_t ldx, int act_bits) {
  const int64_t ldq = scratch_ld(packed_k(k));
  QuantizedRows r{scratch<uint8_t>(2, m * ldq), ldq, scratch<float>(0, m),
                  act_bits == 7 ? scratch<int32_t>(3, m) : nullptr};
  quantize_rows(kern, x, xt, m, k, ldx, r.q, ldq, r.scale, r.zp);
  return r;
}

}  // namespace

void linear_dynamic_cpu(const void* x, DType xt, int64_t m, int64_t k, int64_t ldx,
                        const int8_t* packed, const int32_t* comp, const float* w_scale,
                        const float* bias, int64_t n, void* y, DType yt, int act_bits,
                        const Epilogue& epilogue) {
  check_linear(m, n, k, ldx, "x");
  PK_CHECK_ARG(act_bits == 8 || act_bits == 7, "act_bits must be 8 or 7, got ", act_bits);
  const bool fused = check_epilogue(epilogue, yt, n);
  if (m == 0 || n == 0) return;
  PK_CHECK_ARG(x && packed && comp && w_scale && y, "x, weight, scales and y must not be null");
  const GemmKernels* kern = kernels();
  const auto [q, ldq, xs, zp] = quantize_input(kern, x, xt, m, k, ldx, act_bits);
  const PackedGemm g{.a = q,
                     .lda = ldq,
                     .b = packed,
                     .kp = packed_k(k),
                     .comp = comp,
                     .n = n,
                     .c = y,
                     .ldc = n,
                     .a_scale = xs,
                     .b_scale = w_scale,
                     .bias = bias,
                     .yt = yt,
                     .a_zp = zp && kern->a7_zp ? zp : nullptr};
  run_packed(kern, g, m, fused ? &epilogue : nullptr);
  if (fused) norm_pass(kern, epilogue, static_cast<float*>(y), m, n);
}

void linear_dynamic_gated_cpu(const void* x, DType xt, int64_t m, int64_t k, int64_t ldx,
                              const int8_t* packed, const int32_t* comp, const float* w_scale,
                              const float* bias, int64_t n_out, Act act, float* out, int64_t ldo,
                              int act_bits) {
  check_linear(m, n_out, k, ldx, "x");
  PK_CHECK_ARG(act_bits == 8 || act_bits == 7, "act_bits must be 8 or 7, got ", act_bits);
  check_epilogue(Epilogue{.act = act}, DType::f32, n_out);
  PK_CHECK_ARG(ldo >= n_out, "out: row stride ", ldo, " is smaller than N = ", n_out);
  if (m == 0 || n_out == 0) return;
  PK_CHECK_ARG(x && packed && comp && w_scale && out, "x, weight, scales and out must not be null");
  const GemmKernels* kern = kernels();
  const int64_t n2 = gated_rows(n_out);
  const auto [q, ldq, xs, zp] = quantize_input(kern, x, xt, m, k, ldx, act_bits);
  // The 2 x N intermediate for a chunk of rows only (about 8 MiB): each
  // block of it is consumed by the epilogue while still in L1, so only its
  // footprint matters, not its traffic.
  const int64_t rows = std::max<int64_t>(
      kEpilogueRows, (int64_t(8) << 20) / (n2 * 4) / kEpilogueRows * kEpilogueRows);
  float* yc = scratch<float>(1, std::min(rows, m) * n2);
  for (int64_t r0 = 0; r0 < m; r0 += rows) {
    const int64_t mr = std::min(rows, m - r0);
    const PackedGemm g{.a = q + r0 * ldq,
                       .lda = ldq,
                       .b = packed,
                       .kp = packed_k(k),
                       .comp = comp,
                       .n = n2,
                       .c = yc,
                       .ldc = n2,
                       .a_scale = xs + r0,
                       .b_scale = w_scale,
                       .bias = bias,
                       .yt = DType::f32,
                       .a_zp = zp && kern->a7_zp ? zp + r0 : nullptr};
    const Epilogue ep{.act = act, .gated = out + r0 * ldo, .ldg = ldo, .gated_n = n_out};
    run_packed(kern, g, mr, &ep);
  }
}

void linear_dynamic_q8out_cpu(const void* x, DType xt, int64_t m, int64_t k, int64_t ldx,
                              const int8_t* packed, const int32_t* comp, const float* w_scale,
                              const float* bias, int64_t n, Act act, int8_t* q, float* q_scale,
                              int act_bits) {
  check_linear(m, n, k, ldx, "x");
  PK_CHECK_ARG(act_bits == 8 || act_bits == 7, "act_bits must be 8 or 7, got ", act_bits);
  const Epilogue ep{.act = act};
  check_epilogue(ep, DType::f32, n);
  if (m == 0 || n == 0) return;
  PK_CHECK_ARG(x && packed && comp && w_scale && q && q_scale,
               "x, weight, scales and q must not be null");
  const GemmKernels* kern = kernels();
  const int64_t kp = packed_k(k);
  const auto [qa, ldq, xs, zp] = quantize_input(kern, x, xt, m, k, ldx, act_bits);
  // Row chunks over all of N: a chunk's fp32 rows (kRows x N) stay in the
  // thread's L2 from the GEMM through the activation to the quantization.
  // AMX tiles want other calls (run_packed); they take the VNNI kernel here.
  const GemmKernels* gk = kern;
#ifdef PK_HAVE_AVX512
  if (gk->tiles) gk = gemm_kernels_avx512_vnni();
#endif
  const auto epi = epilogue_kernel(kern);
  constexpr int64_t kRows = 48;
  const int64_t chunks = (m + kRows - 1) / kRows, panels = packed_n(n) / 16;
  const int nt =
      int(std::min<int64_t>(threads_for(m * n * std::max<int64_t>(k, 1), 1 << 19), chunks));
  parallel_for(0, chunks, std::max(nt, 1), [&](int64_t c) {
    const int64_t r0 = c * kRows, rows = std::min(kRows, m - r0);
    float* yc = scratch<float>(1, kRows * n);
    const PackedGemm g{.a = qa + r0 * ldq,
                       .lda = ldq,
                       .b = packed,
                       .kp = kp,
                       .comp = comp,
                       .n = n,
                       .c = yc,
                       .ldc = n,
                       .a_scale = xs + r0,
                       .b_scale = w_scale,
                       .bias = bias,
                       .yt = DType::f32,
                       .a_zp = zp && gk->a7_zp ? zp + r0 : nullptr};
    for (int64_t p = 0; p < panels; p += 4) {  // the activation while a block is in L1
      gk->gemm_packed(g, 0, rows, p, std::min(panels, p + 4));
      epi(ep, yc, n, 0, rows, p * 16, std::min(n, p * 16 + 64));
    }
    // The table's quantizer (quantize_per_row's arithmetic) in its own
    // activation format, then plain int8.
    uint8_t* qr = reinterpret_cast<uint8_t*>(q + r0 * n);
    kern->quantize_a(yc, DType::f32, n, n, qr, n, q_scale + r0, 0, rows);
    if (!kern->signed_a)
      for (int64_t i = 0; i < rows * n; ++i) qr[i] ^= 0x80;
  });
}

void linear_prequantized_cpu(const int8_t* q, const float* x_scale, int64_t m, int64_t k,
                             int64_t ldq_in, const int8_t* packed, const int32_t* comp,
                             const float* w_scale, const float* bias, int64_t n, void* y, DType yt,
                             const Epilogue& epilogue) {
  check_linear(m, n, k, ldq_in, "q");
  const bool fused = check_epilogue(epilogue, yt, n);
  if (m == 0 || n == 0) return;
  PK_CHECK_ARG(q && x_scale && packed && comp && w_scale && y,
               "q, scales, weight and y must not be null");
  const GemmKernels* kern = kernels();
  const int64_t kp = packed_k(k), ldq = scratch_ld(kp);
  uint8_t* qa = scratch<uint8_t>(2, m * ldq);
  // Into the kernel's activation format: signed as is, or biased to unsigned.
  const uint8_t flip = kern->signed_a ? 0 : 0x80;
  std::atomic<bool> bad{false};
  const int nt = std::max(1, int(std::min<int64_t>(threads_for(m * k, int64_t(1) << 16), m)));
  parallel_for(0, m, nt, [&](int64_t i) {
    const int8_t* src = q + i * ldq_in;
    uint8_t* dst = qa + i * ldq;
    uint8_t any = 0;
    for (int64_t p = 0; p < k; ++p) {
      any |= uint8_t(src[p] == -128);
      dst[p] = uint8_t(src[p]) ^ flip;
    }
    for (int64_t p = k; p < ldq; ++p) dst[p] = flip;
    if (any) bad.store(true, std::memory_order_relaxed);
  });
  PK_CHECK_ARG(!bad.load(), "q: values must lie in [-127, 127] (quantize_per_row's range)");
  const PackedGemm g{.a = qa,
                     .lda = ldq,
                     .b = packed,
                     .kp = kp,
                     .comp = comp,
                     .n = n,
                     .c = y,
                     .ldc = n,
                     .a_scale = x_scale,
                     .b_scale = w_scale,
                     .bias = bias,
                     .yt = yt};
  run_packed(kern, g, m, fused ? &epilogue : nullptr);
  if (fused) norm_pass(kern, epilogue, static_cast<float*>(y), m, n);
}

void linear_weight_only_cpu(const void* x, DType xt, int64_t m, int64_t k, int64_t ldx,
                            const int8_t* w, const float* w_scale, const float* bias, int64_t n,
                            void* y, DType yt) {
  PK_CHECK_ARG(m >= 0 && n >= 0 && k >= 0, "negative linear size");
  PK_CHECK_ARG(ldx >= k, "x: row stride ", ldx, " is smaller than the row length ", k);
  if (m == 0 || n == 0) return;
  PK_CHECK_ARG(x && w && w_scale && y, "x, weight, scales and y must not be null");
  const GemmKernels* kern = kernels();
  // The kernel reads fp32 rows of length k; other inputs are widened once
  // (M is small on this path, so the copy is cheap next to the weight).
  std::vector<float> xf;
  const float* xp = static_cast<const float*>(x);
  if (xt != DType::f32 || ldx != k) {
    xf.resize(static_cast<size_t>(m * k));
    for (int64_t i = 0; i < m; ++i)
      for (int64_t p = 0; p < k; ++p) {
        const int64_t o = i * ldx + p;
        const auto* h = static_cast<const uint16_t*>(x);
        xf[i * k + p] = xt == DType::f32   ? static_cast<const float*>(x)[o]
                        : xt == DType::f16 ? f16_to_f32(h[o])
                                           : bf16_to_f32(h[o]);
      }
    xp = xf.data();
  }
  const int nt =
      std::max(1, int(std::min<int64_t>(threads_for(m * n * k, int64_t(1) << 18), (n + 63) / 64)));
  float* wf = scratch<float>(1, int64_t(nt) * 4 * k);  // each thread's fp32 weight rows
  parallel_for(0, nt, nt, [&](int t) {
    int64_t n0, n1;
    split_range(n, nt, t, 4, &n0, &n1);
    if (n0 < n1) kern->weight_only(xp, m, k, w, w_scale, bias, y, yt, n, n0, n1, wf + t * 4 * k);
  });
}

}  // namespace int8
}  // namespace pk
