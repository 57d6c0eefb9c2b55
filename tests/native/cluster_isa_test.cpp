// The cluster family (csrc/cluster) against references written here: the
// kernel tables one by one (portable, and each tier this build has and the
// CPU runs: neon and dotprod on aarch64, avx2 and avx512_vnni on x86-64),
// then linear_cpu at every ISA cap. Weight-only outputs are float sums in
// any order: within 1e-5 of the sum of their terms' magnitudes (plus 1e-6),
// NaN and inf where the reference has them. The dynamic mode's sums are
// exact integers, so its outputs must be float(acc) * (x_scale * cb_scale) +
// bias rounded, with the multiply-add fused or not; the quantizer must match
// bit for bit. Usage: cluster_isa_test [SEED]; PK_TEST_QUICK=1 runs fewer
// shapes.
#include "cluster/cluster_isa.h"

#include <cmath>
#include <cstdlib>
#include <vector>

#include "cluster/cluster.h"
#include "native_test.h"

namespace {

namespace cl = pk::cluster;
using pk_test::fail;
using pk_test::Rng;

size_t sz(int64_t n) { return static_cast<size_t>(n); }

// ---- Layers -------------------------------------------------------------------

// Codes (one per weight, any value below 2^bits: codes >= nc read 0), their
// packed rows (cluster.h), codebooks (one per row or one for all).
struct Layer {
  int64_t n = 0, k = 0, nc = 0;
  int bits = 4;
  bool per_row = true;
  std::vector<uint8_t> idx;     // n x k
  std::vector<uint8_t> packed;  // n x code_row_bytes(k, bits)
  std::vector<float> cb;        // (per_row ? n : 1) x nc

