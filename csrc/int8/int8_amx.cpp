// AMX-INT8 packed GEMM. The packed weight layout (int8.h) already is the
// VNNI-4 layout a B tile wants: a 64-byte group (16 output channels x 4 k)
// is one tile row, and the groups of one panel lie gs = 64 * nv bytes apart,
// which a tile load takes as its row stride. So the tiles read the very
// weights and unsigned activations (a + 128) the AVX-512 VNNI kernel reads,
// and TDPBUSD is vpdpbusd's arithmetic (u8 x s8, int32 sums that wrap): comp
// is subtracted as there and the results are bit-identical, -128 in either
// operand included (a + 128 is then 0). New here: gemm_packed, and gemm_bt
// for int8_gemm (b read in place, see below); the rest of the table is the
// AVX-512 VNNI one.
#include <immintrin.h>

#include "int8_avx512_epilogue.h"
#include "int8_generic.h"

namespace pk {
namespace int8 {
namespace {

// Palette 1: 8 tiles of up to 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// A 32 x 32 block of c in four accumulator tiles (two row halves i of 16,
// two panels j of 16 columns); each 64-byte step of k loads two tiles of a
// and two of b for four TDPBUSD: C[i][j] += A[i] . B[j].
enum : int { kC00 = 0, kC01 = 1, kC10 = 2, kC11 = 3, kA0 = 4, kA1 = 5, kB0 = 6, kB1 = 7 };
constexpr int kBlockRows = 32;

// r0 / r1 rows in the two row halves (r1 may be 0: those tiles go unused).
// A tile with fewer rows loads and stores only those, so the M tail never
// reads or writes past the rows it owns.
void configure(int r0, int r1) {
  TileConfig cfg;
  __builtin_memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  auto set = [&](int t, int rows) {
    cfg.rows[t] = uint8_t(rows);
    cfg.colsb[t] = rows ? 64 : 0;
  };
  set(kC00, r0);
  set(kC01, r0);
  set(kA0, r0);
  set(kC10, r1);
  set(kC11, r1);
  set(kA1, r1);
  set(kB0, 16);
  set(kB1, 16);
  _tile_loadconfig(&cfg);
}

// Tiles over the first kfull bytes of k (a multiple of 64), then stored to
// buf (32 x 32 int32, row stride 128 bytes). GCC's tile intrinsics paste
// their tile number into the instruction text, so they take literals, in the
// numbering of the enum above: 0..3 C00 C01 C10 C11, 4, 5 A0 A1, 6, 7 B0 B1.
// Next holds the groups [q0, q1) of the next panel pair to prefetch into L2
// while this block computes: spread over the blocks of rows that reuse one
// pair, the next pair's weights arrive from memory in the background instead
// of stalling its first tile loads.
struct Prefetch {
  const int8_t* b;  // null: nothing to prefetch
  int64_t gs, q0, q1;
};

// The three parts both tile kernels share, on up to 2 x 2 accumulators.
template <bool TwoM, bool TwoN>
inline void zero_block() {
  _tile_zero(0);
  if (TwoN) _tile_zero(1);
  if (TwoM) _tile_zero(2);
  if (TwoM && TwoN) _tile_zero(3);
}

// One step of 64 k: A tiles from a0 and a1 (row stride lda), B tiles from bk
// and bk + 64 (row stride gs); u8 x s8 (TDPBUSD) or, Signed, s8 x s8 (TDPBSSD).
template <bool TwoM, bool TwoN, bool Signed>
inline void block_step(const void* a0, const void* a1, int64_t lda, const int8_t* bk, int64_t gs) {
  _tile_loadd(4, a0, lda);
  _tile_loadd(6, bk, gs);
  if (Signed)
    _tile_dpbssd(0, 4, 6);
  else
    _tile_dpbusd(0, 4, 6);
  if (TwoN) {
    _tile_loadd(7, bk + 64, gs);
    if (Signed)
      _tile_dpbssd(1, 4, 7);
    else
      _tile_dpbusd(1, 4, 7);
  }
  if (TwoM) {
    _tile_loadd(5, a1, lda);
    if (Signed)
      _tile_dpbssd(2, 5, 6);
    else
      _tile_dpbusd(2, 5, 6);
    if (TwoN) {
      if (Signed)
        _tile_dpbssd(3, 5, 7);
      else
        _tile_dpbusd(3, 5, 7);
    }
  }
}

// The accumulators to buf (32 x 32 int32, row stride 128 bytes).
template <bool TwoM, bool TwoN>
inline void store_block(int32_t* buf) {
  _tile_stored(0, buf, 128);
  if (TwoN) _tile_stored(1, buf + 16, 128);
  if (TwoM) _tile_stored(2, buf + 16 * 32, 128);
  if (TwoM && TwoN) _tile_stored(3, buf + 16 * 32 + 16, 128);
}

template <bool TwoM, bool TwoN>
void tile_block(const uint8_t* a, int64_t lda, const int8_t* b, int64_t gs, int64_t kfull,
                int32_t* buf, const Prefetch& pf) {
  const int64_t steps = kfull / 64;
  const int64_t per = pf.b && steps > 0 ? (pf.q1 - pf.q0 + steps - 1) / steps : 0;
  int64_t pq = pf.q0;
  zero_block<TwoM, TwoN>();
  const uint8_t* a1 = a + 16 * lda;
  for (int64_t kc = 0; kc < kfull; kc += 64) {
    const int8_t* bk = b + (kc / 4) * gs;  // 16 groups of 4 k per step
    for (const int64_t e = pq + per < pf.q1 ? pq + per : pf.q1; pq < e; ++pq) {
      _mm_prefetch(reinterpret_cast<const char*>(pf.b + pq * pf.gs), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(pf.b + pq * pf.gs + 64), _MM_HINT_T1);
    }
    block_step<TwoM, TwoN, false>(a + kc, a1 + kc, lda, bk, gs);
  }
  store_block<TwoM, TwoN>(buf);
}

inline __m512i bcast4(const uint8_t* p) {
  uint32_t v;
  __builtin_memcpy(&v, p, 4);
  return _mm512_set1_epi32(int(v));
}

// The k past kfull (fewer than 16 groups: a tile step would need a second
// tile configuration, which would zero the accumulators) with vpdpbusd,
// then comp and the epilogue.
// fp32 output too large for the caches: whole 64-byte lines go straight to
// memory (no read for ownership of lines that are about to be overwritten).
inline bool stream_out(const PackedGemm& g, int64_t row, int64_t col, __m512i acc) {
  float* dst = static_cast<float*>(g.c) + row * g.ldc + col;
  if (reinterpret_cast<uintptr_t>(dst) & 63) return false;
  __m512 v = _mm512_mul_ps(
      _mm512_cvtepi32_ps(acc),
      _mm512_mul_ps(_mm512_set1_ps(g.a_scale[row]), _mm512_loadu_ps(g.b_scale + col)));
  if (g.bias) v = _mm512_add_ps(v, _mm512_loadu_ps(g.bias + col));
  _mm512_stream_ps(dst, v);
  return true;
}

void finish(const PackedGemm& g, const uint8_t* a, int64_t row0, int rows, int64_t p, int np2,
            const int8_t* b, int64_t gs, int64_t kfull, const int32_t* buf, bool stream) {
  const int64_t groups = g.kp / 4;
  for (int j = 0; j < np2; ++j) {
    const int64_t col = (p + j) * 16, left = g.n - col;
    const __mmask16 m = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
    const __m512i comp = _mm512_loadu_si512(g.comp + col);
    const int8_t* bj = b + 64 * j;
    for (int i = 0; i < rows; ++i) {
      __m512i acc = _mm512_loadu_si512(buf + i * 32 + 16 * j);
      const uint8_t* ar = a + i * g.lda;
      for (int64_t q = kfull / 4; q < groups; ++q)
        acc = _mm512_dpbusd_epi32(acc, bcast4(ar + 4 * q), _mm512_loadu_si512(bj + q * gs));
      acc = _mm512_sub_epi32(acc, comp);
      if (!(stream && left >= 16 && stream_out(g, row0 + i, col, acc)))
        store_vec(g, row0 + i, col, acc, m);
    }
  }
}

// Rows of a per chunk: the chunk (rows x kp bytes) stays in L2 while every
// panel pair of the call streams past it, and each pair's weights are then
// read from memory once per chunk, not once per 32 rows.
constexpr int64_t kChunkBytes = int64_t(512) << 10;
// Output of one call from which fp32 results bypass the caches.
constexpr int64_t kStreamBytes = int64_t(8) << 20;

void gemm_packed(const PackedGemm& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1) {
  const int64_t np = packed_n(g.n), kp = g.kp, kfull = kp / 64 * 64;
  int64_t chunk = kChunkBytes / (kp > 0 ? kp : 1) / kBlockRows * kBlockRows;
  if (chunk < kBlockRows) chunk = kBlockRows;
  alignas(64) int32_t buf[kBlockRows * 32];
  if (kfull == 0) __builtin_memset(buf, 0, sizeof buf);
  int cur0 = -1, cur1 = -1;
  const bool stream = g.a_scale && g.yt == DType::f32 && (m1 - m0) * g.n * 4 >= kStreamBytes;
  for (int64_t c0 = m0; c0 < m1; c0 += chunk) {
    const int64_t c1 = m1 - c0 < chunk ? m1 : c0 + chunk;
    // p0 is a multiple of 4, so p and p + 1 lie in one block of panels.
    for (int64_t p = p0; p < p1; p += 2) {
      int64_t gs;
      const int8_t* b = panel_base(g.b, kp, np, p, &gs);
      const bool two_n = p + 1 < p1;
      Prefetch pf{nullptr, 0, 0, 0};
      if (p + 2 < p1) pf.b = panel_base(g.b, kp, np, p + 2, &pf.gs);
      const int64_t nblk = (c1 - c0 + kBlockRows - 1) / kBlockRows, groups = kp / 4;
      for (int64_t i0 = c0; i0 < c1; i0 += kBlockRows) {
        const int64_t bi = (i0 - c0) / kBlockRows;
        pf.q0 = groups * bi / nblk;
        pf.q1 = groups * (bi + 1) / nblk;
        const int rows = int(c1 - i0 < kBlockRows ? c1 - i0 : kBlockRows);
        const uint8_t* a = g.a + i0 * g.lda;
        if (kfull > 0) {
          const int r0 = rows < 16 ? rows : 16, r1 = rows - r0;
          if (r0 != cur0 || r1 != cur1) {
            configure(r0, r1);
            cur0 = r0;
            cur1 = r1;
          }
          if (r1 > 0) {
            if (two_n)
              tile_block<true, true>(a, g.lda, b, gs, kfull, buf, pf);
            else
              tile_block<true, false>(a, g.lda, b, gs, kfull, buf, pf);
          } else {
            if (two_n)
              tile_block<false, true>(a, g.lda, b, gs, kfull, buf, pf);
            else
              tile_block<false, false>(a, g.lda, b, gs, kfull, buf, pf);
          }
        }
        finish(g, a, i0, rows, p, two_n ? 2 : 1, b, gs, kfull, buf, stream);
      }
    }
  }
  if (stream) _mm_sfence();  // streamed lines visible before the caller reads c
  // Back to the init state: the kernel's 8 KiB of tile data is then not
  // saved and restored with this thread at every context switch.
  if (cur0 >= 0) _tile_release();
}

// ---- Row-major b, never packed (int8_gemm) -------------------------------
// c^T = b a^T: 16 rows of b (64 bytes of k each, row stride ldb) are an A
// tile as they lie, and a, packed as a weight, gives the B tiles. Tiles 4, 5
// hold two blocks of 16 rows of b, 6, 7 two panels of a, and C[i][j] (tile
// 2i + j) is rows 16i.. of this block of b against panel j. TDPBSSD
// multiplies signed by signed, so -128 needs no correction. `next` is the
// next block of b, prefetched one step of k at a time while the first panel
// pair streams this one (null: none, or not the first pair).
template <bool TwoR, bool TwoP>
void tile_block_bt(const int8_t* b, int64_t ldb, const int8_t* ap, int64_t gs, int64_t k,
                   int32_t* buf, const int8_t* next, int next_rows) {
  zero_block<TwoR, TwoP>();
  const int8_t* b1 = b + 16 * ldb;
  for (int64_t kc = 0; kc < k; kc += 64) {
    if (next)
      for (int r = 0; r < next_rows; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(next + r * ldb + kc), _MM_HINT_T1);
    const int8_t* pk = ap + (kc / 4) * gs;
    block_step<TwoR, TwoP, true>(b + kc, b1 + kc, ldb, pk, gs);
  }
  store_block<TwoR, TwoP>(buf);
}

void gemm_bt(const int8_t* ap, int64_t m, const int8_t* b, int64_t ldb, int64_t k, int32_t* c,
             int64_t ldc, int64_t n0, int64_t n1) {
  const int64_t mp = packed_n(m), panels = mp / 16;
  alignas(64) int32_t buf[kBlockRows * 32];
  // buf column j (32 rows of b, 128 bytes apart) is row j of c's block.
  const __m512i col =
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(32));
  int cur0 = -1, cur1 = -1;
  for (int64_t n = n0; n < n1; n += kBlockRows) {
    const int rows = int(n1 - n < kBlockRows ? n1 - n : kBlockRows);
    const int r0 = rows < 16 ? rows : 16, r1 = rows - r0;
    if (r0 != cur0 || r1 != cur1) {
      configure(r0, r1);
      cur0 = r0;
      cur1 = r1;
    }
    const int64_t nn = n + kBlockRows;
    const int next_rows = int(n1 - nn <= 0 ? 0 : (n1 - nn < kBlockRows ? n1 - nn : kBlockRows));
    const int8_t* bn = b + n * ldb;
    for (int64_t p = 0; p < panels; p += 2) {
      int64_t gs;
      const int8_t* a = panel_base(ap, k, mp, p, &gs);
      const bool two_p = p + 1 < panels;
      const int8_t* next = p == 0 && next_rows > 0 ? b + nn * ldb : nullptr;
      if (r1 > 0) {
        if (two_p)
          tile_block_bt<true, true>(bn, ldb, a, gs, k, buf, next, next_rows);
        else
          tile_block_bt<true, false>(bn, ldb, a, gs, k, buf, next, next_rows);
      } else {
        if (two_p)
          tile_block_bt<false, true>(bn, ldb, a, gs, k, buf, next, next_rows);
        else
          tile_block_bt<false, false>(bn, ldb, a, gs, k, buf, next, next_rows);
      }
      const __mmask16 lo = __mmask16((1u << r0) - 1), hi = __mmask16((1u << r1) - 1);
      const int64_t mcols = (two_p ? 32 : 16) < m - 16 * p ? (two_p ? 32 : 16) : m - 16 * p;
      for (int64_t j = 0; j < mcols; ++j) {
        int32_t* cr = c + (16 * p + j) * ldc + n;
        _mm512_mask_storeu_epi32(
            cr, lo, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lo, col, buf + j, 4));
        if (r1)
          _mm512_mask_storeu_epi32(
              cr + 16, hi,
              _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), hi, col, buf + 16 * 32 + j, 4));
      }
    }
  }
  if (cur0 >= 0) _tile_release();
}

}  // namespace

const GemmKernels* gemm_kernels_amx() {
  static const GemmKernels table = [] {
    GemmKernels t = *gemm_kernels_avx512_vnni();
    t.gemm_packed = &gemm_packed;
    t.tiles = true;
    t.gemm_bt = &gemm_bt;
    return t;
  }();
  return &table;
}

}  // namespace int8
}  // namespace pk
