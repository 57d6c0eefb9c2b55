// The quant family at every ISA cap against a scalar reference of quant.h's
// contract, bit for bit (codes, scales, residual, decoded values): the
// family promises identical results on every ISA. Then each per-ISA table
// this CPU runs against the portable table directly, on lengths around the
// vector widths, rounding ties, -0.0, the last indices before the noise
// counter wraps, and the residual aliasing the source as the driver passes it.
// Built with -ffp-contract=off, as the kernels are: one IEEE operation at a
// time.
#include "quant/quant_isa.h"

#include <algorithm>
#include <cmath>

#include "common/half.h"
#include "native_test.h"
#include "quant/quant.h"

namespace {

using pk::DType;
using pk_test::bits;
using pk_test::fail;
using pk_test::from_bits;
using pk_test::Rng;

const char* dtype_name(DType d) {
  return d == DType::f16 ? "f16" : d == DType::bf16 ? "bf16" : "f32";
}

// quant.h's generator, written out.
uint32_t lowbias32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7feb352du;
  h ^= h >> 15;
  h *= 0x846ca68bu;
  h ^= h >> 16;
  return h;
}
uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
float noise(uint64_t seed, uint64_t i) {
  const uint64_t k = splitmix64(seed);
  const uint32_t k0 = uint32_t(k), k1 = uint32_t(k >> 32);
  const uint32_t key = k0 ^ lowbias32(uint32_t(i >> 32) ^ k1);
  return float(lowbias32(uint32_t(i) ^ key) >> 8) * 0x1.0p-24f;
}

struct Input {
  DType dtype;
  std::vector<uint32_t> x32;
  std::vector<uint16_t> x16;
  std::vector<float> r0;  // empty: no error feedback
  int64_t n() const { return int64_t(dtype == DType::f32 ? x32.size() : x16.size()); }
  const void* x() const { return dtype == DType::f32 ? (const void*)x32.data() : x16.data(); }
  float xf(int64_t i) const {
    return dtype == DType::f32   ? from_bits(x32[i])
           : dtype == DType::f16 ? pk::f16_to_f32(x16[i])
                                 : pk::bf16_to_f32(x16[i]);
  }
};

struct Result {
  std::vector<uint8_t> codes;
  std::vector<uint32_t> scales;    // bits
  std::vector<uint32_t> residual;  // bits
  std::vector<uint32_t> decoded;   // bits, out = 0.25 then out += decoded
  std::vector<uint32_t> plain;     // bits, out = decoded
};

int32_t limit(int bits) { return (1 << (bits - 1)) - 1; }

Result reference(const Input& in, int nbits, int64_t bucket, bool stochastic, uint64_t seed) {
  const int64_t n = in.n();
  const int32_t lim = limit(nbits);
  const float fl = float(lim);
  const bool ef = !in.r0.empty();
  std::vector<uint8_t> code(static_cast<size_t>(n));
  Result out;
  std::vector<float> r = in.r0;
  for (int64_t s = 0; s < n; s += bucket) {
    const int64_t e = std::min(n, s + bucket);
    std::vector<float> y;
    uint32_t amax_bits = 0;
    for (int64_t i = s; i < e; ++i) {
      y.push_back(ef ? in.xf(i) + r[i] : in.xf(i));
      amax_bits = std::max(amax_bits, bits(y.back()) & 0x7fffffffu);
    }
    const float amax = from_bits(amax_bits);
    const float inv = fl / amax;
    if (amax_bits >= 0x7f800000u || amax_bits == 0 || !(inv < 3.4028235e38f)) {
      const bool nan = amax_bits >= 0x7f800000u;
      out.scales.push_back(nan ? 0x7fc00000u : 0u);
      for (int64_t i = s; i < e; ++i) {
        code[i] = uint8_t(lim);
        if (ef) r[i] = nan ? 0.0f : y[i - s];
      }
      continue;
    }
    const float scale = amax / fl;
    out.scales.push_back(bits(scale));
    for (int64_t i = s; i < e; ++i) {
      const float v = y[i - s] * inv;
      float q = stochastic ? std::floor(v + noise(seed, uint64_t(i))) : std::nearbyint(v);
      q = std::min(std::max(q, -fl), fl);
      const int32_t c = int32_t(q) + lim;
      code[i] = uint8_t(c);
      if (ef) r[i] = y[i - s] - float(c - lim) * scale;
    }
  }
  // Packed: element i at bit i * bits, little-endian.
  out.codes.assign(static_cast<size_t>(pk::quant::packed_bytes(n, nbits)), 0);
  for (int64_t i = 0; i < n; ++i)
    out.codes[size_t(i * nbits / 8)] |= uint8_t(code[i] << ((i * nbits) % 8));
  for (float f : r) out.residual.push_back(pk_test::bits(f));
  for (int64_t i = 0; i < n; ++i) {
    const float d = float(int32_t(code[i]) - lim) * from_bits(out.scales[size_t(i / bucket)]);
    out.plain.push_back(pk_test::bits(d));
    out.decoded.push_back(pk_test::bits(0.25f + d));
  }
  return out;
}

