// The int8 family (csrc/int8) against scalar references written here: the
// kernel tables one by one (the portable one and, on aarch64, each Arm tier
// the CPU runs), then the driver's API at every ISA cap. Integers must be
// exact; a float output must be what float(acc) * (a_scale * w_scale) + bias
// rounds to, with or without the multiply-add fused (the compilers fuse it
// on aarch64). Usage: int8_isa_test [SEED]; PK_TEST_QUICK=1 runs fewer
// shapes.
#include "int8/int8_isa.h"

#include <cmath>
#include <cstdlib>
#include <vector>

#include "common/half.h"
#include "int8/int8.h"
#include "native_test.h"

namespace {

using pk::DType;
using pk_test::fail;
using pk_test::Rng;
namespace i8 = pk::int8;

size_t sz(int64_t n) { return static_cast<size_t>(n); }

// ---- References ---------------------------------------------------------------

float load(const void* x, DType t, int64_t i) {
  if (t == DType::f16) return pk::f16_to_f32(static_cast<const uint16_t*>(x)[i]);
  if (t == DType::bf16) return pk::bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
  return static_cast<const float*>(x)[i];
}

bool usable(float s) { return s > 0.0f && s <= 3.4028234663852886e38f; }

// quantize_per_row (8 bits) or quantize_per_row7 of one row, from int8.h.
float ref_quantize(const void* x, DType t, int64_t off, int64_t k, int bits, int8_t* q) {
  bool nan = false;
  float amax = 0.0f, lo = 0.0f, hi = 0.0f;
  for (int64_t c = 0; c < k; ++c) {
    const float v = load(x, t, off + c);
    if (v != v) {
      nan = true;
      continue;
    }
    amax = std::fabs(v) > amax ? std::fabs(v) : amax;
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  if (bits == 8) {
    const float s = nan ? NAN : amax / 127.0f;
    for (int64_t c = 0; c < k; ++c)
      q[c] = usable(s) ? int8_t(std::fmin(
                             127.0f, std::fmax(-127.0f, std::nearbyint(load(x, t, off + c) / s))))
                       : int8_t(0);
    return s;
  }
  const float s = nan ? NAN : hi / 127.0f - lo / 127.0f;
  const float zp = usable(s) ? std::fmin(127.0f, std::fmax(0.0f, std::nearbyint(-lo / s))) : 0.0f;
  for (int64_t c = 0; c < k; ++c)
    q[c] = usable(s) ? int8_t(std::fmin(127.0f - zp,
                                        std::fmax(-zp, std::nearbyint(load(x, t, off + c) / s))))
                     : int8_t(0);
  return s;
}

int64_t ref_dot(const int8_t* a, const int8_t* b, int64_t k) {
  int64_t s = 0;
  for (int64_t p = 0; p < k; ++p) s += int64_t(a[p]) * b[p];
  return s;
}

// The k4n16 layout of int8.h, written out from its description.
void ref_pack(const int8_t* w, int64_t n, int64_t k, int64_t ldw, std::vector<int8_t>* packed,
              std::vector<int32_t>* comp) {
  const int64_t np = i8::packed_n(n), kp = i8::packed_k(k), panels = np / 16;
  packed->assign(sz(np * kp), 0);
  comp->assign(sz(np), 0);
  for (int64_t col = 0; col < n; ++col) {
    const int64_t p = col / 16, j = col % 16, blk = p / 4;
    const int64_t nv = panels - 4 * blk < 4 ? panels - 4 * blk : 4;
    int32_t sum = 0;
    for (int64_t c = 0; c < k; ++c) {
      const int64_t g = c / 4, i = c % 4;
      (*packed)[sz(64 * blk * kp + 64 * (g * nv + p % 4) + 4 * j + i)] = w[col * ldw + c];
      sum += w[col * ldw + c];
    }
    (*comp)[sz(col)] = 128 * sum;
  }
}

// Whether y (of type t) is float(acc) * (as * ws) + bias rounded, with the
// multiply-add fused or not. NaN where the reference is NaN.
bool out_ok(DType t, const void* y, int64_t i, int64_t acc, float as, float ws, float bias) {
  // volatile: the product rounded on its own, which the compiler would
  // otherwise fuse with the addition here too.
  const volatile float prod = float(acc) * (as * ws);
  const float plain = prod + bias, fused = std::fma(float(acc), as * ws, bias);
  if (t == DType::f32) {
    const float v = static_cast<const float*>(y)[i];
    if (plain != plain) return v != v;
    return pk_test::bits(v) == pk_test::bits(plain) || pk_test::bits(v) == pk_test::bits(fused);
  }
  const uint16_t v = static_cast<const uint16_t*>(y)[i];
  auto cvt = [&](float f) { return t == DType::f16 ? pk::f32_to_f16(f) : pk::f32_to_bf16(f); };
  if (plain != plain) return load(y, t, i) != load(y, t, i);
  return v == cvt(plain) || v == cvt(fused);
}

int bytes_of(DType t) { return t == DType::f32 ? 4 : 2; }

void fill_float(Rng& r, DType t, std::vector<uint8_t>* buf, int64_t count, float mag) {
  buf->assign(sz(count * bytes_of(t)), 0);
  for (int64_t i = 0; i < count; ++i) {
    const float v = r.normal() * mag;
    if (t == DType::f32)
      reinterpret_cast<float*>(buf->data())[i] = v;
    else
      reinterpret_cast<uint16_t*>(buf->data())[i] =
          t == DType::f16 ? pk::f32_to_f16(v) : pk::f32_to_bf16(v);
  }
}

void set_float(DType t, std::vector<uint8_t>* buf, int64_t i, float v) {
  if (t == DType::f32)
    reinterpret_cast<float*>(buf->data())[i] = v;
  else
    reinterpret_cast<uint16_t*>(buf->data())[i] =
        t == DType::f16 ? pk::f32_to_f16(v) : pk::f32_to_bf16(v);
}

const char* dtype_name(DType t) {
  return t == DType::f32 ? "f32" : (t == DType::f16 ? "f16" : "bf16");
}

// ---- The tables, one by one ---------------------------------------------------

struct Table {
  const char* name;
  const i8::GemmKernels* k;
};

// The portable table and each Arm table this CPU runs (the x86 ones run
// through the driver below).
std::vector<Table> tables() {
  std::vector<Table> v{{"portable", i8::gemm_kernels_portable()}};
#ifdef PK_ARM64
  const pk::Isa cpu = pk::detected_isa();
#ifdef PK_HAVE_NEON
  if (cpu >= pk::Isa::neon) v.push_back({"neon", i8::gemm_kernels_neon()});
#endif
#ifdef PK_HAVE_DOTPROD
  if (cpu >= pk::Isa::dotprod) v.push_back({"dotprod", i8::gemm_kernels_dotprod()});
#endif
#ifdef PK_HAVE_I8MM
  if (cpu >= pk::Isa::i8mm) v.push_back({"i8mm", i8::gemm_kernels_i8mm()});
#endif
#endif
  return v;
}

// The activation byte a table's gemm_packed reads for q (a7: the 7-bit
// format with its zero point).
uint8_t act_byte(const i8::GemmKernels* k, int8_t q, bool a7, int32_t zp) {
  if (a7 && k->a7_zp) return uint8_t(q + zp);
  return k->signed_a ? uint8_t(q) : uint8_t(q + 128);
}

void check_pack(const Table& t, Rng& r) {
  for (int64_t n : {1, 15, 16, 17, 64, 65, 100, 200})
    for (int64_t k : {1, 3, 4, 5, 63, 300}) {
      const int64_t ldw = k + 3;
      std::vector<int8_t> w(sz(n * ldw));
      for (auto& v : w) v = int8_t(r.u32());
      w[0] = -128;
      std::vector<int8_t> want, got(sz(i8::packed_n(n) * i8::packed_k(k)), 99);
      std::vector<int32_t> wcomp, comp(sz(i8::packed_n(n)), 99);
      ref_pack(w.data(), n, k, ldw, &want, &wcomp);
      t.k->pack(w.data(), n, k, ldw, got.data(), comp.data(), 0, i8::packed_n(n) / 16);
      if (got != want || comp != wcomp) fail("pack n=%ld k=%ld", long(n), long(k));
    }
}

void check_quantize(const Table& t, Rng& r) {
  const int64_t ks[] = {1, 3, 4, 5, 15, 16, 17, 33, 64, 100, 1027};
  for (DType dt : {DType::f32, DType::f16, DType::bf16})
    for (int bits : {8, 7})
      for (int64_t k : ks) {
        const int64_t m = 9, ldx = k + 5, kp = i8::packed_k(k), ldq = i8::scratch_ld(kp);
        std::vector<uint8_t> x;
        fill_float(r, dt, &x, m * ldx, 3.0f);
        for (int64_t c = 0; c < k; ++c) {
          set_float(dt, &x, 1 * ldx + c, 0.0f);                      // a zero row
          if (c % 2 == 0) set_float(dt, &x, 3 * ldx + c, 2.0f + c);  // one-sided
          set_float(dt, &x, 4 * ldx + c, -1.0f - 0.01f * c);         // all negative
        }
        set_float(dt, &x, 5 * ldx + k / 2, NAN);
        set_float(dt, &x, 6 * ldx + k - 1, INFINITY);
        set_float(dt, &x, 7 * ldx, -INFINITY);
        std::vector<uint8_t> q(sz(m * ldq), 0xAB);
        std::vector<float> s(sz(m), -5.0f);
        std::vector<int32_t> zp(sz(m), -1);
        // Rows [1, m - 1): the first and last must stay untouched.
        if (bits == 8)
          t.k->quantize_a(x.data(), dt, ldx, k, q.data(), ldq, s.data(), 1, m - 1);
        else
          t.k->quantize_a7(x.data(), dt, ldx, k, q.data(), ldq, s.data(), zp.data(), 1, m - 1);
        pk_test::g_context = std::string(t.name) + " quantize" + std::to_string(bits) + " " +
                             dtype_name(dt) + " k=" + std::to_string(k);
        PK_EXPECT(s[0] == -5.0f && s[m - 1] == -5.0f && q[0] == 0xAB && q[(m - 1) * ldq] == 0xAB);
        std::vector<int8_t> want(sz(k));
        for (int64_t row = 1; row < m - 1; ++row) {
          const float ws = ref_quantize(x.data(), dt, row * ldx, k, bits, want.data());
          if (!(pk_test::bits(ws) == pk_test::bits(s[row]) || (ws != ws && s[row] != s[row])))
            fail("row %ld scale %g, want %g", long(row), double(s[row]), double(ws));
          // The zero point of the 7-bit grid, where the table keeps it.
          int32_t z = 0;
          if (bits == 7 && t.k->a7_zp) {
            z = zp[row];
            int32_t lo = 127;
            for (int64_t c = 0; c < k; ++c) lo = want[c] < lo ? want[c] : lo;
            if (usable(ws) && (z < 0 || z > 127 || lo + z < 0)) fail("row %ld zp %d", long(row), z);
          }
          int bad = 0;
          for (int64_t c = 0; c < ldq; ++c) {
            const int8_t qv = c < k ? want[c] : int8_t(0);
            bad += q[row * ldq + c] != act_byte(t.k, qv, bits == 7, z);
          }
          if (bad) fail("row %ld: %d bytes differ", long(row), bad);
        }
      }
  pk_test::g_context.clear();
}

// One packed GEMM through a table as the driver runs it (blocks of four
// panels per call), rows split at `split` into two calls; c int32 (no
// scales) or of type yt.
struct PackedCase {
  int64_t m, k, n;
  bool scales;
  DType yt;
  bool bias;
};

void check_packed(const Table& t, Rng& r, const PackedCase& pc, int64_t split, bool wide_calls) {
  const int64_t m = pc.m, k = pc.k, n = pc.n, kp = i8::packed_k(k), np = i8::packed_n(n);
  const int64_t ldq = i8::scratch_ld(kp);
  std::vector<int8_t> w(sz(n * k)), aq(sz(m * k));
  for (auto& v : w) v = int8_t(r.u32());
  for (auto& v : aq) v = int8_t(int(r.below(255)) - 127);
  if (n && k) w[0] = -128;
  std::vector<int8_t> packed;
  std::vector<int32_t> comp;
  ref_pack(w.data(), n, k, k, &packed, &comp);
  std::vector<uint8_t> a(sz(m * ldq));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < ldq; ++c)
      a[sz(i * ldq + c)] = act_byte(t.k, c < k ? aq[sz(i * k + c)] : int8_t(0), false, 0);
  std::vector<float> as(sz(m)), ws(sz(n)), bias(sz(n));
  for (auto& v : as) v = 0.001f + 0.01f * float(r.below(1000)) / 1000.0f;
  for (auto& v : ws) v = 0.001f + 0.02f * float(r.below(1000)) / 1000.0f;
  for (auto& v : bias) v = r.normal();
  if (m > 2) as[1] = NAN;  // a NaN row stays in its row
  if (m > 3) as[2] = INFINITY;
  const int ob = pc.scales ? bytes_of(pc.yt) : 4;
  std::vector<uint8_t> c(sz(m * n * ob), 0xCD);
  const i8::PackedGemm g{.a = a.data(),
                         .lda = ldq,
                         .b = packed.data(),
                         .kp = kp,
                         .comp = comp.data(),
                         .n = n,
                         .c = c.data(),
                         .ldc = n,
                         .a_scale = pc.scales ? as.data() : nullptr,
                         .b_scale = pc.scales ? ws.data() : nullptr,
                         .bias = pc.scales && pc.bias ? bias.data() : nullptr,
                         .yt = pc.scales ? pc.yt : DType::f32};
  const int64_t panels = np / 16;
  for (int64_t part = 0; part < 2; ++part) {
    const int64_t m0 = part ? split : 0, m1 = part ? m : split;
    if (m0 >= m1) continue;
    if (wide_calls) {
      t.k->gemm_packed(g, m0, m1, 0, panels);
    } else {
      for (int64_t blk = 0; blk * 4 < panels; ++blk)
        t.k->gemm_packed(g, m0, m1, blk * 4, blk * 4 + 4 < panels ? blk * 4 + 4 : panels);
    }
  }
  int bad = 0;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const int64_t acc = ref_dot(&aq[sz(i * k)], &w[sz(j * k)], k);
      bool ok;
      if (!pc.scales)
        ok = reinterpret_cast<const int32_t*>(c.data())[i * n + j] == int32_t(acc);
      else
        ok = out_ok(pc.yt, c.data(), i * n + j, acc, as[sz(i)], ws[sz(j)],
                    pc.bias ? bias[sz(j)] : 0.0f);
      if (!ok && ++bad <= 3)
        fail("%s packed m=%ld k=%ld n=%ld split=%ld%s%s: c[%ld, %ld] = %g, acc %ld", t.name,
             long(m), long(k), long(n), long(split), pc.scales ? " " : "",
             pc.scales ? dtype_name(pc.yt) : "", long(i), long(j),
             pc.scales ? double(load(c.data(), pc.yt, i * n + j))
                       : double(reinterpret_cast<const int32_t*>(c.data())[i * n + j]),
             long(acc));
      if (!ok && bad <= 3 && pc.scales)
        std::printf("   as %a ws %a bias %a want %a\n", double(as[sz(i)]), double(ws[sz(j)]),
                    double(pc.bias ? bias[sz(j)] : 0.0f),
                    double(float(acc) * (as[sz(i)] * ws[sz(j)]) + (pc.bias ? bias[sz(j)] : 0.0f)));
    }
}

