// The top-k family at every ISA cap against a scalar reference of topk.h's
// contract (the k largest keys, ties to the lower index, indices ascending,
// NaN above inf; with a residual, selection over y = x + r and the residual
// settled as write() documents), and bit for bit against the portable cap.
// Then each per-ISA scan table this CPU runs against the portable table, on
// ranges that start and end off the 64-element blocks, with NaN payloads
// (signalling ones too), infinities, signed zeros and subnormals.
//
// One thing is not bit for bit: y's payload where x and the residual are
// both NaN. IEEE leaves the choice of NaN operand to the implementation and
// compilers reorder commutative adds (GCC's own portable scan adds r + x for
// bf16 and x + r for f16 on aarch64), so that case is checked apart, for a
// NaN wherever one is due.
#include "topk/topk_isa.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "common/half.h"
#include "native_test.h"
#include "topk/topk.h"

namespace {

using pk::DType;
using pk_test::bits;
using pk_test::fail;
using pk_test::from_bits;
using pk_test::Rng;

const char* dtype_name(DType d) {
  return d == DType::f16 ? "f16" : d == DType::bf16 ? "bf16" : "f32";
}

// Data kinds: plain random; few distinct magnitudes (ties everywhere, at
// the k-th key too); specials sprinkled over random values.
enum class Kind { random, ties, special };
const char* kind_name(Kind k) {
  return k == Kind::random ? "random" : k == Kind::ties ? "ties" : "special";
}

// One element as 32 bits (fp32) or 16 (fp16 / bf16: low half).
uint32_t special_f32(Rng& g) {
  static const uint32_t kSpecial[] = {0x7fc00000u,
                                      0xffc00000u,
                                      0x7f800001u /* signalling */,
                                      0xff812345u,
                                      0x7fffffffu,
                                      0x7f800000u,
                                      0xff800000u,
                                      0x00000000u,
                                      0x80000000u,
                                      0x00000001u /* subnormal */,
                                      0x807fffffu,
                                      0x7f7fffffu,
                                      0xff7fffffu};
  return kSpecial[g.below(sizeof(kSpecial) / 4)];
}
uint16_t special_16(Rng& g, DType d) {
  static const uint16_t kF16[] = {0x7e00, 0xfe00, 0x7c01 /* signalling */,
                                  0xfd55, 0x7fff, 0x7c00,
                                  0xfc00, 0x0000, 0x8000,
                                  0x0001, 0x83ff, 0x7bff,
                                  0xfbff};
  static const uint16_t kBf16[] = {0x7fc0, 0xffc0, 0x7f81 /* signalling */,
                                   0xff85, 0x7fff, 0x7f80,
                                   0xff80, 0x0000, 0x8000,
                                   0x0001, 0x807f, 0x7f7f,
                                   0xff7f};
  return d == DType::f16 ? kF16[g.below(13)] : kBf16[g.below(13)];
}

struct Input {
  DType dtype;
  std::vector<uint32_t> x32;
  std::vector<uint16_t> x16;
  std::vector<float> r0;  // residual before the call (empty: no error feedback)
  const void* x() const { return dtype == DType::f32 ? (const void*)x32.data() : x16.data(); }
  float xf(int64_t i) const {
    return dtype == DType::f32   ? from_bits(x32[i])
           : dtype == DType::f16 ? pk::f16_to_f32(x16[i])
                                 : pk::bf16_to_f32(x16[i]);
  }
};

Input make_input(Rng& g, DType dtype, int64_t n, Kind kind, bool ef) {
  Input in{dtype, {}, {}, {}};
  auto value = [&](int64_t i) -> float {
    if (kind == Kind::ties) return float(int(i % 7) - 3) * 0.5f;  // magnitudes 0, .5, 1, 1.5
    return g.normal() * 3.0f;
  };
  if (dtype == DType::f32) {
    in.x32.resize(size_t(n));
    for (int64_t i = 0; i < n; ++i)
      in.x32[i] = kind == Kind::special && g.below(16) == 0 ? special_f32(g) : bits(value(i));
  } else {
    in.x16.resize(size_t(n));
    for (int64_t i = 0; i < n; ++i) {
      const float v = value(i);
      in.x16[i] = kind == Kind::special && g.below(16) == 0 ? special_16(g, dtype)
                  : dtype == DType::f16                     ? pk::f32_to_f16(v)
                                                            : pk::f32_to_bf16(v);
    }
  }
  if (ef) {
    in.r0.resize(size_t(n));
    for (int64_t i = 0; i < n; ++i) {
      float r = kind == Kind::ties ? 0.0f : g.normal() * 0.25f;
      // Past fp16's range (saturated sends), and NaN / inf residuals beside
      // x that is not NaN (see the top of the file).
      if (kind == Kind::special && g.below(32) == 0 && !std::isnan(in.xf(i)))
        r = from_bits(special_f32(g));
      if (kind == Kind::special && g.below(64) == 0) r = 70000.0f * (g.below(2) ? 1 : -1);
      in.r0[i] = r;
    }
  }
  return in;
}

struct Output {
  std::vector<uint32_t> values;  // bits, 16-bit types in the low half
  std::vector<int64_t> indices;
  std::vector<uint32_t> residual;  // bits
};

Output run(const Input& in, int64_t k, bool approx) {
  const int64_t n = int64_t(in.dtype == DType::f32 ? in.x32.size() : in.x16.size());
  Output out;
  std::vector<uint32_t> v32(static_cast<size_t>(k));
  std::vector<uint16_t> v16(static_cast<size_t>(k));
  std::vector<float> r = in.r0;
  out.indices.assign(size_t(k), -1);
  pk::topk::Args a;
  a.x = in.x();
  a.dtype = in.dtype;
  a.n = n;
  a.k = k;
  a.approx = approx;
  a.residual = r.empty() ? nullptr : r.data();
  a.values = in.dtype == DType::f32 ? (void*)v32.data() : v16.data();
  a.indices = out.indices.data();
  pk::topk::sparsify_cpu(a);
  for (int64_t j = 0; j < k; ++j) out.values.push_back(in.dtype == DType::f32 ? v32[j] : v16[j]);
  for (float f : r) out.residual.push_back(bits(f));
  return out;
}

// topk.h, written out element by element.
Output reference(const Input& in, int64_t k) {
  const bool ef = !in.r0.empty();
  const int64_t n = int64_t(in.dtype == DType::f32 ? in.x32.size() : in.x16.size());
  std::vector<float> y(ef ? size_t(n) : 0);
  std::vector<uint32_t> key(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    if (ef) {
      y[i] = in.xf(i) + in.r0[i];
      key[i] = bits(y[i]) & 0x7fffffffu;
    } else {
      key[i] = in.dtype == DType::f32 ? in.x32[i] & 0x7fffffffu : in.x16[i] & 0x7fffu;
    }
  }
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t(0));
  auto before = [&](int64_t a, int64_t b) { return key[a] != key[b] ? key[a] > key[b] : a < b; };
  if (k < n) std::nth_element(order.begin(), order.begin() + k, order.end(), before);
  order.resize(size_t(k));
  std::sort(order.begin(), order.end());
  Output out;
  out.indices = order;
  std::vector<float> r(y);
  for (int64_t i : order) {
    if (!ef) {
      out.values.push_back(in.dtype == DType::f32 ? in.x32[i] : in.x16[i]);
      continue;
    }
    float sent = y[i];
    uint32_t v = bits(y[i]);
    if (in.dtype != DType::f32) {
      const bool f16 = in.dtype == DType::f16;
      uint16_t h = f16 ? pk::f32_to_f16(y[i]) : pk::f32_to_bf16(y[i]);
      const uint16_t inf = f16 ? 0x7c00 : 0x7f80;
      if ((h & 0x7fff) == inf && std::isfinite(y[i])) h = uint16_t((h & 0x8000) | (inf - 1));
      v = h;
      sent = f16 ? pk::f16_to_f32(h) : pk::bf16_to_f32(h);
    }
    out.values.push_back(v);
    r[i] = std::isfinite(sent) && std::isfinite(y[i]) ? y[i] - sent : 0.0f;
  }
  for (float f : r) out.residual.push_back(bits(f));
  return out;
}

