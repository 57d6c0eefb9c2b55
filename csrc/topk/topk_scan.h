// The streaming scans of the CPU top-k, written once over an `Ops` struct of
// 64-element block primitives. Each ISA file defines its Ops in an anonymous
// namespace and instantiates make_scan_kernels<Ops>(), so every instantiation
// has internal linkage and carries only that file's instruction set.
//
// Ops provides, each over 64 consecutive elements and returning a bit mask
// (bit j set when element j's key >= t):
//   mask_u32(const uint32_t*, uint32_t t), mask_u16(const uint16_t*, uint32_t t),
//   ef_f32(const uint32_t* x, float* r, uint32_t t), ef_f16(const uint16_t*, ...),
//   ef_bf16(const uint16_t*, ...)  (these also store r = float(x) + r).
#pragma once
#include <cstdint>
#include <cstring>

#include "topk.h"
#include "topk_isa.h"

namespace pk {
namespace topk {
namespace scan {

constexpr int kBlock = 64;

static inline uint64_t low_mask(int64_t len) { return len >= 64 ? ~0ull : ((1ull << len) - 1ull); }

template <class GetBits>
inline int64_t push_mask(uint64_t m, int64_t base, GetBits get, uint32_t* ob, int64_t* oi,
                         int64_t cap, int64_t cnt) {
  while (m) {
    const int j = __builtin_ctzll(m);
    m &= m - 1;
    if (cnt < cap) {
      ob[cnt] = get(j);
      oi[cnt] = base + j;
    }
    ++cnt;
  }
  return cnt;
}

template <class Ops, class K, uint64_t (*Mask)(const K*, uint32_t)>
int64_t collect_plain(const K* p, int64_t b, int64_t e, uint32_t t, uint32_t* ob, int64_t* oi,
                      int64_t cap) {
  int64_t cnt = 0, i = b;
  for (; i + kBlock <= e; i += kBlock) {
    const uint64_t m = Mask(p + i, t);
    if (m) cnt = push_mask(m, i, [&](int j) { return uint32_t(p[i + j]); }, ob, oi, cap, cnt);
  }
  if (i < e) {
    // The tail goes through the same block primitive on a padded copy, so no
    // scalar conversion code is compiled here.
    K tmp[kBlock] = {};
    std::memcpy(tmp, p + i, size_t(e - i) * sizeof(K));
    const uint64_t m = Mask(tmp, t) & low_mask(e - i);
    cnt = push_mask(m, i, [&](int j) { return uint32_t(tmp[j]); }, ob, oi, cap, cnt);
  }
  return cnt;
}

template <class K, uint64_t (*Ef)(const K*, float*, uint32_t)>
int64_t collect_ef_typed(const K* x, float* r, int64_t b, int64_t e, uint32_t t, uint32_t* ob,
                         int64_t* oi, int64_t cap) {
  auto bits_of = [](const float* f, int j) {
    uint32_t u;
    std::memcpy(&u, f + j, 4);
    return u;
  };
  int64_t cnt = 0, i = b;
  for (; i + kBlock <= e; i += kBlock) {
    const uint64_t m = Ef(x + i, r + i, t);
    if (m) cnt = push_mask(m, i, [&](int j) { return bits_of(r + i, j); }, ob, oi, cap, cnt);
  }
  if (i < e) {
    K tx[kBlock] = {};
    float tr[kBlock] = {};
    const size_t len = size_t(e - i);
    std::memcpy(tx, x + i, len * sizeof(K));
    std::memcpy(tr, r + i, len * sizeof(float));
    const uint64_t m = Ef(tx, tr, t) & low_mask(e - i);
    std::memcpy(r + i, tr, len * sizeof(float));
    cnt = push_mask(m, i, [&](int j) { return bits_of(tr, j); }, ob, oi, cap, cnt);
  }
  return cnt;
}

template <class Ops>
int64_t collect_u32(const uint32_t* p, int64_t b, int64_t e, uint32_t t, uint32_t* ob, int64_t* oi,
                    int64_t cap) {
  return collect_plain<Ops, uint32_t, &Ops::mask_u32>(p, b, e, t, ob, oi, cap);
}

template <class Ops>
int64_t collect_u16(const uint16_t* p, int64_t b, int64_t e, uint32_t t, uint32_t* ob, int64_t* oi,
                    int64_t cap) {
  return collect_plain<Ops, uint16_t, &Ops::mask_u16>(p, b, e, t, ob, oi, cap);
}

template <class Ops>
int64_t collect_ef(const void* x, DType dtype, float* r, int64_t b, int64_t e, uint32_t t,
                   uint32_t* ob, int64_t* oi, int64_t cap) {
  switch (dtype) {
    case DType::f16:
      return collect_ef_typed<uint16_t, &Ops::ef_f16>(static_cast<const uint16_t*>(x), r, b, e, t,
                                                      ob, oi, cap);
    case DType::bf16:
      return collect_ef_typed<uint16_t, &Ops::ef_bf16>(static_cast<const uint16_t*>(x), r, b, e, t,
                                                       ob, oi, cap);
    default:
      return collect_ef_typed<uint32_t, &Ops::ef_f32>(static_cast<const uint32_t*>(x), r, b, e, t,
                                                      ob, oi, cap);
  }
}

template <class Ops>
const ScanKernels* make_scan_kernels() {
  static const ScanKernels table{.collect_u32 = &collect_u32<Ops>,
                                 .collect_u16 = &collect_u16<Ops>,
                                 .collect_ef = &collect_ef<Ops>};
  return &table;
}

}  // namespace scan
}  // namespace topk
}  // namespace pk