  int64_t code_ld() const { return cl::code_row_bytes(k, bits); }
  float weight(int64_t row, int64_t c) const {
    const unsigned code = idx[sz(row * k + c)];
    return code < nc ? cb[sz((per_row ? row : 0) * nc + code)] : 0.0f;
  }
};

void pack(Layer* l) {
  const int64_t ld = l->code_ld();
  l->packed.assign(sz(l->n * ld), 0);
  for (int64_t r = 0; r < l->n; ++r)
    for (int64_t c = 0; c < l->k; ++c) {
      const uint8_t code = l->idx[sz(r * l->k + c)];
      if (l->bits == 8) {
        l->packed[sz(r * ld + c)] = code;
        continue;
      }
      // bits [4j, 4j + 4) of little-endian uint32 lane i of group g hold k =
      // 128 g + 16 j + i
      const int64_t g = c / 128, i = c % 16, j = (c % 128) / 16;
      l->packed[sz(r * ld + 64 * g + 4 * i + j / 2)] |= uint8_t(code << (4 * (j % 2)));
    }
}

// Codes uniform below 2^bits, so some reach past nc, with code 0 and the
// largest code (15 or 255) at the first and last columns of every row.
Layer make_layer(Rng& r, int64_t n, int64_t k, int bits, int64_t nc, bool per_row) {
  Layer l;
  l.n = n;
  l.k = k;
  l.bits = bits;
  l.nc = nc;
  l.per_row = per_row;
  const unsigned top = bits == 4 ? 15u : 255u;
  l.idx.resize(sz(n * k));
  for (int64_t row = 0; row < n; ++row)
    for (int64_t c = 0; c < k; ++c) {
      // Mostly codes below nc (the layer's real weights), some past it.
      const uint64_t pick = r.below(8);
      l.idx[sz(row * k + c)] = uint8_t(pick == 0 ? r.below(top + 1) : r.below(uint64_t(nc)));
    }
  for (int64_t row = 0; row < n; ++row) {
    l.idx[sz(row * k)] = 0;
    if (k > 1) l.idx[sz(row * k + k - 1)] = uint8_t(top);
  }
  l.cb.resize(sz((per_row ? n : 1) * nc));
  for (float& v : l.cb) v = r.normal();
  pack(&l);
  return l;
}

// ---- References -------------------------------------------------------------------

struct Ref {
  std::vector<double> v, mag;
};

Ref ref_weight_only(const Layer& l, const float* x, int64_t m, int64_t ldx, const float* bias) {
  Ref r;
  r.v.assign(sz(m * l.n), 0.0);
  r.mag.assign(sz(m * l.n), 0.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t row = 0; row < l.n; ++row) {
      double s = bias ? bias[row] : 0.0, a = bias ? std::fabs(double(bias[row])) : 0.0;
      for (int64_t c = 0; c < l.k; ++c) {
        const double t = double(x[i * ldx + c]) * double(l.weight(row, c));
        s += t;
        a += std::fabs(t);
      }
      r.v[sz(i * l.n + row)] = s;
      r.mag[sz(i * l.n + row)] = a;
    }
  return r;
}

bool usable(float s) { return s > 0.0f && s <= 3.4028234663852886e38f; }

// int8::quantize_per_row of `len` values (cluster.h): scale max|x| / 127
// (NaN if any is NaN), round half to even, clamped to [-127, 127].
float ref_quantize(const float* x, int64_t len, int8_t* q) {
  float amax = 0.0f;
  bool nan = false;
  for (int64_t c = 0; c < len; ++c) {
    nan |= x[c] != x[c];
    const float a = std::fabs(x[c]);
    amax = amax < a ? a : amax;
  }
  const float s = nan ? NAN : amax / 127.0f;
  for (int64_t c = 0; c < len; ++c) {
    const volatile float d = x[c] / s;  // rounded to float before nearbyint, as the kernels do
    q[c] = usable(s) ? int8_t(std::fmin(127.0f, std::fmax(-127.0f, std::nearbyint(float(d)))))
                     : int8_t(0);
  }
  return s;
}

// The dynamic mode: x and the codebooks quantized, exact int64 sums.
struct DynRef {
  std::vector<int64_t> acc;  // m x n
  std::vector<float> xs, cs;
};

DynRef ref_dynamic(const Layer& l, const float* x, int64_t m, int64_t ldx) {
  DynRef d;
  const int64_t rows = l.per_row ? l.n : 1, tab = l.bits == 4 ? 16 : 256;
  std::vector<int8_t> xq(sz(m * l.k)), cq(sz(rows * tab), 0);
  d.xs.resize(sz(m));
  d.cs.resize(sz(rows));
  for (int64_t i = 0; i < m; ++i) d.xs[sz(i)] = ref_quantize(x + i * ldx, l.k, &xq[sz(i * l.k)]);
  for (int64_t r = 0; r < rows; ++r)
    d.cs[sz(r)] = ref_quantize(&l.cb[sz(r * l.nc)], l.nc, &cq[sz(r * tab)]);
  d.acc.assign(sz(m * l.n), 0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t row = 0; row < l.n; ++row) {
      int64_t s = 0;
      const int8_t* t = &cq[sz((l.per_row ? row : 0) * tab)];
      for (int64_t c = 0; c < l.k; ++c)
        s += int64_t(xq[sz(i * l.k + c)]) * t[l.idx[sz(row * l.k + c)]];
      d.acc[sz(i * l.n + row)] = s;
    }
  return d;
}

// ---- Comparisons ---------------------------------------------------------------

void expect_close(const char* what, const float* got, const Ref& ref, int64_t count) {
  int reported = 0;
  for (int64_t i = 0; i < count; ++i) {
    const double want = ref.v[sz(i)], g = got[i];
    bool ok;
    if (std::isnan(want))
      ok = std::isnan(g);
    else if (std::isinf(want))
      ok = g == want;
    else
      ok = std::isfinite(g) && std::fabs(g - want) <= 1e-5 * ref.mag[sz(i)] + 1e-6;
    if (!ok && reported++ < 3) fail("%s[%lld]: got %.9g, want %.9g", what, (long long)i, g, want);
  }
}

// y[i, row] = float(acc) * (xs[i] * cs[row]) + bias[row], fused or not,
// for the output columns [n0, n1).
void expect_dynamic(const char* what, const float* y, const Layer& l, const DynRef& d, int64_t m,
                    const float* bias, int64_t n0, int64_t n1) {
  int reported = 0;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t row = n0; row < n1; ++row) {
      const float a = float(d.acc[sz(i * l.n + row)]);
      const float sc = d.xs[sz(i)] * d.cs[sz(l.per_row ? row : 0)];
      const float b = bias ? bias[row] : 0.0f;
      const volatile float prod = a * sc;  // rounded on its own, not fused here
      const float plain = bias ? prod + b : float(prod), fused = bias ? std::fma(a, sc, b) : plain;
      const float got = y[i * l.n + row];
      const bool ok = plain != plain ? got != got
                                     : pk_test::bits(got) == pk_test::bits(plain) ||
                                           pk_test::bits(got) == pk_test::bits(fused);
      if (!ok && reported++ < 3)
        fail("%s[%lld][%lld]: got %.9g, want %.9g (acc %lld)", what, (long long)i, (long long)row,
             got, plain, (long long)d.acc[sz(i * l.n + row)]);
    }
}