Result run(const Input& in, int nbits, int64_t bucket, bool stochastic, uint64_t seed) {
  const int64_t n = in.n();
  Result out;
  std::vector<float> r = in.r0;
  std::vector<float> scales(static_cast<size_t>(pk::quant::num_buckets(n, bucket)));
  out.codes.assign(static_cast<size_t>(pk::quant::packed_bytes(n, nbits)), 0xa5);
  pk::quant::QuantizeArgs q;
  q.x = in.x();
  q.dtype = in.dtype;
  q.n = n;
  q.bits = nbits;
  q.bucket = bucket;
  q.stochastic = stochastic;
  q.seed = seed;
  q.residual = r.empty() ? nullptr : r.data();
  q.codes = out.codes.data();
  q.scales = scales.data();
  pk::quant::quantize_cpu(q);
  for (float f : scales) out.scales.push_back(pk_test::bits(f));
  for (float f : r) out.residual.push_back(pk_test::bits(f));
  std::vector<float> o(static_cast<size_t>(n), 0.25f);
  pk::quant::DequantizeArgs d;
  d.codes = out.codes.data();
  d.scales = scales.data();
  d.n = n;
  d.bits = nbits;
  d.bucket = bucket;
  d.out = o.data();
  d.accumulate = true;
  pk::quant::dequantize_cpu(d);
  for (float f : o) out.decoded.push_back(pk_test::bits(f));
  d.accumulate = false;
  pk::quant::dequantize_cpu(d);
  for (float f : o) out.plain.push_back(pk_test::bits(f));
  return out;
}

template <class T>
bool first_diff(const std::vector<T>& a, const std::vector<T>& b, const char* what,
                const char* field) {
  if (a.size() != b.size()) {
    fail("%s: %s sizes %zu vs %zu", what, field, a.size(), b.size());
    return true;
  }
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) {
      fail("%s: %s[%zu] %08x vs %08x", what, field, i, unsigned(a[i]), unsigned(b[i]));
      return true;
    }
  return false;
}

void compare(const Result& got, const Result& want, const char* what) {
  ++pk_test::g_checks;
  first_diff(got.scales, want.scales, what, "scales") ||
      first_diff(got.codes, want.codes, what, "codes") ||
      first_diff(got.residual, want.residual, what, "residual") ||
      first_diff(got.plain, want.plain, what, "decoded") ||
      first_diff(got.decoded, want.decoded, what, "decoded+=");
}

