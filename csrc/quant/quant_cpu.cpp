// CPU driver of the quant family: checks, the cut into bucket groups (each
// processed by one thread, in cache), the per-bucket scale rule, and the bit
// packing of 4- and 2-bit codes. The per-element loops are per-ISA
// (quant_isa.h), picked once per call from active_isa().
#include <algorithm>
#include <cstring>
#include <vector>

#include "../common/checks.h"
#include "../common/hash.h"
#include "../common/isa_pick.h"
#include "../common/parallel.h"
#include "quant.h"
#include "quant_isa.h"

namespace pk {
namespace quant {

const Kernels* active_kernels() {
  static const IsaPick<Kernels> pick({.portable = &kernels_portable,
                                      .avx2 = PK_ISA_AVX2(&kernels_avx2),
                                      .neon = PK_ISA_NEON(&kernels_neon)});
  return pick();
}

namespace {

// Elements per group, about: small enough that a group's data stays in L2
// between the absmax pass and the quantize pass.
constexpr int64_t kGroupTarget = 16384;
constexpr int64_t kGrain = int64_t(1) << 16;  // elements per thread, at least

void check_common(int64_t n, int32_t bits, int64_t bucket) {
  PK_CHECK_ARG(n >= 0, "n must be >= 0, got ", n);
  PK_CHECK_ARG(bits == 8 || bits == 4 || bits == 2, "bits must be 8, 4 or 2, got ", bits);
  PK_CHECK_ARG(bucket >= 1 && bucket <= kMaxBucket, "bucket must be in [1, ", kMaxBucket, "], got ",
               bucket);
  // n * bits and the element indices stay far from int64 overflow.
  PK_CHECK_ARG(n <= (int64_t(1) << 56), "n is too large: ", n);
}

int32_t limit(int32_t bits) { return (1 << (bits - 1)) - 1; }

// Buckets per group: whole buckets, and a whole number of bytes of codes.
int64_t group_buckets(int64_t bucket) {
  int64_t g = std::max<int64_t>(1, kGroupTarget / bucket);
  while ((g * bucket) % 8 != 0) ++g;
  return g;
}

// Codes of 8 / bits elements per byte, element i at bit offset i * bits.
void pack(const uint8_t* c, int64_t len, int32_t bits, uint8_t* out) {
  const int64_t full = len * bits / 8;
  if (bits == 4) {
    for (int64_t b = 0; b < full; ++b) out[b] = uint8_t(c[2 * b] | (c[2 * b + 1] << 4));
  } else {
    for (int64_t b = 0; b < full; ++b)
      out[b] = uint8_t(c[4 * b] | (c[4 * b + 1] << 2) | (c[4 * b + 2] << 4) | (c[4 * b + 3] << 6));
  }
  const int64_t done = full * 8 / bits;
  if (done < len) {
    uint8_t last = 0;
    for (int64_t i = done; i < len; ++i) last = uint8_t(last | (c[i] << ((i - done) * bits)));
    out[full] = last;
  }
}

void unpack(const uint8_t* in, int64_t len, int32_t bits, uint8_t* c) {
  if (bits == 4) {
    for (int64_t i = 0; i + 1 < len; i += 2) {
      c[i] = in[i / 2] & 0xf;
      c[i + 1] = in[i / 2] >> 4;
    }
    if (len % 2) c[len - 1] = in[len / 2] & 0xf;
  } else {
    int64_t i = 0;
    for (; i + 3 < len; i += 4) {
      const uint8_t b = in[i / 4];
      c[i] = b & 3;
      c[i + 1] = (b >> 2) & 3;
      c[i + 2] = (b >> 4) & 3;
      c[i + 3] = b >> 6;
    }
    for (; i < len; ++i) c[i] = (in[i / 4] >> ((i % 4) * 2)) & 3;
  }
}

// Runs body(first_bucket, last_bucket, thread) over groups of whole buckets,
// on as many threads as the size is worth.
template <class Body>
void for_each_group(int64_t n, int64_t bucket, Body body) {
  const int64_t gb = group_buckets(bucket);
  const int64_t nb = num_buckets(n, bucket);
  const int64_t groups = (nb + gb - 1) / gb;
  const int nt = int(std::min<int64_t>(threads_for(n, kGrain), groups));
  parallel_for(0, groups, nt, [&](int64_t g) { body(g * gb, std::min(nb, (g + 1) * gb)); });
}

}  // namespace

void check_args(const QuantizeArgs& a) {
  PK_CHECK_ARG(a.dtype == DType::f32 || a.dtype == DType::f16 || a.dtype == DType::bf16,
               "x: dtype must be float32, float16 or bfloat16");
  check_common(a.n, a.bits, a.bucket);
  PK_CHECK_ARG(a.n == 0 || (a.x && a.codes && a.scales), "x, codes and scales must not be null");
}

void check_args(const DequantizeArgs& a) {
  check_common(a.n, a.bits, a.bucket);
  PK_CHECK_ARG(a.n == 0 || (a.codes && a.scales && a.out),
               "codes, scales and out must not be null");
}

void quantize_cpu(const QuantizeArgs& a) {
  check_args(a);
  if (a.n == 0) return;
  const Kernels* k = active_kernels();
  const int32_t lim = limit(a.bits);
  const uint64_t key = splitmix64(a.seed);
  const uint32_t k0 = uint32_t(key), k1 = uint32_t(key >> 32);
  const int esize = a.dtype == DType::f32 ? 4 : 2;
  for_each_group(a.n, a.bucket, [&](int64_t b0, int64_t b1) {
    const int64_t g0 = b0 * a.bucket, g1 = std::min(a.n, b1 * a.bucket);
    thread_local std::vector<uint8_t> tmp;
    uint8_t* codes = a.codes + g0;
    if (a.bits != 8) {
      if (int64_t(tmp.size()) < g1 - g0) tmp.resize(size_t(g1 - g0));
      codes = tmp.data();
    }
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s = b * a.bucket, e = std::min(a.n, s + a.bucket), len = e - s;
      const void* x = static_cast<const char*>(a.x) + s * esize;
      float* r = a.residual ? a.residual + s : nullptr;
      uint8_t* c = codes + (s - g0);
      const uint32_t amax_bits = k->absmax_bits(x, a.dtype, r, len);
      float amax;
      std::memcpy(&amax, &amax_bits, 4);
      const float inv = float(lim) / amax;
      if (amax_bits >= 0x7f800000u || amax_bits == 0 || !(inv < 3.4028235e38f)) {
        // Not finite: NaN scale; zero (or too small to invert): scale 0.
        const uint32_t sb = amax_bits >= 0x7f800000u ? 0x7fc00000u : 0u;
        std::memcpy(&a.scales[b], &sb, 4);
        std::memset(c, lim, size_t(len));
        if (r && amax_bits >= 0x7f800000u) std::memset(r, 0, size_t(len) * 4);
        continue;
      }
      const float scale = amax / float(lim);
      a.scales[b] = scale;
      // With error feedback y = x + r is in r now, in fp32.
      const void* src = r ? static_cast<const void*>(r) : x;
      const DType sdt = r ? DType::f32 : a.dtype;
      // The generator's high index word changes every 2^32 elements.
      for (int64_t p = s; p < e;) {
        const int64_t q = std::min(e, ((p >> 32) + 1) << 32);
        const int64_t off = p - s;
        k->quantize(static_cast<const char*>(src) + off * (r ? 4 : esize), sdt, q - p, inv, scale,
                    lim, a.stochastic, uint32_t(p),
                    k0 ^ lowbias32(uint32_t(uint64_t(p) >> 32) ^ k1), c + off,
                    r ? r + off : nullptr);
        p = q;
      }
    }
    if (a.bits != 8) pack(codes, g1 - g0, a.bits, a.codes + g0 * a.bits / 8);
  });
}

void pack_bits_cpu(const uint32_t* v, int64_t n, int32_t width, uint8_t* out) {
  PK_CHECK_ARG(width >= 0 && width <= 32, "width must be in [0, 32], got ", width);
  PK_CHECK_ARG(n >= 0, "n must be >= 0, got ", n);
  const uint64_t mask = (uint64_t(1) << width) - 1;
  uint64_t acc = 0;  // at most 7 + 32 bits pending
  int bits = 0;
  for (int64_t i = 0; i < n; ++i) {
    acc |= (uint64_t(v[i]) & mask) << bits;
    bits += width;
    while (bits >= 8) {
      *out++ = uint8_t(acc);
      acc >>= 8;
      bits -= 8;
    }
  }
  if (bits > 0) *out = uint8_t(acc);
}

void unpack_bits_cpu(const uint8_t* in, int64_t n, int32_t width, uint32_t* v) {
  PK_CHECK_ARG(width >= 0 && width <= 32, "width must be in [0, 32], got ", width);
  PK_CHECK_ARG(n >= 0, "n must be >= 0, got ", n);
  const uint64_t mask = (uint64_t(1) << width) - 1;
  uint64_t acc = 0;
  int bits = 0;
  // Reads exactly packed_bytes(n, width) bytes.
  for (int64_t i = 0; i < n; ++i) {
    while (bits < width) {
      acc |= uint64_t(*in++) << bits;
      bits += 8;
    }
    v[i] = uint32_t(acc & mask);
    acc >>= width;
    bits -= width;
  }
}

void dequantize_cpu(const DequantizeArgs& a) {
  check_args(a);
  if (a.n == 0) return;
  const Kernels* k = active_kernels();
  const int32_t lim = limit(a.bits);
  for_each_group(a.n, a.bucket, [&](int64_t b0, int64_t b1) {
    const int64_t g0 = b0 * a.bucket, g1 = std::min(a.n, b1 * a.bucket);
    thread_local std::vector<uint8_t> tmp;
    const uint8_t* codes = a.codes + g0;
    if (a.bits != 8) {
      if (int64_t(tmp.size()) < g1 - g0) tmp.resize(size_t(g1 - g0));
      unpack(a.codes + g0 * a.bits / 8, g1 - g0, a.bits, tmp.data());
      codes = tmp.data();
    }
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s = b * a.bucket, e = std::min(a.n, s + a.bucket);
      k->dequantize(codes + (s - g0), e - s, a.scales[b], lim, a.out + s, a.accumulate);
    }
  });
}

}  // namespace quant
}  // namespace pk