void check_packed_shapes(const Table& t, Rng& r) {
  const int64_t ms[] = {1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 18, 19, 33, 97, 98, 193};
  const int64_t ks[] = {1, 3, 4, 5, 8, 9, 12, 16, 17, 20, 28, 63, 64, 65, 255, 256, 257, 260, 520};
  const int64_t ns[] = {1, 5, 15, 16, 17, 33, 48, 63, 64, 65, 100, 129};
  // Every M and every K against a few N, then random triples.
  for (int64_t m : ms)
    for (int64_t k : ks) {
      if (pk_test::quick() && (k % 3)) continue;
      const int64_t n = ns[r.below(sizeof ns / sizeof ns[0])];
      check_packed(t, r, {m, k, n, false, DType::f32, false}, m / 3, false);
    }
  const int trials = pk_test::quick() ? 20 : 120;
  for (int trial = 0; trial < trials; ++trial) {
    const int64_t m = ms[r.below(sizeof ms / sizeof ms[0])],
                  k = ks[r.below(sizeof ks / sizeof ks[0])];
    const int64_t n = ns[r.below(sizeof ns / sizeof ns[0])];
    const DType yt = trial % 3 == 0 ? DType::f32 : (trial % 3 == 1 ? DType::f16 : DType::bf16);
    check_packed(t, r, {m, k, n, trial % 4 != 0, yt, trial % 2 == 0}, int64_t(r.below(m + 1)),
                 trial % 5 == 0);
  }
  // A long K (several of i8mm's k blocks) and many rows.
  check_packed(t, r, {200, 1000, 70, true, DType::f32, true}, 100, false);
  check_packed(t, r, {200, 1000, 70, false, DType::f32, false}, 0, true);
}