// NaN where x and r are both NaN: any NaN will do for the value sent.
bool is_nan_bits(uint32_t v, DType dt) {
  return dt == DType::f32   ? (v & 0x7fffffffu) > 0x7f800000u
         : dt == DType::f16 ? (v & 0x7fffu) > 0x7c00u
                            : (v & 0x7fffu) > 0x7f80u;
}

void compare(const Output& got, const Output& want, const char* what,
             const std::vector<bool>* any_nan = nullptr, DType dt = DType::f32) {
  ++pk_test::g_checks;
  if (got.indices != want.indices) {
    size_t j = 0;
    while (j < got.indices.size() && got.indices[j] == want.indices[j]) ++j;
    fail("%s: indices differ first at %zu (%lld vs %lld)", what, j,
         j < got.indices.size() ? (long long)got.indices[j] : -1LL,
         j < want.indices.size() ? (long long)want.indices[j] : -1LL);
    return;
  }
  for (size_t j = 0; j < got.values.size(); ++j) {
    if (any_nan && (*any_nan)[size_t(got.indices[j])] && is_nan_bits(got.values[j], dt)) continue;
    if (got.values[j] != want.values[j]) {
      fail("%s: value %zu (index %lld): %08x vs %08x", what, j, (long long)got.indices[j],
           got.values[j], want.values[j]);
      return;
    }
  }
  for (size_t i = 0; i < got.residual.size(); ++i) {
    if (any_nan && (*any_nan)[i] && is_nan_bits(got.residual[i], DType::f32) &&
        is_nan_bits(want.residual[i], DType::f32))
      continue;
    if (got.residual[i] != want.residual[i]) {
      fail("%s: residual %zu: %08x vs %08x", what, i, got.residual[i], want.residual[i]);
      return;
    }
  }
}

