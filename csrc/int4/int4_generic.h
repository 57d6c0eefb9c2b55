// The int4 kernels written once in plain C++ and compiled per ISA file with
// that file's flags: the portable table is all of it; the AVX2 and AVX-512
// files take the activation preparation and the blocking of the W4A8 GEMM
// from here and supply their own inner kernels. Everything is in an
// anonymous namespace: each ISA file gets its own copy and no flagged copy
// can leak into another file.
#pragma once
#include <cstdint>
#include <cstring>

#include "../common/half.h"
#include "int4_isa.h"

namespace pk {
namespace int4 {
namespace {

inline void store_f(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::f16:
      static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
      break;
    case DType::bf16:
      static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
      break;
    default:
      static_cast<float*>(p)[i] = v;
  }
}

// Act's reorder (0, 2, 4, 6, 1, 3, 5, 7 within every 8 codes) and group sums.
[[maybe_unused]] void prepare_generic(const int8_t* q, int64_t k, int64_t group, int8_t* out,
                                      int32_t* asum, int64_t r0, int64_t r1) {
  const int64_t groups = k / group;
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* qr = q + r * k;
    int8_t* o = out + r * k;
    for (int64_t c = 0; c < k; c += 8)
      for (int i = 0; i < 4; ++i) {
        o[c + i] = qr[c + 2 * i];
        o[c + 4 + i] = qr[c + 2 * i + 1];
      }
    for (int64_t g = 0; g < groups; ++g) {
      int32_t s = 0;
      for (int64_t p = 0; p < group; ++p) s += qr[g * group + p];
      asum[r * groups + g] = s;
    }
  }
}

// Weight-only over the format as it is: per group, the exact integers
// q - zero times x summed in float32, then times the group's scale.
[[maybe_unused]] void weight_only_generic(const float* xd, int64_t m, const Weight& w,
                                          const float* bias, void* y, DType yt, int64_t n0,
                                          int64_t n1) {
  const int64_t k = w.k, half = k / 2, groups = k / w.group, gb = w.group / 2;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.packed + n * half;
    for (int64_t i = 0; i < m; ++i) {
      const float* xe = xd + i * k;
      const float* xo = xe + half;
      float total = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        const float z = float(w.zeros[n * groups + g]);
        float acc = 0.0f;
        for (int64_t j = g * gb; j < (g + 1) * gb; ++j) {
          acc += xe[j] * (float(row[j] & 15) - z);
          acc += xo[j] * (float(row[j] >> 4) - z);
        }
        total += acc * w.scales[n * groups + g];
      }
      store_f(y, yt, i * w.n + n, bias ? total + bias[n] : total);
    }
  }
}

// W4A8 over the format as it is, one output at a time.
[[maybe_unused]] void dynamic_generic(const Act& a, const Weight& w, const float* bias, void* y,
                                      DType yt, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                                      uint8_t*) {
  const int64_t k = w.k, half = k / 2, groups = k / w.group, gb = w.group / 2;
  for (int64_t i = m0; i < m1; ++i) {
    const int8_t* ar = a.q + i * k;
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = w.packed + n * half;
      float acc = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        int32_t dot = 0;
        // Byte 4c + b holds columns 8c + 2b and 8c + 2b + 1, whose codes the
        // reorder put at 8c + b and 8c + 4 + b.
        for (int64_t j = g * gb; j < (g + 1) * gb; ++j) {
          const int64_t c = j / 4, b = j % 4;
          dot += int32_t(row[j] & 15) * ar[8 * c + b] + int32_t(row[j] >> 4) * ar[8 * c + 4 + b];
        }
        const int32_t z = w.zeros[n * groups + g];
        const int32_t isum = dot - z * a.asum[i * groups + g];
        acc += float(isum) * w.scales[n * groups + g];
      }
      const float v = acc * a.scale[i];
      store_f(y, yt, i * w.n + n, bias ? v + bias[n] : v);
    }
  }
}