// Sums at the int32 limit: K = kMaxK - 1 of the largest products the packed
// kernels see (activations in [-127, 127]; weights down to -128), over
// enough rows for every kernel's widest path.
void check_packed_limit(const Table& t) {
  const int64_t m = 20, n = 3, k = i8::kMaxK - 1, kp = i8::packed_k(k), ldq = i8::scratch_ld(kp);
  std::vector<int8_t> w(sz(n * k), -128), packed;
  std::vector<int32_t> comp;
  for (int64_t c = 0; c < k; ++c) w[sz(k + c)] = 127;
  ref_pack(w.data(), n, k, k, &packed, &comp);
  std::vector<uint8_t> a(sz(m * ldq));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < ldq; ++c)
      a[sz(i * ldq + c)] = act_byte(t.k, c < k ? int8_t(i % 2 ? -127 : 127) : 0, false, 0);
  std::vector<int32_t> c(sz(m * n));
  const i8::PackedGemm g{.a = a.data(),
                         .lda = ldq,
                         .b = packed.data(),
                         .kp = kp,
                         .comp = comp.data(),
                         .n = n,
                         .c = c.data(),
                         .ldc = n};
  t.k->gemm_packed(g, 0, m, 0, 1);
  t.k->gemm_packed(g, 0, 1, 0, 1);  // and a single row's kernel
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const int64_t av = i % 2 ? -127 : 127, wv = j == 1 ? 127 : -128;
      if (c[sz(i * n + j)] != int32_t(av * wv * k))
        fail("%s at the int32 limit: c[%ld, %ld] = %d, want %ld", t.name, long(i), long(j),
             c[sz(i * n + j)], long(av * wv * k));
    }
}

