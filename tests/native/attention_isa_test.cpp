// The attention family (attention.h: attention_f32_cpu) at every ISA cap and
// one and two threads, and each per-ISA table this CPU runs called directly,
// against softmax(q k^T * scale + mask) v evaluated in double: sequence
// lengths and head dims off every tile and vector width, more keys than one
// block holds, row strides wider than a row, causal, kv_len and q_len,
// broadcast additive masks, rows that see no key (zeros) and NaN rows.
#include "attention/attention_isa.h"

#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "attention/attention.h"
#include "common/parallel.h"
#include "native_test.h"

namespace {

using pk_test::fail;
using pk_test::Rng;

struct Case {
  int64_t b, h, sq, sk, d, dv;
  bool causal, mask, lens;
  int64_t pad;  // extra floats per row: strides wider than a row
};

struct Data {
  std::vector<float> q, k, v, mask, out;
  std::vector<int64_t> kv_len, q_len;
  pk::attention::Problem p;
};

Data make(const Case& c, Rng& rng) {
  Data x;
  const int64_t lq = c.d + c.pad, lv = c.dv + c.pad;
  x.q.resize(size_t(c.b * c.h * c.sq * lq + 1));
  x.k.resize(size_t(c.b * c.h * c.sk * lq + 1));
  x.v.resize(size_t(c.b * c.h * c.sk * lv + 1));
  x.out.assign(size_t(c.b * c.h * c.sq * lv + 1), NAN);
  for (auto* a : {&x.q, &x.k, &x.v})
    for (auto& f : *a) f = rng.normal();
  pk::attention::Problem& p = x.p;
  p.batch = c.b;
  p.heads = c.h;
  p.sq = c.sq;
  p.sk = c.sk;
  p.d = c.d;
  p.dv = c.dv;
  p.q = x.q.data();
  p.qv = {c.h * c.sq * lq, c.sq * lq, lq};
  p.k = x.k.data();
  p.kv = {c.h * c.sk * lq, c.sk * lq, lq};
  p.v = x.v.data();
  p.vv = {c.h * c.sk * lv, c.sk * lv, lv};
  p.out = x.out.data();
  p.ov = {c.h * c.sq * lv, c.sq * lv, lv};
  p.causal = c.causal;
  p.scale = 1.0f / std::sqrt(float(c.d > 0 ? c.d : 1));
  if (c.mask) {  // [B, 1, Sq, Sk], broadcast over heads; -inf now and then
    x.mask.resize(size_t(c.b * c.sq * c.sk + 1));
    for (auto& f : x.mask)
      f = rng.below(5) == 0 ? -std::numeric_limits<float>::infinity() : rng.normal();
    if (c.sq > 1 && c.sk > 0)  // a row that sees no key at all
      for (int64_t j = 0; j < c.sk; ++j) x.mask[1 * c.sk + j] = -INFINITY;
    p.mask = x.mask.data();
    p.mv = {c.sq * c.sk, 0, c.sk};
  }
  if (c.lens) {
    for (int64_t i = 0; i < c.b; ++i) {
      x.kv_len.push_back(int64_t(rng.below(uint64_t(c.sk + 1))));
      x.q_len.push_back(int64_t(rng.below(uint64_t(c.sq + 1))));
    }
    p.kv_len = x.kv_len.data();
    p.q_len = x.q_len.data();
  }
  if (c.sq > 2 && c.d > 0 && !c.lens) x.q[2 * lq] = NAN;  // row 2 of (0, 0): NaN
  return x;
}

// The definition in double; NaN where a row's scores are, zeros where it sees no key.
std::vector<double> reference(const Data& x, const Case& c) {
  const auto& p = x.p;
  std::vector<double> want(size_t(c.b * c.h * c.sq * c.dv), 0.0);
  for (int64_t b = 0; b < c.b; ++b)
    for (int64_t h = 0; h < c.h; ++h)
      for (int64_t i = 0; i < c.sq; ++i) {
        double* o = &want[size_t(((b * c.h + h) * c.sq + i) * c.dv)];
        if (p.q_len && i >= p.q_len[b]) continue;
        const int64_t n = p.kv_len ? p.kv_len[b] : c.sk;
        std::vector<double> s;
        double m = -INFINITY;
        bool nan = false;
        for (int64_t j = 0; j < n; ++j) {
          double t = -INFINITY;
          if (!c.causal || j <= i) {
            double dot = 0;
            for (int64_t e = 0; e < c.d; ++e)
              dot += double(p.q[b * p.qv.sb + h * p.qv.sh + i * p.qv.ss + e]) *
                     p.k[b * p.kv.sb + h * p.kv.sh + j * p.kv.ss + e];
            t = dot * p.scale + (p.mask ? p.mask[b * p.mv.sb + i * p.mv.ss + j] : 0.0);
          }
          nan |= std::isnan(t);
          s.push_back(t);
          if (t > m) m = t;
        }
        if (nan) {
          for (int64_t e = 0; e < c.dv; ++e) o[e] = NAN;
          continue;
        }
        if (m == -INFINITY) continue;
        double l = 0;
        for (int64_t j = 0; j < n; ++j) {
          const double w = std::exp(s[size_t(j)] - m);
          l += w;
          for (int64_t e = 0; e < c.dv; ++e)
            o[e] += w * p.v[b * p.vv.sb + h * p.vv.sh + j * p.vv.ss + e];
        }
        for (int64_t e = 0; e < c.dv; ++e) o[e] /= l;
      }
  return want;
}

void compare(const Data& x, const std::vector<double>& want, const Case& c, const char* what) {
  for (int64_t b = 0; b < c.b; ++b)
    for (int64_t h = 0; h < c.h; ++h)
      for (int64_t i = 0; i < c.sq; ++i)
        for (int64_t e = 0; e < c.dv; ++e) {
          const double w = want[size_t(((b * c.h + h) * c.sq + i) * c.dv + e)];
          const float g = x.out[size_t(b * x.p.ov.sb + h * x.p.ov.sh + i * x.p.ov.ss + e)];
          ++pk_test::g_checks;
          const bool ok = std::isnan(w) ? std::isnan(g) : std::fabs(double(g) - w) <= 1e-5;
          if (!ok) {
            fail(
                "%s b=%lld h=%lld sq=%lld sk=%lld d=%lld dv=%lld causal=%d mask=%d lens=%d: "
                "(%lld,%lld,%lld,%lld) got %g want %g",
                what, (long long)c.b, (long long)c.h, (long long)c.sq, (long long)c.sk,
                (long long)c.d, (long long)c.dv, c.causal, c.mask, c.lens, (long long)b,
                (long long)h, (long long)i, (long long)e, double(g), w);
            return;
          }
        }
}

void run_case(const Case& c, Rng& rng, const pk::attention::Kernels* table) {
  Data x = make(c, rng);
  const std::vector<double> want = reference(x, c);
  if (!table) {
    pk::attention::attention_f32_cpu(x.p);
  } else {
    std::vector<float> scratch(size_t(table->scratch_floats(x.p)));
    for (int64_t b = 0; b < c.b; ++b)
      for (int64_t h = 0; h < c.h; ++h)
        if (c.sq) table->head(x.p, b, h, 0, c.sq, scratch.data());
  }
  compare(x, want, c, table ? "table" : "driver");
}

std::vector<Case> cases() {
  std::vector<Case> v;
  const int64_t seqs[][2] = {{1, 1}, {17, 17}, {33, 70}, {128, 128}, {5, 0}, {0, 4}};
  const int64_t dims[][2] = {{32, 32}, {64, 64}, {80, 48}, {5, 3}, {128, 128}};
  for (const auto& s : seqs)
    for (const auto& dd : dims)
      for (int flags = 0; flags < 8; ++flags)
        v.push_back({2, 3, s[0], s[1], dd[0], dd[1], bool(flags & 1), bool(flags & 2),
                     bool(flags & 4), flags & 1 ? 3 : 0});
  // More keys than one block (256) holds, with and without the causal limit.
  for (int flags = 0; flags < 8; ++flags)
    v.push_back({1, 2, pk_test::quick() ? 40 : 300, 600, 32, 40, bool(flags & 1), bool(flags & 2),
                 bool(flags & 4), 1});
  return v;
}

}  // namespace

int main() {
  pk_test::banner("attention_isa_test");
  Rng rng(20261207);
  for (int threads : {1, 2}) {
    pk::set_max_threads(threads);
    pk_test::for_each_cap([&](pk::Isa) {
      for (const Case& c : cases()) run_case(c, rng, nullptr);
    });
  }
  std::vector<const pk::attention::Kernels*> tables = {pk::attention::kernels_portable()};
#ifdef PK_HAVE_AVX2
  if (pk::detected_isa() >= pk::Isa::avx2) tables.push_back(pk::attention::kernels_avx2());
#endif
#ifdef PK_HAVE_AVX512
  if (pk::detected_isa() >= pk::Isa::avx512) tables.push_back(pk::attention::kernels_avx512());
#endif
  for (const auto* t : tables)
    for (const Case& c : cases()) run_case(c, rng, t);
  return pk_test::verdict("attention_isa_test");
}