// x: m rows of k, row stride k + 3, NaN in the stride's padding (never
// read); row m / 2 holds a NaN and the last row an inf when `specials`.
std::vector<float> make_x(Rng& r, int64_t m, int64_t k, bool specials) {
  std::vector<float> x(sz(m * (k + 3)), NAN);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < k; ++c) x[sz(i * (k + 3) + c)] = r.normal();
  if (specials && m > 1) {
    x[sz((m / 2) * (k + 3) + k / 2)] = NAN;
    x[sz((m - 1) * (k + 3) + k - 1)] = INFINITY;
  }
  return x;
}

// ---- The kernel tables, called directly ---------------------------------------------

struct Table {
  const char* name;
  const cl::Kernels* kern;
};

std::vector<Table> tables() {
  std::vector<Table> t = {{"portable", cl::kernels_portable()}};
  const int cpu = static_cast<int>(pk::detected_isa());
#ifdef PK_HAVE_NEON
  if (cpu >= static_cast<int>(pk::Isa::neon)) t.push_back({"neon", cl::kernels_neon()});
#endif
#ifdef PK_HAVE_DOTPROD
  if (cpu >= static_cast<int>(pk::Isa::dotprod)) t.push_back({"dotprod", cl::kernels_dotprod()});
#endif
#ifdef PK_HAVE_AVX2
  if (cpu >= static_cast<int>(pk::Isa::avx2)) t.push_back({"avx2", cl::kernels_avx2()});
#endif
#ifdef PK_HAVE_AVX512
  if (pk::has_avx512_vnni()) t.push_back({"avx512_vnni", cl::kernels_avx512_vnni()});
#endif
  (void)cpu;
  return t;
}