// ---- The W4A8 blocking the SIMD files share -----------------------------
// Rows go in chunks whose activations stay in L2 (about 256 KiB); for each
// chunk, each block of 32 output channels is decoded once into the thread's
// scratch (Isa::decode: codes transposed so that a 64-byte vector holds 16
// channels x 4 bytes, i.e. 8 codes of each; the block's scales and negated
// zero points as [group][32] floats) and every row tile of the chunk runs
// over it (Isa::tile). A tile's group sum is float(sum a q) - zero * asum
// in one fused multiply-add, exact: both terms and the result are integers
// of magnitude below 15 * 127 * 128 < 2^24.
struct Block {
  const uint8_t* codes;  // k * Isa::kCodeBytes bytes, in the ISA's order
  const float* s;        // [groups][32]
  const float* nz;       // [groups][32]
  int64_t k, group;
};

inline uint8_t* align64(uint8_t* p) {
  return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

template <class Isa>
void dynamic_blocked(const Act& a, const Weight& w, const float* bias, void* y, DType yt,
                     int64_t m0, int64_t m1, int64_t n0, int64_t n1, uint8_t* scratch) {
  const int64_t k = w.k, groups = k / w.group;
  uint8_t* codes = align64(scratch);
  float* s = reinterpret_cast<float*>(codes + k * Isa::kCodeBytes);
  float* nz = s + groups * 32;
  const Block blk{codes, s, nz, k, w.group};
  int64_t chunk = (int64_t(256) << 10) / (k > 0 ? k : 1);
  chunk = chunk < Isa::MR ? Isa::MR : chunk / Isa::MR * Isa::MR;
  for (int64_t r0 = m0; r0 < m1; r0 += chunk) {
    const int64_t r1 = r0 + chunk < m1 ? r0 + chunk : m1;
    for (int64_t nb = n0; nb < n1; nb += 32) {
      const int64_t nv = n1 - nb < 32 ? n1 - nb : 32;
      Isa::decode(w, nb, codes);
      for (int64_t g = 0; g < groups; ++g)
        for (int j = 0; j < 32; ++j) {
          const bool in = j < nv;
          s[g * 32 + j] = in ? w.scales[(nb + j) * groups + g] : 0.0f;
          nz[g * 32 + j] = in ? -float(w.zeros[(nb + j) * groups + g]) : 0.0f;
        }
      int64_t i = r0;
      for (; i + Isa::MR <= r1; i += Isa::MR)
        Isa::template tile<Isa::MR>(a, blk, i, bias, y, yt, w.n, nb, nv);
      switch (r1 - i) {
        case 5:
          if constexpr (Isa::MR > 5) Isa::template tile<5>(a, blk, i, bias, y, yt, w.n, nb, nv);
          break;
        case 4:
          if constexpr (Isa::MR > 4) Isa::template tile<4>(a, blk, i, bias, y, yt, w.n, nb, nv);
          break;
        case 3:
          Isa::template tile<3>(a, blk, i, bias, y, yt, w.n, nb, nv);
          break;
        case 2:
          Isa::template tile<2>(a, blk, i, bias, y, yt, w.n, nb, nv);
          break;
        case 1:
          Isa::template tile<1>(a, blk, i, bias, y, yt, w.n, nb, nv);
          break;
        default:
          break;
      }
    }
  }
}

// A tile's float results, f[r][32], to y: times the row's scale, plus bias.
inline void store_tile(const Act& a, const float* f, int mr, int64_t i0, const float* bias, void* y,
                       DType yt, int64_t n, int64_t nb, int64_t nv) {
  for (int r = 0; r < mr; ++r) {
    const float sc = a.scale[i0 + r];
    for (int64_t j = 0; j < nv; ++j) {
      const float v = f[r * 32 + j] * sc;
      store_f(y, yt, (i0 + r) * n + nb + j, bias ? v + bias[nb + j] : v);
    }
  }
}

}  // namespace
}  // namespace int4
}  // namespace pk
