// AVX2 int4 kernels. Weight-only: 8 bytes of a weight row widen to 8 dwords;
// their nibbles minus the group's zero are exact small integers in float
// (2^23 + q as float bits, minus 2^23 + zero), summed against x's even and
// odd columns, then times the group's scale. W4A8: vpmaddubsw with the
// nibble codes as its unsigned bytes against the signed int8 activations
// cannot saturate (|pair| <= 2 * 15 * 127, and the low and high nibbles'
// pairs summed <= 4 * 15 * 127 < 2^15), vpmaddwd widens to int32, each
// group's sum less zero * sum(a) (exact in float).
#include <immintrin.h>

#include "int4_generic.h"

namespace pk {
namespace int4 {
namespace {

// The address `off` bytes from p, for prefetches: it may lie past the end of
// the weight (a prefetch never faults), where pointer arithmetic would be
// undefined, so it is done on the integer.
inline const char* byte_at(const void* p, int64_t off) {
  return reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + uintptr_t(off));
}

// ---- weight-only -------------------------------------------------------
// MR rows of x, four FMA chains per row (low/high nibbles of two steps).
template <int MR>
void weight_only_rows(const float* xd, int64_t i0, const Weight& w, const float* bias, void* y,
                      DType yt, int64_t n0, int64_t n1) {
  const int64_t k = w.k, half = k / 2, groups = k / w.group, gb = w.group / 2;
  const __m256i m15 = _mm256_set1_epi32(15), magic = _mm256_set1_epi32(0x4B000000);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.packed + n * half;
    __m256 tot[MR];
    for (int r = 0; r < MR; ++r) tot[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t cell = n * groups + g;
      const __m256 zf = _mm256_set1_ps(8388608.0f + float(w.zeros[cell]));
      __m256 acc[MR][4];
      for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = tot[r] * 0.0f;
      for (int64_t j = g * gb; j < (g + 1) * gb; j += 16) {
        // 8 rows ahead into L2, as the AVX-512 kernel does (one core's
        // hardware prefetcher alone reaches about half the read rate).
        if ((j & 63) == 0) _mm_prefetch(byte_at(row, j + 8 * half), _MM_HINT_T1);
        __m256 wv[4];
        for (int h = 0; h < 2; ++h) {
          const __m256i v =
              _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(row + j + 8 * h)));
          const __m256i lo = _mm256_or_si256(_mm256_and_si256(v, m15), magic);
          const __m256i hi = _mm256_or_si256(_mm256_srli_epi32(v, 4), magic);
          wv[2 * h] = _mm256_sub_ps(_mm256_castsi256_ps(lo), zf);  // q - zero, exact
          wv[2 * h + 1] = _mm256_sub_ps(_mm256_castsi256_ps(hi), zf);
        }
        for (int r = 0; r < MR; ++r) {
          const float* xe = xd + (i0 + r) * k + j;
          const float* xo = xe + half;
          acc[r][0] = _mm256_fmadd_ps(wv[0], _mm256_loadu_ps(xe), acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(xo), acc[r][1]);
          acc[r][2] = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(xe + 8), acc[r][2]);
          acc[r][3] = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xo + 8), acc[r][3]);
        }
      }
      const __m256 s = _mm256_set1_ps(w.scales[cell]);
      for (int r = 0; r < MR; ++r) {
        const __m256 sum =
            _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3]));
        tot[r] = _mm256_fmadd_ps(sum, s, tot[r]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      const __m128 q = _mm_add_ps(_mm256_castps256_ps128(tot[r]), _mm256_extractf128_ps(tot[r], 1));
      const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
      const float v = _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
      store_f(y, yt, (i0 + r) * w.n + n, bias ? v + bias[n] : v);
    }
  }
}

void weight_only(const float* xd, int64_t m, const Weight& w, const float* bias, void* y, DType yt,
                 int64_t n0, int64_t n1) {
  int64_t i = 0;
  for (; i + 2 <= m; i += 2) weight_only_rows<2>(xd, i, w, bias, y, yt, n0, n1);
  if (i < m) weight_only_rows<1>(xd, i, w, bias, y, yt, n0, n1);
}

// ---- W4A8 ----------------------------------------------------------------

inline void transpose8(__m256i r[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x31);
  }
}