// The quantizer on rows of `len` values: activations (rows of ldd bytes,
// perm4 order for 4-bit codes, with sums) and codebooks (16-entry rows, no
// sums: the AVX-512 table's own path), against ref_quantize bit for bit.
void check_quantize(const Table& t, Rng& r) {
  for (int64_t len : {1, 5, 16, 17, 128, 200, 300}) {
    for (bool perm4 : {false, true}) {
      const int64_t groups = (len + 127) / 128, ldd = perm4 ? 128 * groups + 64 : len + 7;
      const int64_t rows = 6;
      std::vector<float> src(sz(rows * (len + 2)));
      for (float& v : src) v = r.normal() * 3.0f;
      for (int64_t c = 0; c < len; ++c) src[sz(1 * (len + 2) + c)] = 0.0f;  // all zero: scale 0
      src[sz(2 * (len + 2) + len / 2)] = NAN;
      src[sz(3 * (len + 2))] = INFINITY;
      src[sz(4 * (len + 2) + len - 1)] = 127.5f;  // x / s exactly 127: ties stay in range
      std::vector<int8_t> dst(sz(rows * ldd), 99);
      std::vector<float> scale(sz(rows), -1.0f);
      std::vector<int32_t> sum(sz(rows), -1);
      // Rows [1, rows - 1): the first and last must stay untouched.
      t.kern->quantize(src.data(), len + 2, len, dst.data(), ldd, perm4, scale.data(), sum.data(),
                       1, rows - 1);
      for (int64_t row = 0; row < rows; ++row) {
        const bool inside = row >= 1 && row < rows - 1;
        if (!inside) {
          PK_EXPECT(scale[sz(row)] == -1.0f && sum[sz(row)] == -1);
          for (int64_t c = 0; c < ldd; ++c) PK_EXPECT(dst[sz(row * ldd + c)] == 99);
          continue;
        }
        std::vector<int8_t> q(sz(ldd), 0);
        const float s = ref_quantize(&src[sz(row * (len + 2))], len, q.data());
        int32_t total = 0;
        for (int8_t v : q) total += v;
        if (!(pk_test::bits(scale[sz(row)]) == pk_test::bits(s) ||
              (s != s && scale[sz(row)] != scale[sz(row)])))
          fail("quantize len %lld row %lld: scale %.9g, want %.9g", (long long)len, (long long)row,
               scale[sz(row)], s);
        if (sum[sz(row)] != total)
          fail("quantize len %lld row %lld: sum %d, want %d", (long long)len, (long long)row,
               sum[sz(row)], total);
        for (int64_t c = 0; c < ldd; ++c) {
          const int64_t at = perm4 && c < 128 * groups ? cl::dynamic_x_pos4(c) : c;
          if (dst[sz(row * ldd + at)] != q[sz(c)]) {
            fail("quantize len %lld perm4 %d row %lld: byte %lld is %d, want %d", (long long)len,
                 int(perm4), (long long)row, (long long)c, dst[sz(row * ldd + at)], q[sz(c)]);
            break;
          }
        }
      }
    }
  }
  // Codebook rows: 16-byte tables, zero past nc, no sums.
  for (int64_t nc : {1, 2, 5, 15, 16}) {
    std::vector<float> cb(sz(3 * nc));
    for (float& v : cb) v = r.normal();
    std::vector<int8_t> dst(sz(3 * 16), 99);
    std::vector<float> scale(3);
    t.kern->quantize(cb.data(), nc, nc, dst.data(), 16, false, scale.data(), nullptr, 0, 3);
    for (int64_t row = 0; row < 3; ++row) {
      int8_t q[16] = {};
      const float s = ref_quantize(&cb[sz(row * nc)], nc, q);
      PK_EXPECT(pk_test::bits(scale[sz(row)]) == pk_test::bits(s));
      for (int c = 0; c < 16; ++c)
        if (dst[sz(row * 16 + c)] != q[c])
          fail("quantize codebook nc %lld row %lld entry %d: %d, want %d", (long long)nc,
               (long long)row, c, dst[sz(row * 16 + c)], q[c]);
    }
  }
}