// Buckets of every kind: random, NaN, inf, all zero, subnormal (L / amax
// overflows), exact rounding ties (amax = L: v = y), -0.0, and the
// extremes +-amax.
Input make_input(Rng& g, DType dtype, int64_t n, int64_t bucket, bool ef) {
  Input in{dtype, {}, {}, {}};
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t s = 0; s < n; s += bucket) {
    const int64_t e = std::min(n, s + bucket);
    const int kind = int(g.below(10));
    for (int64_t i = s; i < e; ++i) {
      float f = g.normal() * 2.0f;
      switch (kind) {
        case 0:
          f = 0.0f;
          break;
        case 1:
          f = from_bits(uint32_t(g.below(3)));  // 0 or subnormal: scale 0
          break;
        case 2:  // ties: halves, with amax = 127 somewhere so inv = 1 at 8 bits
          f = float(int(g.below(255)) - 127) * 0.5f;
          if (i == s) f = 127.0f;
          break;
        case 3:
          if (g.below(4) == 0) f = -0.0f;
          break;
        default:
          break;
      }
      v[i] = f;
    }
    // A NaN, an inf, or a -0.0 now and then.
    const int special = int(g.below(12));
    const int64_t at = s + int64_t(g.below(uint64_t(e - s)));
    if (special == 0) v[at] = std::nanf("");
    if (special == 1) v[at] = from_bits(0xff800000u);
    if (special == 2) v[at] = -0.0f;
  }
  if (dtype == DType::f32) {
    for (float f : v) in.x32.push_back(bits(f));
  } else {
    for (float f : v)
      in.x16.push_back(dtype == DType::f16 ? pk::f32_to_f16(f) : pk::f32_to_bf16(f));
  }
  if (ef) {
    for (int64_t i = 0; i < n; ++i) in.r0.push_back(g.below(16) == 0 ? -0.0f : g.normal() * 0.125f);
    if (n > 3) in.r0[size_t(g.below(uint64_t(n)))] = std::nanf("");  // a NaN from the residual
  }
  return in;
}

void check_api(Rng& g) {
  std::vector<int64_t> sizes = {0, 1, 2, 15, 16, 17, 31, 33, 1000};
  if (!pk_test::quick()) sizes.push_back(1000003);
  for (DType dt : {DType::f32, DType::f16, DType::bf16})
    for (int bits : {8, 4, 2})
      for (int64_t n : sizes)
        for (int64_t bucket : {int64_t(1), int64_t(3), int64_t(16), int64_t(17), int64_t(512)}) {
          if (n > 100000 && bucket != 512) continue;
          for (bool ef : {false, true})
            for (bool stochastic : {true, false}) {
              if (n > 100000 && bits == 4) continue;
              const uint64_t seed = g.next();
              const Input in = make_input(g, dt, n, bucket, ef);
              const Result want = reference(in, bits, bucket, stochastic, seed);
              Result first;
              pk_test::for_each_cap([&](pk::Isa cap) {
                char what[128];
                std::snprintf(what, sizeof what, "%s %s%s %d bits n=%lld bucket %lld %s",
                              pk::isa_name(cap), dtype_name(dt), ef ? "+ef" : "", bits,
                              (long long)n, (long long)bucket,
                              stochastic ? "stochastic" : "nearest");
                const Result got = run(in, bits, bucket, stochastic, seed);
                compare(got, want, what);
                if (cap == pk::Isa::portable)
                  first = got;
                else
                  compare(got, first, what);
              });
            }
        }
}

// --- the tables, directly ----------------------------------------------------

struct Table {
  const char* name;
  pk::Isa level;
  const pk::quant::Kernels* (*factory)();
};

std::vector<Table> tier_tables() {
  std::vector<Table> v;
#ifdef PK_ARM64
#ifdef PK_HAVE_NEON
  v.push_back({"neon", pk::Isa::neon, &pk::quant::kernels_neon});
#endif
#else
#ifdef PK_HAVE_AVX2
  v.push_back({"avx2", pk::Isa::avx2, &pk::quant::kernels_avx2});
#endif
#endif
  return v;
}