// x and r both NaN at a few places, among other NaNs, infinities and
// values; k takes every NaN, so their payloads cannot move the selection.
void check_both_nan(Rng& g) {
  for (DType dt : {DType::f32, DType::f16, DType::bf16})
    for (int64_t n : {int64_t(1000), int64_t(70000)}) {
      Input in = make_input(g, dt, n, Kind::random, true);
      std::vector<bool> both(static_cast<size_t>(n), false);
      for (int j = 0; j < 12; ++j) {
        const int64_t i = int64_t(g.below(uint64_t(n)));
        if (dt == DType::f32)
          in.x32[i] = special_f32(g) | 0x7f800001u;  // some NaN
        else
          in.x16[i] = special_16(g, dt) | (dt == DType::f16 ? 0x7c01 : 0x7f81);
        if (j % 2 == 0 || j == 11) {
          in.r0[i] = from_bits(special_f32(g) | 0x7f800001u);
          both[size_t(i)] = true;
        } else {
          in.r0[i] = g.normal();
          both[size_t(i)] = false;
        }
        in.r0[size_t((i + 1) % n)] = from_bits(0xff800000u);  // -inf beside
      }
      const int64_t k = std::max<int64_t>(n / 100, 40);  // more than the NaNs
      const Output want = reference(in, k);
      pk_test::for_each_cap([&](pk::Isa cap) {
        char what[96];
        std::snprintf(what, sizeof what, "%s %s+ef both NaN n=%lld k=%lld", pk::isa_name(cap),
                      dtype_name(dt), (long long)n, (long long)k);
        compare(run(in, k, false), want, what, &both, dt);
      });
    }
}