void check_rowmajor(const Table& t, Rng& r) {
  const int64_t ks[] = {0, 1, 3, 15, 16, 17, 31, 33, 64, 100, 255};
  for (int64_t k : ks)
    for (int64_t m = 1; m <= 6; ++m) {
      const int64_t n = 1 + int64_t(r.below(11)), lda = k + 3, ldb = k + 7, ldc = n + 2;
      std::vector<int8_t> a(sz(m * lda)), b(sz(n * ldb));
      for (auto& v : a) v = int8_t(r.u32());
      for (auto& v : b) v = int8_t(r.u32());
      for (int64_t c = 0; c < k; c += 2) a[sz(c)] = b[sz(c)] = -128;  // -128 x -128 pairs
      std::vector<int32_t> c(sz(m * ldc), 7);
      // Two column ranges, as the driver's blocks.
      const int64_t nsplit = n / 2;
      t.k->gemm(a.data(), b.data(), c.data(), 0, m, 0, nsplit, k, lda, ldb, ldc);
      t.k->gemm(a.data(), b.data(), c.data(), 0, m, nsplit, n, k, lda, ldb, ldc);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j)
          if (c[sz(i * ldc + j)] != int32_t(ref_dot(&a[sz(i * lda)], &b[sz(j * ldb)], k)))
            fail("%s row-major m=%ld k=%ld n=%ld: c[%ld, %ld]", t.name, long(m), long(k), long(n),
                 long(i), long(j));
    }
}