struct Avx2 {
  static constexpr int MR = 2;
  // codes[K / 8][low nibbles 128 bytes, high 128]: each 128 bytes the 4
  // groups of 8 channels x 4 codes of 2 panels (see Avx512 for why).
  static constexpr int64_t kCodeBytes = 32;

  static void decode(const Weight& w, int64_t nb, uint8_t* codes) {
    const int64_t half = w.k / 2, chunks = w.k / 8;
    for (int p = 0; p < 2; ++p)
      for (int h = 0; h < 2; ++h)
        for (int64_t c0 = 0; c0 < chunks; c0 += 8) {
          const int64_t rem = chunks - c0 < 8 ? chunks - c0 : 8;
          const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(rem)),
                                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
          __m256i r[8];
          for (int j = 0; j < 8; ++j) {
            const int64_t n = nb + 16 * p + 8 * h + j;
            if (n < w.n) _mm_prefetch(byte_at(w.packed + n * half, 4 * c0 + 512), _MM_HINT_T0);
            r[j] = n < w.n ? _mm256_maskload_epi32((const int*)(w.packed + n * half + 4 * c0), mask)
                           : _mm256_setzero_si256();
          }
          transpose8(r);
          const __m256i m0f = _mm256_set1_epi8(0x0f);
          for (int64_t c = 0; c < rem; ++c) {
            uint8_t* o = codes + (c0 + c) * 256 + 32 * (2 * p + h);
            _mm256_store_si256((__m256i*)o, _mm256_and_si256(r[c], m0f));
            _mm256_store_si256((__m256i*)(o + 128),
                               _mm256_and_si256(_mm256_srli_epi16(r[c], 4), m0f));
          }
        }
  }

  template <int R>
  static void tile(const Act& a, const Block& b, int64_t i0, const float* bias, void* y, DType yt,
                   int64_t n, int64_t nb, int64_t nv) {
    const int64_t k = b.k, groups = k / b.group, cpg = b.group / 8;
    const __m256i ones = _mm256_set1_epi16(1);
    alignas(32) float f[R * 32] = {};
    for (int64_t g = 0; g < groups; ++g) {
      __m256i acc[R][4];
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < 4; ++v) acc[r][v] = _mm256_setzero_si256();
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
        const uint8_t* bp = b.codes + c * 256;
        __m256i lo[4], hi[4];
        for (int v = 0; v < 4; ++v) {
          lo[v] = _mm256_load_si256((const __m256i*)(bp + 32 * v));
          hi[v] = _mm256_load_si256((const __m256i*)(bp + 128 + 32 * v));
        }
        for (int r = 0; r < R; ++r) {
          int32_t l, h;
          std::memcpy(&l, a.q + (i0 + r) * k + 8 * c, 4);
          std::memcpy(&h, a.q + (i0 + r) * k + 8 * c + 4, 4);
          const __m256i al = _mm256_set1_epi32(l), ah = _mm256_set1_epi32(h);
          for (int v = 0; v < 4; ++v) {
            const __m256i p16 =
                _mm256_add_epi16(_mm256_maddubs_epi16(lo[v], al), _mm256_maddubs_epi16(hi[v], ah));
            acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(p16, ones));
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m256 as = _mm256_set1_ps(float(a.asum[(i0 + r) * groups + g]));
        for (int v = 0; v < 4; ++v) {
          float* fp = f + r * 32 + 8 * v;
          const __m256 isum = _mm256_fmadd_ps(_mm256_loadu_ps(b.nz + g * 32 + 8 * v), as,
                                              _mm256_cvtepi32_ps(acc[r][v]));  // exact
          _mm256_store_ps(
              fp, _mm256_fmadd_ps(isum, _mm256_loadu_ps(b.s + g * 32 + 8 * v), _mm256_load_ps(fp)));
        }
      }
    }
    store_tile(a, f, R, i0, bias, y, yt, n, nb, nv);
  }
};

void dynamic(const Act& a, const Weight& w, const float* bias, void* y, DType yt, int64_t m0,
             int64_t m1, int64_t n0, int64_t n1, uint8_t* scratch) {
  dynamic_blocked<Avx2>(a, w, bias, y, yt, m0, m1, n0, n1, scratch);
}

}  // namespace

const Kernels* kernels_avx2() {
  static const Kernels table{
      .weight_only = &weight_only, .dynamic = &dynamic, .prepare = &prepare_generic};
  return &table;
}

}  // namespace int4
}  // namespace pk