// The family through its API, at every cap, on sizes around the 64-element
// blocks, past the sampled fast path's 2^15, and one large odd size.
void check_api(Rng& g) {
  std::vector<int64_t> sizes = {0, 1, 2, 15, 16, 17, 63, 64, 65, 129, 1000, 40000};
  if (!pk_test::quick()) sizes.push_back(1000003);
  for (DType dt : {DType::f32, DType::f16, DType::bf16})
    for (bool ef : {false, true})
      for (Kind kind : {Kind::random, Kind::ties, Kind::special})
        for (int64_t n : sizes) {
          // The fast path (k <= n/8), the exact one, and the edges.
          std::vector<int64_t> ks = {0, 1, n / 8, n / 2, n - 1, n};
          if (n > 100000) ks = {1000, n / 2};
          std::sort(ks.begin(), ks.end());
          ks.erase(std::unique(ks.begin(), ks.end()), ks.end());
          const Input in = make_input(g, dt, n, kind, ef);
          for (int64_t k : ks) {
            if (k < 0 || k > n) continue;
            const Output want = reference(in, k);
            for (bool approx : {false, true}) {
              if (approx && n < 40000) continue;  // approx only changes the sampled path
              Output first;
              pk_test::for_each_cap([&](pk::Isa cap) {
                char what[160];
                std::snprintf(what, sizeof what, "%s %s%s %s n=%lld k=%lld%s", pk::isa_name(cap),
                              dtype_name(dt), ef ? "+ef" : "", kind_name(kind), (long long)n,
                              (long long)k, approx ? " approx" : "");
                const Output got = run(in, k, approx);
                compare(got, want, what);
                if (cap == pk::Isa::portable)
                  first = got;
                else
                  compare(got, first, what);  // bit for bit with the portable cap
              });
            }
          }
        }
}

// --- the scan tables, directly ---------------------------------------------

struct Table {
  const char* name;
  pk::Isa level;
  const pk::topk::ScanKernels* (*factory)();
};

std::vector<Table> tier_tables() {
  std::vector<Table> v;
#ifdef PK_ARM64
#ifdef PK_HAVE_NEON
  v.push_back({"neon", pk::Isa::neon, &pk::topk::scan_kernels_neon});
#endif
#else
#ifdef PK_HAVE_AVX2
  v.push_back({"avx2", pk::Isa::avx2, &pk::topk::scan_kernels_avx2});
#endif
#ifdef PK_HAVE_AVX512
  v.push_back({"avx512", pk::Isa::avx512, &pk::topk::scan_kernels_avx512});
#endif
#endif
  return v;
}