// ---- The driver at every cap ----------------------------------------------------

void check_driver_gemm(Rng& r) {
  // Few rows (row-major kernel) and many (packed, -128 in a corrected).
  const int64_t shapes[][3] = {{1, 1, 1},   {3, 65, 5},    {17, 300, 9},   {23, 100, 40},
                               {24, 64, 4}, {33, 129, 70}, {64, 1000, 33}, {130, 260, 100}};
  for (const auto& s : shapes) {
    const int64_t m = s[0], k = s[1], n = s[2], lda = k + 9;
    std::vector<int8_t> a(sz(m * lda)), b(sz(n * k));
    for (auto& v : a) v = int8_t(r.u32());
    for (auto& v : b) v = int8_t(r.u32());
    a[0] = b[0] = -128;
    std::vector<int32_t> c(sz(m * n));
    i8::gemm_s8s8s32_cpu(a.data(), b.data(), c.data(), m, n, k, lda, k, n);
    int bad = 0;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j)
        bad += c[sz(i * n + j)] != int32_t(ref_dot(&a[sz(i * lda)], &b[sz(j * k)], k));
    if (bad) fail("int8_gemm %ldx%ldx%ld: %d wrong", long(m), long(k), long(n), bad);
  }
  // The int32 limit, -128 x -128 through the packed path's correction.
  const int64_t m = 30, n = 3, k = i8::kMaxK - 1;
  std::vector<int8_t> a(sz(m * k), -128), b(sz(n * k), -128);
  for (int64_t c = 0; c < k; ++c) b[sz(k + c)] = 127;
  std::vector<int32_t> c(sz(m * n));
  i8::gemm_s8s8s32_cpu(a.data(), b.data(), c.data(), m, n, k, k, k, n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j)
      if (c[sz(i * n + j)] != int32_t(-128 * (j == 1 ? 127 : -128) * k))
        fail("int8_gemm at the int32 limit: c[%ld, %ld] = %d", long(i), long(j), c[sz(i * n + j)]);
}