// One table's weight-only and dynamic kernels on output columns [n0, n1):
// y elsewhere and the scratch past its size must stay untouched.
void check_table_layer(const Table& t, const Layer& l, Rng& r, int64_t m, int64_t n0, int64_t n1) {
  const int64_t k = l.k, ldx = k + 3;
  const std::vector<float> x = make_x(r, m, k, true);
  std::vector<float> bias(sz(l.n));
  for (float& b : bias) b = r.normal();
  const bool with_bias = m % 2 == 1;

  cl::Args a;
  a.x = x.data();
  a.m = m;
  a.k = k;
  a.ldx = ldx;
  a.codes = l.packed.data();
  a.code_ld = l.code_ld();
  a.codebook = l.cb.data();
  a.cb_ld = l.per_row ? l.nc : 0;
  a.nc = l.nc;
  a.bias = with_bias ? bias.data() : nullptr;
  a.n = l.n;
  std::vector<float> y(sz(m * l.n) + 3, -777.0f), wf(sz(4 * k) + 16, -555.0f);
  a.y = y.data();
  (l.bits == 4 ? t.kern->linear4 : t.kern->linear8)(a, n0, n1, wf.data());
  const Ref ref = ref_weight_only(l, x.data(), m, ldx, a.bias);
  std::vector<float> got;
  Ref want;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t row = 0; row < l.n; ++row) {
      const float v = y[sz(i * l.n + row)];
      if (row >= n0 && row < n1) {
        got.push_back(v);
        want.v.push_back(ref.v[sz(i * l.n + row)]);
        want.mag.push_back(ref.mag[sz(i * l.n + row)]);
      } else if (v != -777.0f) {
        fail("linear%d wrote y[%lld][%lld] outside [%lld, %lld)", l.bits, (long long)i,
             (long long)row, (long long)n0, (long long)n1);
      }
    }
  expect_close(l.bits == 4 ? "linear4" : "linear8", got.data(), want, int64_t(got.size()));
  for (int q = 0; q < 3; ++q) PK_EXPECT(y[sz(m * l.n + q)] == -777.0f);
  for (int q = 0; q < 16; ++q) PK_EXPECT(wf[sz(4 * k + q)] == -555.0f);

  // Dynamic: operands as the driver lays them out, from the references.
  const DynRef d = ref_dynamic(l, x.data(), m, ldx);
  const int64_t kq = l.bits == 4 ? 2 * l.code_ld() : k, ldq = kq % 256 == 0 ? kq + 64 : kq;
  const int64_t rows = l.per_row ? l.n : 1, tab = l.bits == 4 ? 16 : 256;
  std::vector<int8_t> xq(sz(m * ldq), 0), cq(sz(rows * tab), 0);
  std::vector<int32_t> xsum(sz(m), 0);
  for (int64_t i = 0; i < m; ++i) {
    std::vector<int8_t> q(sz(k));
    ref_quantize(&x[sz(i * ldx)], k, q.data());
    for (int64_t c = 0; c < k; ++c) {
      xq[sz(i * ldq + (l.bits == 4 ? cl::dynamic_x_pos4(c) : c))] = q[sz(c)];
      xsum[sz(i)] += q[sz(c)];
    }
  }
  for (int64_t row = 0; row < rows; ++row)
    ref_quantize(&l.cb[sz(row * l.nc)], l.nc, &cq[sz(row * tab)]);
  cl::DynArgs da;
  da.xq = xq.data();
  da.kq = kq;
  da.ldq = ldq;
  da.xsum = xsum.data();
  da.xs = d.xs.data();
  da.m = m;
  da.k = k;
  da.codes = l.packed.data();
  da.code_ld = l.code_ld();
  da.cq = cq.data();
  da.cq_ld = l.per_row ? tab : 0;
  da.cs = d.cs.data();
  da.cs_ld = l.per_row ? 1 : 0;
  da.bias = a.bias;
  da.n = l.n;
  std::vector<float> yd(sz(m * l.n) + 3, -777.0f);
  std::vector<int8_t> wq(sz(4 * kq) + 16, 77);
  da.y = yd.data();
  (l.bits == 4 ? t.kern->dynamic4 : t.kern->dynamic8)(da, n0, n1, wq.data());
  for (int64_t i = 0; i < m; ++i)
    for (int64_t row = 0; row < l.n; ++row)
      if ((row < n0 || row >= n1) && yd[sz(i * l.n + row)] != -777.0f)
        fail("dynamic%d wrote y[%lld][%lld] outside [%lld, %lld)", l.bits, (long long)i,
             (long long)row, (long long)n0, (long long)n1);
  expect_dynamic(l.bits == 4 ? "dynamic4" : "dynamic8", yd.data(), l, d, m, da.bias, n0, n1);
  for (int q = 0; q < 3; ++q) PK_EXPECT(yd[sz(m * l.n + q)] == -777.0f);
  for (int q = 0; q < 16; ++q) PK_EXPECT(wq[sz(4 * kq + q)] == 77);
}