void check_table(Rng& g, const Table& tab) {
  const pk::quant::Kernels* P = pk::quant::kernels_portable();
  const pk::quant::Kernels* T = tab.factory();
  constexpr int64_t kMax = 200;
  for (int64_t len : {0, 1, 3, 4, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 200}) {
    for (DType dt : {DType::f32, DType::f16, DType::bf16}) {
      // Values with specials; all paths see the same bytes.
      std::vector<uint32_t> x32(kMax);
      std::vector<uint16_t> x16(kMax);
      std::vector<float> r0(kMax);
      for (int64_t i = 0; i < kMax; ++i) {
        const float f = g.below(9) == 0    ? from_bits(uint32_t(g.below(2)) << 31)  // +-0
                        : g.below(40) == 0 ? std::nanf("")
                                           : g.normal() * 4.0f;
        x32[i] = bits(f);
        x16[i] = dt == DType::f16 ? pk::f32_to_f16(f) : pk::f32_to_bf16(f);
        r0[i] = g.below(9) == 0 ? -0.0f : g.normal() * 0.25f;
      }
      if (dt == DType::f16 && len > 2) x16[1] = 0x7c01;  // signalling NaN: raw bits returned
      if (dt == DType::bf16 && len > 2) x16[1] = 0x7f81;
      const void* x = dt == DType::f32 ? (const void*)x32.data() : x16.data();
      char what[96];
      std::snprintf(what, sizeof what, "%s table %s len %lld", tab.name, dtype_name(dt),
                    (long long)len);
      // absmax, plain and with the residual (which it overwrites with y).
      // Past inf only "not finite" counts (the driver's test), and x86's
      // F16C quiets a signalling NaN that the portable conversion keeps; on
      // aarch64 the NaN bits agree too.
      auto same_max = [](uint32_t a, uint32_t b) {
#ifdef PK_ARM64
        return a == b;
#else
        return a == b || (a >= 0x7f800000u && b >= 0x7f800000u);
#endif
      };
      ++pk_test::g_checks;
      if (!same_max(P->absmax_bits(x, dt, nullptr, len), T->absmax_bits(x, dt, nullptr, len)))
        fail("%s: absmax %08x vs portable %08x", what, T->absmax_bits(x, dt, nullptr, len),
             P->absmax_bits(x, dt, nullptr, len));
      std::vector<float> rp = r0, rt = r0;
      const uint32_t ap = P->absmax_bits(x, dt, rp.data(), len);
      const uint32_t at = T->absmax_bits(x, dt, rt.data(), len);
      if (!same_max(ap, at)) fail("%s: absmax+r %08x vs portable %08x", what, at, ap);
      for (int64_t i = 0; i < kMax; ++i)
        if (bits(rp[i]) != bits(rt[i])) {
          fail("%s: absmax r[%lld] %08x vs portable %08x", what, (long long)i, bits(rt[i]),
               bits(rp[i]));
          break;
        }
      // quantize: finite inputs only (the driver sends no other bucket).
      std::vector<uint32_t> fin32 = x32;
      std::vector<uint16_t> fin16 = x16;
      for (int64_t i = 0; i < kMax; ++i) {
        if (std::isnan(from_bits(fin32[i]))) fin32[i] = bits(-3.5f);
        if ((fin16[i] & 0x7fff) >= (dt == DType::f16 ? 0x7c00 : 0x7f80)) fin16[i] = 0x8000;
      }
      const void* xf = dt == DType::f32 ? (const void*)fin32.data() : fin16.data();
      for (int32_t lim : {127, 7, 1})
        for (bool stochastic : {true, false})
          for (int mode = 0; mode < 3; ++mode) {  // r: none, separate, the source itself
            const float amax = 4.0f * 3.0f;
            const float inv = float(lim) / amax, scale = amax / float(lim);
            // lo + len stays below 2^32: the last indices before the wrap too.
            const uint32_t lo = g.below(2) ? uint32_t(0xffffffffu - uint32_t(len)) : g.u32() >> 1;
            const uint32_t key = g.u32();
            uint8_t cp[kMax + 1], ct[kMax + 1];
            cp[len] = ct[len] = 0x5a;  // no write past len
            std::vector<float> sp(fin32.size()), st(fin32.size());
            for (int64_t i = 0; i < kMax; ++i) sp[i] = st[i] = from_bits(fin32[i]);
            std::vector<float> qp = r0, qt = r0;
            const void* srcp = mode == 2 ? (const void*)sp.data() : xf;
            const void* srct = mode == 2 ? (const void*)st.data() : xf;
            const DType sdt = mode == 2 ? DType::f32 : dt;
            float* rrp = mode == 0 ? nullptr : mode == 1 ? qp.data() : sp.data();
            float* rrt = mode == 0 ? nullptr : mode == 1 ? qt.data() : st.data();
            ++pk_test::g_checks;
            P->quantize(srcp, sdt, len, inv, scale, lim, stochastic, lo, key, cp, rrp);
            T->quantize(srct, sdt, len, inv, scale, lim, stochastic, lo, key, ct, rrt);
            for (int64_t i = 0; i <= len; ++i)
              if (cp[i] != ct[i]) {
                fail("%s lim %d %s r-mode %d: code[%lld] %u vs portable %u", what, lim,
                     stochastic ? "stochastic" : "nearest", mode, (long long)i, ct[i], cp[i]);
                break;
              }
            if (mode != 0)
              for (int64_t i = 0; i < kMax; ++i)
                if (bits(rrp[i]) != bits(rrt[i])) {
                  fail("%s lim %d r-mode %d: r[%lld] %08x vs portable %08x", what, lim, mode,
                       (long long)i, bits(rrt[i]), bits(rrp[i]));
                  break;
                }
          }
    }
    // dequantize: codes of the full byte range, both modes.
    uint8_t codes[kMax];
    for (int64_t i = 0; i < kMax; ++i) codes[i] = uint8_t(g.below(256));
    for (int32_t lim : {127, 7, 1})
      for (bool acc : {false, true}) {
        std::vector<float> op(kMax + 1, 0.5f), ot(kMax + 1, 0.5f);
        op[2] = ot[2] = -0.0f;
        const float scale = lim == 1 ? -0.0f : 0.0371f;  // -0.0 scale: signed zeros everywhere
        ++pk_test::g_checks;
        P->dequantize(codes, len, scale, lim, op.data(), acc);
        T->dequantize(codes, len, scale, lim, ot.data(), acc);
        for (int64_t i = 0; i <= len; ++i)
          if (bits(op[i]) != bits(ot[i])) {
            fail("%s table dequantize len %lld lim %d%s: out[%lld] %08x vs portable %08x", tab.name,
                 (long long)len, lim, acc ? " +=" : "", (long long)i, bits(ot[i]), bits(op[i]));
            break;
          }
      }
  }
}

void check_dispatch() {
  pk_test::for_each_cap([&](pk::Isa cap) {
    const pk::quant::Kernels* want = pk::quant::kernels_portable();
    for (const Table& t : tier_tables())
      if (t.level <= cap) want = t.factory();
    if (pk::quant::active_kernels() != want)
      fail("cap %s: the driver runs another table", pk::isa_name(cap));
  });
}

}  // namespace

int main() {
  pk_test::banner("quant_isa_test");
  Rng g(0x9a47ull);
  check_dispatch();
  for (const Table& t : tier_tables()) {
    if (t.level > pk::detected_isa()) {
      std::printf("quant_isa_test: %s table skipped (this CPU lacks it)\n", t.name);
      continue;
    }
    pk_test::g_context = std::string("table ") + t.name;
    check_table(g, t);
  }
  check_api(g);
  return pk_test::verdict("quant_isa_test");
}