void check_driver_linear(Rng& r) {
  const int64_t shapes[][3] = {{1, 1, 1},     {1, 256, 64}, {5, 3, 17},    {6, 130, 70},
                               {13, 255, 65}, {20, 64, 48}, {40, 300, 33}, {100, 100, 20}};
  for (int bits : {8, 7})
    for (DType xt : {DType::f32, DType::f16, DType::bf16})
      for (DType yt : {DType::f32, DType::f16, DType::bf16})
        for (const auto& s : shapes) {
          const int64_t m = s[0], k = s[1], n = s[2], ldx = k + 2;
          std::vector<uint8_t> x;
          fill_float(r, xt, &x, m * ldx, 2.0f);
          if (m > 3) {
            set_float(xt, &x, 2 * ldx + k / 2, NAN);  // stays in its row
            set_float(xt, &x, 3 * ldx, INFINITY);
          }
          std::vector<int8_t> w(sz(n * k));
          for (auto& v : w) v = int8_t(r.u32());
          std::vector<int8_t> packed(sz(i8::packed_n(n) * i8::packed_k(k)));
          std::vector<int32_t> comp(sz(i8::packed_n(n)));
          i8::pack_weight_cpu(w.data(), n, k, k, packed.data(), comp.data());
          std::vector<float> ws(sz(n)), bias(sz(n));
          for (auto& v : ws) v = 0.001f + 0.02f * float(r.below(1000)) / 1000.0f;
          for (auto& v : bias) v = r.normal();
          std::vector<uint8_t> y(sz(m * n * bytes_of(yt)));
          i8::linear_dynamic_cpu(x.data(), xt, m, k, ldx, packed.data(), comp.data(), ws.data(),
                                 bias.data(), n, y.data(), yt, bits);
          std::vector<int8_t> q(sz(k));
          int bad = 0;
          for (int64_t i = 0; i < m; ++i) {
            const float as = ref_quantize(x.data(), xt, i * ldx, k, bits, q.data());
            for (int64_t j = 0; j < n; ++j) {
              const int64_t acc = ref_dot(q.data(), &w[sz(j * k)], k);
              bad += !out_ok(yt, y.data(), i * n + j, acc, as, ws[sz(j)], bias[sz(j)]);
            }
          }
          if (bad)
            fail("int8_linear act_bits=%d %s -> %s %ldx%ldx%ld: %d wrong", bits, dtype_name(xt),
                 dtype_name(yt), long(m), long(k), long(n), bad);
        }
}

}  // namespace

int main(int argc, char** argv) {
  const uint64_t seed = argc > 1 ? std::strtoull(argv[1], nullptr, 0) : 0x1d8a5eedull;
  pk_test::banner("int8_isa_test");
  std::printf("seed %#llx%s\n", static_cast<unsigned long long>(seed),
              pk_test::quick() ? ", quick" : "");
  Rng r(seed);
  for (const Table& t : tables()) {
    pk_test::g_context = std::string("table ") + t.name;
    const int before = pk_test::g_failures;
    check_pack(t, r);
    check_quantize(t, r);
    pk_test::g_context = std::string("table ") + t.name;
    check_packed_shapes(t, r);
    check_packed_limit(t);
    check_rowmajor(t, r);
    std::printf("table %s: %s\n", t.name, pk_test::g_failures == before ? "ok" : "FAILED");
  }
  pk_test::for_each_cap([&](pk::Isa) {
    check_driver_gemm(r);
    check_driver_linear(r);
  });
  return pk_test::verdict("int8_isa_test");
}