// Each scan of `t` against the portable one: the count, the stored entries
// and (error feedback) the whole residual, bit for bit.
void check_scans(Rng& g, const Table& tab) {
  const pk::topk::ScanKernels* P = pk::topk::scan_kernels_portable();
  const pk::topk::ScanKernels* T = tab.factory();
  constexpr int64_t kLen = 300;
  std::vector<uint32_t> x32(kLen);
  std::vector<uint16_t> xh(kLen), xb(kLen);
  std::vector<float> r0(kLen);
  for (int64_t i = 0; i < kLen; ++i) {
    const bool sp = g.below(6) == 0;
    x32[i] = sp ? special_f32(g) : bits(g.normal());
    xh[i] = sp ? special_16(g, DType::f16) : pk::f32_to_f16(g.normal());
    xb[i] = sp ? special_16(g, DType::bf16) : pk::f32_to_bf16(g.normal());
    // A NaN residual only beside x that is no NaN (see the top of the file).
    const bool x_nan = std::isnan(from_bits(x32[i])) || std::isnan(pk::f16_to_f32(xh[i])) ||
                       std::isnan(pk::bf16_to_f32(xb[i]));
    r0[i] = g.below(8) == 0 && !x_nan ? from_bits(special_f32(g)) : g.normal() * 0.5f;
  }
  const uint32_t thresholds[] = {0,          1,           0x3f800000u, x32[7] & 0x7fffffffu,
                                 0x7f800000, 0x7f800001u, 0x7fffffffu, 0x80000000u,
                                 0x3c00,     0x7c00,      0x7c01,      0x7f80,
                                 0x7fff,     0x8000,      0xffff,      0x10000};
  const int64_t ranges[][2] = {{0, 0},  {0, 1},   {0, 63},   {0, 64},   {0, 65},   {1, 64},
                               {5, 69}, {3, 130}, {64, 128}, {0, kLen}, {37, kLen}};
  for (uint32_t t : thresholds)
    for (const auto& be : ranges)
      for (int64_t cap : {int64_t(0), int64_t(3), kLen}) {
        const int64_t b = be[0], e = be[1];
        uint32_t ob_p[kLen], ob_t[kLen];
        int64_t oi_p[kLen], oi_t[kLen];
        auto same = [&](const char* scan, int64_t cp, int64_t ct) {
          ++pk_test::g_checks;
          char what[128];
          std::snprintf(what, sizeof what, "%s table %s t=%08x [%lld,%lld) cap %lld", tab.name,
                        scan, t, (long long)b, (long long)e, (long long)cap);
          if (cp != ct)
            return fail("%s: count %lld vs portable %lld", what, (long long)ct, (long long)cp);
          for (int64_t j = 0; j < std::min(cp, cap); ++j)
            if (ob_p[j] != ob_t[j] || oi_p[j] != oi_t[j])
              return fail("%s: entry %lld: (%08x, %lld) vs portable (%08x, %lld)", what,
                          (long long)j, ob_t[j], (long long)oi_t[j], ob_p[j], (long long)oi_p[j]);
        };
        same("u32", P->collect_u32(x32.data(), b, e, t, ob_p, oi_p, cap),
             T->collect_u32(x32.data(), b, e, t, ob_t, oi_t, cap));
    // 16-bit keys take thresholds up to 2^15 (topk_isa.h); the NEON scan
    // agrees with the portable one past that too.
#ifdef PK_ARM64
        if (true) {
#else
        if (t <= 0x8000u) {
#endif
          same("u16/f16", P->collect_u16(xh.data(), b, e, t, ob_p, oi_p, cap),
               T->collect_u16(xh.data(), b, e, t, ob_t, oi_t, cap));
          same("u16/bf16", P->collect_u16(xb.data(), b, e, t, ob_p, oi_p, cap),
               T->collect_u16(xb.data(), b, e, t, ob_t, oi_t, cap));
        }
        for (DType dt : {DType::f32, DType::f16, DType::bf16}) {
          const void* x = dt == DType::f32   ? (const void*)x32.data()
                          : dt == DType::f16 ? (const void*)xh.data()
                                             : (const void*)xb.data();
          std::vector<float> rp = r0, rt = r0;
          const int64_t cp = P->collect_ef(x, dt, rp.data(), b, e, t, ob_p, oi_p, cap);
          const int64_t ct = T->collect_ef(x, dt, rt.data(), b, e, t, ob_t, oi_t, cap);
          char scan[32];
          std::snprintf(scan, sizeof scan, "ef/%s", dtype_name(dt));
          same(scan, cp, ct);
          for (int64_t i = 0; i < kLen; ++i)
            if (bits(rp[i]) != bits(rt[i])) {
              fail("%s table ef/%s [%lld,%lld): residual %lld: %08x vs portable %08x", tab.name,
                   dtype_name(dt), (long long)b, (long long)e, (long long)i, bits(rt[i]),
                   bits(rp[i]));
              break;
            }
        }
      }
}

// The driver runs the table of the cap's tier, or the next lower one.
void check_dispatch() {
  pk_test::for_each_cap([&](pk::Isa cap) {
    const pk::topk::ScanKernels* want = pk::topk::scan_kernels_portable();
    for (const Table& t : tier_tables())
      if (t.level <= cap) want = t.factory();
    if (pk::topk::active_scan_kernels() != want)
      fail("cap %s: the driver runs another table", pk::isa_name(cap));
  });
}

}  // namespace

int main() {
  pk_test::banner("topk_isa_test");
  Rng g(0x70c0ull);
  check_dispatch();
  for (const Table& t : tier_tables()) {
    if (t.level > pk::detected_isa()) {
      std::printf("topk_isa_test: %s table skipped (this CPU lacks it)\n", t.name);
      continue;
    }
    pk_test::g_context = std::string("table ") + t.name;
    check_scans(g, t);
  }
  check_api(g);
  check_both_nan(g);
  return pk_test::verdict("topk_isa_test");
}
