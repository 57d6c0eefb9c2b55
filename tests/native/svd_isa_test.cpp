// The svd family's Krylov passes (svd.h: dot_rows_cpu, combine_rows_cpu) at
// every ISA cap, and each per-ISA table this CPU runs directly, against
// products summed in double: shapes with tails past every tile and vector
// width, row strides wider than the row, outputs overwritten (not added to),
// empty sizes, one and several threads.
#include "svd/svd_isa.h"

#include <cmath>
#include <cstdio>
#include <vector>

#include "common/parallel.h"
#include "native_test.h"
#include "svd/svd.h"

namespace {

using pk_test::fail;
using pk_test::Rng;

struct Case {
  int64_t m, n, w, lda;
};

// |got - want| within float32's rounding of a k-term sum, scaled by the
// largest |want|.
void compare(const std::vector<float>& got, const std::vector<double>& want, int64_t k,
             const char* what, const Case& c) {
  double scale = 1.0;
  for (double v : want) scale = std::max(scale, std::fabs(v));
  const double tol = 8.0 * std::sqrt(double(std::max<int64_t>(k, 1))) * 0x1.0p-23 * scale;
  for (size_t i = 0; i < want.size(); ++i) {
    ++pk_test::g_checks;
    if (!(std::fabs(double(got[i]) - want[i]) <= tol)) {
      fail("%s m=%lld n=%lld w=%lld lda=%lld: [%zu] got %g want %g", what, (long long)c.m,
           (long long)c.n, (long long)c.w, (long long)c.lda, i, double(got[i]), want[i]);
      return;
    }
  }
}

void run_case(const Case& c, Rng& rng, const pk::svd::Kernels* table) {
  std::vector<float> a(size_t(std::max<int64_t>(c.m * c.lda, 1)));
  for (auto& v : a) v = rng.normal();
  std::vector<float> q(size_t(std::max<int64_t>(c.w * c.n, 1))),
      kt(size_t(std::max<int64_t>(c.m * c.w, 1)));
  for (auto& v : q) v = rng.normal();
  for (auto& v : kt) v = rng.normal();
  std::vector<double> want_y(size_t(c.w * c.m)), want_z(size_t(c.w * c.n));
  for (int64_t j = 0; j < c.w; ++j)
    for (int64_t i = 0; i < c.m; ++i) {
      double s = 0;
      for (int64_t k = 0; k < c.n; ++k) s += double(q[j * c.n + k]) * a[i * c.lda + k];
      want_y[j * c.m + i] = s;
    }
  for (int64_t j = 0; j < c.w; ++j)
    for (int64_t col = 0; col < c.n; ++col) {
      double s = 0;
      for (int64_t i = 0; i < c.m; ++i) s += double(kt[i * c.w + j]) * a[i * c.lda + col];
      want_z[j * c.n + col] = s;
    }
  std::vector<float> y(want_y.size(), NAN), z(want_z.size(), NAN);
  if (!table) {
    pk::svd::dot_rows_cpu(a.data(), c.m, c.n, c.lda, q.data(), c.w, c.n, y.data(), c.m);
    pk::svd::combine_rows_cpu(a.data(), c.m, c.n, c.lda, kt.data(), c.w, c.w, z.data(), c.n);
  } else {
    const pk::svd::Pass py{a.data(), c.m, c.n, c.lda, c.w, q.data(), c.n, y.data(), c.m};
    const pk::svd::Pass pz{a.data(), c.m, c.n, c.lda, c.w, kt.data(), c.w, z.data(), c.n};
    if (c.m) table->dot_rows(py, 0, c.m);
    if (c.m && c.n) table->combine_rows(pz, 0, c.n);
    if (!c.m) std::fill(z.begin(), z.end(), 0.0f);  // the driver's job for m = 0
  }
  compare(y, want_y, c.n, table ? "table dot_rows" : "dot_rows", c);
  compare(z, want_z, c.m, table ? "table combine_rows" : "combine_rows", c);
}

std::vector<Case> cases() {
  std::vector<Case> v = {{1, 1, 1, 1},        {5, 7, 3, 7},        {17, 33, 13, 40},
                         {100, 257, 20, 257}, {64, 64, 64, 64},    {3, 1000, 7, 1003},
                         {1000, 3, 5, 3},     {129, 131, 80, 131}, {6, 0, 4, 0},
                         {0, 9, 4, 9},        {7, 9, 0, 9},        {25, 65, 6, 70}};
  if (!pk_test::quick()) v.push_back({1003, 517, 20, 517});  // split between threads
  return v;
}

}  // namespace

int main() {
  pk_test::banner("svd_isa_test");
  Rng rng(20261207);
  for (int threads : {1, 2}) {
    pk::set_max_threads(threads);
    pk_test::for_each_cap([&](pk::Isa) {
      for (const Case& c : cases()) run_case(c, rng, nullptr);
    });
  }
  std::vector<const pk::svd::Kernels*> tables = {pk::svd::kernels_portable()};
#ifdef PK_HAVE_NEON
  tables.push_back(pk::svd::kernels_neon());
#endif
#ifdef PK_HAVE_AVX2
  if (pk::detected_isa() >= pk::Isa::avx2) tables.push_back(pk::svd::kernels_avx2());
#endif
#ifdef PK_HAVE_AVX512
  if (pk::detected_isa() >= pk::Isa::avx512) tables.push_back(pk::svd::kernels_avx512());
#endif
  for (const auto* t : tables)
    for (const Case& c : cases()) run_case(c, rng, t);
  return pk_test::verdict("svd_isa_test");
}