void check_tables(uint64_t seed) {
  const bool quick = pk_test::quick();
  std::vector<int64_t> ks = {1, 15, 17, 128, 129, 300, 1025, 2100};
  std::vector<int64_t> ms = {1, 2, 3, 4, 5, 9};
  if (quick) {
    ks = {1, 17, 129, 1025};
    ms = {1, 3, 5};
  }
  for (const Table& t : tables()) {
    Rng r(seed);
    pk_test::g_context = std::string("table ") + t.name + " quantize";
    check_quantize(t, r);
    for (int bits : {4, 8})
      for (int64_t nc :
           bits == 4 ? std::vector<int64_t>{1, 5, 16} : std::vector<int64_t>{3, 200, 256})
        for (int64_t k : ks)
          for (int64_t n : {int64_t(1), int64_t(6), int64_t(9)}) {
            const bool per_row = (k + n) % 2 == 0;
            const Layer l = make_layer(r, n, k, bits, nc, per_row);
            for (int64_t m : ms) {
              pk_test::g_context = std::string("table ") + t.name +
                                   " bits=" + std::to_string(bits) + " nc=" + std::to_string(nc) +
                                   " m=" + std::to_string(m) + " k=" + std::to_string(k) +
                                   " n=" + std::to_string(n) +
                                   (per_row ? " per-row" : " per-layer");
              check_table_layer(t, l, r, m, 0, n);
              if (n > 5)
                check_table_layer(t, l, r, m, 4, n - 1);  // the driver's ranges start at 4j
            }
          }
  }
  pk_test::g_context.clear();
}

// ---- The API at every cap ------------------------------------------------------------

void check_api(uint64_t seed) {
  const bool quick = pk_test::quick();
  struct Shape {
    int64_t m, k, n;
  };
  std::vector<Shape> shapes = {{1, 1, 1},   {1, 300, 37},  {5, 128, 8},   {16, 1000, 65},
                               {7, 129, 4}, {3, 4096, 9},  {33, 257, 13}, {9, 2100, 5},
                               {2, 16, 3},  {4, 1025, 67}, {1, 4096, 67}, {13, 257, 8}};
  if (quick) shapes = {{1, 1, 1}, {1, 300, 37}, {7, 129, 4}, {33, 257, 13}, {4, 1025, 67}};
  pk_test::for_each_cap([&](pk::Isa cap) {
    const std::string at = pk_test::g_context;
    for (const Shape& s : shapes)
      for (int64_t nc : {int64_t(16), int64_t(5), int64_t(2), int64_t(200), int64_t(256)})
        for (bool per_row : {true, false}) {
          Rng r(seed ^ uint64_t(s.m * 1000003 + s.k * 1009 + s.n) ^ uint64_t(nc * 31 + per_row) ^
                uint64_t(static_cast<int>(cap) << 20));
          const int bits = nc <= 16 ? 4 : 8;
          const Layer l = make_layer(r, s.n, s.k, bits, nc, per_row);
          const std::vector<float> x = make_x(r, s.m, s.k, true);
          std::vector<float> bias(sz(s.n));
          for (float& b : bias) b = r.normal();
          const float* bp = s.m % 2 ? bias.data() : nullptr;
          pk_test::g_context = at + " m=" + std::to_string(s.m) + " k=" + std::to_string(s.k) +
                               " n=" + std::to_string(s.n) + " nc=" + std::to_string(nc) +
                               (per_row ? " per-row" : " per-layer");
          std::vector<float> y(sz(s.m * s.n) + 3, -777.0f);
          cl::linear_cpu(x.data(), s.m, s.k, s.k + 3, l.packed.data(), bits, l.cb.data(), nc,
                         per_row, bp, s.n, y.data(), false);
          expect_close("weight-only", y.data(), ref_weight_only(l, x.data(), s.m, s.k + 3, bp),
                       s.m * s.n);
          cl::linear_cpu(x.data(), s.m, s.k, s.k + 3, l.packed.data(), bits, l.cb.data(), nc,
                         per_row, bp, s.n, y.data(), true);
          expect_dynamic("dynamic", y.data(), l, ref_dynamic(l, x.data(), s.m, s.k + 3), s.m, bp, 0,
                         s.n);
          for (int q = 0; q < 3; ++q) PK_EXPECT(y[sz(s.m * s.n + q)] == -777.0f);
        }
  });
}

}  // namespace

int main(int argc, char** argv) {
  pk_test::banner("cluster_isa_test");
  const uint64_t seed = argc > 1 ? std::strtoull(argv[1], nullptr, 0) : 20261207;
  std::printf("seed %llu\n", (unsigned long long)seed);
  check_tables(seed);
  check_api(seed);
  return pk_test::verdict("cluster_isa_test");
}
