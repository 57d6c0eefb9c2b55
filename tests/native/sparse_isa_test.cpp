// The sparse family (csrc/sparse) against references written here, in
// double: the kernel tables one by one (portable, and each tier this build
// has and the CPU runs: neon on aarch64, avx2 and avx512 on x86-64) on
// transposed chunks of every width they take, then the driver's API
// (linear_cpu, linear_backward_cpu) at every ISA cap. Float sums may differ
// in order from the reference: an output must lie within 1e-5 of the sum of
// its terms' magnitudes (plus 1e-6), as tests/test_sparse.py asks of every
// tier, and be NaN or inf exactly where the reference is. Usage:
// sparse_isa_test [SEED]; PK_TEST_QUICK=1 runs fewer and smaller shapes.
#include "sparse/sparse_isa.h"

#include <cmath>
#include <cstdlib>
#include <vector>

#include "common/parallel.h"
#include "native_test.h"
#include "sparse/sparse.h"

namespace {

namespace sp = pk::sparse;
using pk_test::fail;
using pk_test::Rng;

size_t sz(int64_t n) { return static_cast<size_t>(n); }

// ---- Weights ------------------------------------------------------------------

// A CSR or BSR weight with its storage. Stored rows (block rows) cycle
// through kinds: empty, one value (at the last column), all columns, and
// random densities; BSR values past N or K are zero, as the format says.
struct Weight {
  int64_t n = 0, k = 0;
  int block = 1;
  bool col16 = true;
  std::vector<int64_t> row_ptr;
  std::vector<int32_t> col;  // the indices, whatever their stored width
  std::vector<uint16_t> col_u16;
  std::vector<int32_t> col_i32;
  std::vector<float> values;

  sp::Matrix matrix() const {
    sp::Matrix m;
    m.n = n;
    m.k = k;
    m.block = block;
    m.row_ptr = row_ptr.data();
    m.col16 = col16;
    m.col = col16 ? static_cast<const void*>(col_u16.data()) : col_i32.data();
    m.values = values.data();
    return m;
  }
  int64_t stored_rows() const { return block == 1 ? n : (n + 3) / 4; }
  int64_t stored_cols() const { return block == 1 ? k : (k + 3) / 4; }
  int64_t nnz() const { return row_ptr.back(); }
};

// kinds: 0 random density, 1 empty, 2 one value at the last column, 3 every
// column; `density` caps the random rows.
Weight make_weight(Rng& r, int64_t n, int64_t k, int block, bool col16, double density) {
  Weight w;
  w.n = n;
  w.k = k;
  w.block = block;
  w.col16 = col16;
  const int64_t rows = w.stored_rows(), cols = w.stored_cols();
  w.row_ptr.push_back(0);
  for (int64_t b = 0; b < rows; ++b) {
    const int kind = int(b % 5 == 1 ? 1 : b % 5 == 2 ? 2 : b % 7 == 3 ? 3 : 0);
    const double d = density * double(r.below(1000)) / 1000.0;
    for (int64_t c = 0; c < cols; ++c) {
      const bool keep = kind == 3 || (kind == 2 && c == cols - 1) ||
                        (kind == 0 && double(r.below(1 << 20)) < d * double(1 << 20));
      if (!keep) continue;
      w.col.push_back(int32_t(c));
      for (int e = 0; e < block * block; ++e) {
        const int64_t row = b * block + e / block, cc = c * block + e % block;
        w.values.push_back(row < n && cc < k ? r.normal() : 0.0f);
      }
    }
    w.row_ptr.push_back(int64_t(w.col.size()));
  }
  for (int32_t c : w.col) {
    w.col_u16.push_back(uint16_t(c));
    w.col_i32.push_back(c);
  }
  return w;
}

// A few stored values at wide columns (K past 32767 for 16-bit indices read
// unsigned, past 65535 for 32-bit ones), CSR: row r holds 3 r values, row 0
// the last column, row 1 column 40000.
Weight wide_weight(Rng& r, int64_t n, int64_t k) {
  Weight w;
  w.n = n;
  w.k = k;
  w.col16 = k <= 65536;
  w.row_ptr.push_back(0);
  for (int64_t row = 0; row < n; ++row) {
    std::vector<int32_t> cs;
    if (row == 0) cs.push_back(int32_t(k - 1));
    if (row == 1) cs.push_back(40000);
    for (int64_t t = 0; t < 3 * row; ++t) cs.push_back(int32_t(r.below(uint64_t(k))));
    // sorted and distinct, as to_sparse makes them
    for (size_t a = 0; a < cs.size(); ++a)
      for (size_t b = a + 1; b < cs.size(); ++b)
        if (cs[b] < cs[a]) std::swap(cs[a], cs[b]);
    int32_t last = -1;
    for (int32_t c : cs) {
      if (c == last) continue;
      last = c;
      w.col.push_back(c);
      w.values.push_back(r.normal());
    }
    w.row_ptr.push_back(int64_t(w.col.size()));
  }
  for (int32_t c : w.col) {
    w.col_u16.push_back(uint16_t(c));
    w.col_i32.push_back(c);
  }
  return w;
}

// Calls f(row, col, value, index of the stored value) for each stored
// entry inside N x K (BSR: the block's entries, zeros within K included,
// since the kernels multiply those too).
template <class F>
void for_each_entry(const Weight& w, F f) {
  const int bl = w.block;
  for (int64_t b = 0; b < w.stored_rows(); ++b)
    for (int64_t j = w.row_ptr[sz(b)]; j < w.row_ptr[sz(b + 1)]; ++j)
      for (int e = 0; e < bl * bl; ++e) {
        const int64_t row = b * bl + e / bl, c = int64_t(w.col[sz(j)]) * bl + e % bl;
        if (row < w.n && c < w.k) f(row, c, w.values[sz(j * bl * bl + e)], j * bl * bl + e);
      }
}

// ---- References and comparison ----------------------------------------------------

struct Ref {
  std::vector<double> v, mag;  // the sum and the sum of its terms' magnitudes
};

// y = x W^T + bias, x of row stride ldx.
Ref ref_forward(const Weight& w, const float* x, int64_t m, int64_t ldx, const float* bias) {
  Ref r;
  r.v.assign(sz(m * w.n), 0.0);
  r.mag.assign(sz(m * w.n), 0.0);
  for (int64_t i = 0; i < m; ++i) {
    for_each_entry(w, [&](int64_t row, int64_t c, float v, int64_t) {
      const double t = double(v) * double(x[i * ldx + c]);
      r.v[sz(i * w.n + row)] += t;
      r.mag[sz(i * w.n + row)] += std::fabs(t);
    });
    if (bias)
      for (int64_t row = 0; row < w.n; ++row) {
        r.v[sz(i * w.n + row)] += bias[row];
        r.mag[sz(i * w.n + row)] += std::fabs(double(bias[row]));
      }
  }
  return r;
}

// dx = dy W (M x K), dv[j] = sum_i dy[i, row(j)] x[i, col(j)] (CSR).
void ref_backward(const Weight& w, const float* dy, const float* x, int64_t m, int64_t ldx, Ref* dx,
                  Ref* dv) {
  dx->v.assign(sz(m * w.k), 0.0);
  dx->mag.assign(sz(m * w.k), 0.0);
  dv->v.assign(w.values.size(), 0.0);
  dv->mag.assign(w.values.size(), 0.0);
  for (int64_t i = 0; i < m; ++i)
    for_each_entry(w, [&](int64_t row, int64_t c, float v, int64_t j) {
      const double g = dy[i * w.n + row];
      dx->v[sz(i * w.k + c)] += g * v;
      dx->mag[sz(i * w.k + c)] += std::fabs(g * v);
      dv->v[sz(j)] += g * x[i * ldx + c];
      dv->mag[sz(j)] += std::fabs(g * x[i * ldx + c]);
    });
}

// got[i] against ref: within 1e-5 * mag + 1e-6, NaN and inf where the
// reference has them (with the same sign for inf).
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

std::vector<float> normals(Rng& r, int64_t count) {
  std::vector<float> v(sz(count));
  for (float& f : v) f = r.normal();
  return v;
}

// ---- The kernel tables, called directly ---------------------------------------------

struct Table {
  const char* name;
  const sp::Kernels* kern;
  std::vector<int> widths;  // the chunk widths (MC) it takes
  bool bsr32;               // whether it takes BSR at MC = 32
};

std::vector<Table> tables() {
  std::vector<Table> t;
  t.push_back({"portable", sp::kernels_portable(), {1, 16, 32}, true});
  const int cpu = static_cast<int>(pk::detected_isa());
#ifdef PK_HAVE_NEON
  if (cpu >= static_cast<int>(pk::Isa::neon))
    t.push_back({"neon", sp::kernels_neon(), {1, 16, 32}, true});
#endif
#ifdef PK_HAVE_AVX2
  if (cpu >= static_cast<int>(pk::Isa::avx2))  // BSR at 16 at most (the driver's rule)
    t.push_back({"avx2", sp::kernels_avx2(), {1, 8, 16, 32}, false});
#endif
#ifdef PK_HAVE_AVX512
  if (cpu >= static_cast<int>(pk::Isa::avx512))
    t.push_back({"avx512", sp::kernels_avx512(), {1, 16, 32}, true});
#endif
  (void)cpu;
  return t;
}

// Floats at a 64-byte boundary, as the driver's chunks are (the AVX2
// kernels use aligned loads on them).
struct Aligned {
  std::vector<float> buf;
  float* p;
  Aligned(int64_t count, float fill) : buf(sz(count + 16), fill) {
    p = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
  }
  Aligned(const Aligned&) = delete;  // p points into buf: a move keeps it valid, a copy would not
  Aligned(Aligned&&) = default;
  float& operator[](int64_t i) { return p[i]; }
  float operator[](int64_t i) const { return p[i]; }
};

// xt[c][i] = x[m0 + i][c] for i < mc, 0 up to mc_pad (as the driver lays it),
// then four rows of NaN, which no kernel may read (a BSR edge block's
// columns past K included).
Aligned transpose(const float* x, int64_t ldx, int64_t m0, int64_t mc, int64_t cols, int mc_pad) {
  Aligned xt((cols + 4) * mc_pad, 0.0f);
  for (int64_t i = cols * mc_pad; i < (cols + 4) * mc_pad; ++i) xt[i] = NAN;
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t i = 0; i < mc; ++i) xt[c * mc_pad + i] = x[(m0 + i) * ldx + c];
  return xt;
}

// One table's forward, backward_x and sddmm on rows [r0, r1) of one chunk of
// mc columns of M, padded to mc_pad; rows outside the range and the padding
// columns of y must stay untouched.
void check_table_chunk(const Table& t, const Weight& w, Rng& r, int mc_pad, int64_t mc, int64_t r0,
                       int64_t r1, bool with_bias) {
  const sp::Matrix mat = w.matrix();
  const int64_t k = w.k, n = w.n, rows = w.stored_rows();
  std::vector<float> x = normals(r, mc * k + 4), bias = normals(r, n);
  for (int q = 0; q < 4; ++q) x[sz(mc * k + q)] = NAN;  // past K of one token: not read
  if (mc > 1 && k > 7) x[sz((mc / 2) * k + 7)] = NAN;   // must reach only its own outputs
  const Aligned xt = transpose(x.data(), k, 0, mc, k, mc_pad);
  // y with a row stride past N, sentinels everywhere the call must not write
  const int64_t ldy = n + 3;
  std::vector<float> y(sz(mc * ldy + 5), -777.0f);
  t.kern->forward(mat, mc_pad == 1 ? x.data() : xt.p, mc_pad, mc, with_bias ? bias.data() : nullptr,
                  y.data(), ldy, r0, r1);
  const Ref ref = ref_forward(w, x.data(), mc, k, with_bias ? bias.data() : nullptr);
  const int64_t row0 = r0 * w.block, row1 = r1 * w.block < n ? r1 * w.block : n;
  std::vector<float> got;
  Ref want;
  for (int64_t i = 0; i < mc; ++i)
    for (int64_t row = 0; row < ldy; ++row) {
      const float v = y[sz(i * ldy + row)];
      if (row >= row0 && row < row1) {
        got.push_back(v);
        want.v.push_back(ref.v[sz(i * n + row)]);
        want.mag.push_back(ref.mag[sz(i * n + row)]);
      } else if (v != -777.0f) {
        fail("forward wrote y[%lld][%lld] outside rows [%lld, %lld)", (long long)i, (long long)row,
             (long long)row0, (long long)row1);
      }
    }
  expect_close("forward", got.data(), want, int64_t(got.size()));
  for (int q = 0; q < 5; ++q) PK_EXPECT(y[sz(mc * ldy + q)] == -777.0f);
  if (w.block != 1) return;  // backward takes CSR

  // backward_x and sddmm add into what they find there.
  const std::vector<float> dy = normals(r, mc * n);
  const Aligned dyt = transpose(dy.data(), n, 0, mc, n, mc_pad);
  Aligned dxt(k * mc_pad + 4, 0.5f);
  std::vector<float> dv(w.values.size() + 4, 0.25f);
  t.kern->backward_x(mat, dyt.p, mc_pad, dxt.p, r0, r1);
  t.kern->sddmm(mat, dyt.p, xt.p, mc_pad, dv.data(), r0, r1);
  // The references over rows [r0, r1) only.
  Weight part = w;
  for (int64_t b = 0; b < rows; ++b)
    if (b < r0 || b >= r1)
      for (int64_t j = w.row_ptr[sz(b)]; j < w.row_ptr[sz(b + 1)]; ++j) part.values[sz(j)] = 0.0f;
  Ref dx, dvr;
  ref_backward(part, dy.data(), x.data(), mc, k, &dx, &dvr);
  std::vector<float> dx_got(sz(mc * k));
  for (int64_t i = 0; i < mc; ++i)
    for (int64_t c = 0; c < k; ++c) dx_got[sz(i * k + c)] = dxt[c * mc_pad + i] - 0.5f;
  for (double& v : dx.mag) v += 1.0;  // the 0.5 taken off again
  expect_close("backward_x", dx_got.data(), dx, mc * k);
  for (int64_t c = 0; c < k; ++c)
    for (int64_t i = mc; i < mc_pad; ++i)
      if (dxt[c * mc_pad + i] != 0.5f) fail("backward_x wrote padding column %lld", (long long)i);
  std::vector<float> dv_got(w.values.size());
  for (size_t j = 0; j < dv_got.size(); ++j) {
    const bool inside = int64_t(j) >= w.row_ptr[sz(r0)] && int64_t(j) < w.row_ptr[sz(r1)];
    if (!inside) dvr.v[j] = dvr.mag[j] = 0.0;  // (the reference dv does not use the values)
    dv_got[j] = dv[j] - 0.25f;
    dvr.mag[j] += 0.5;
  }
  expect_close("sddmm", dv_got.data(), dvr, int64_t(dv_got.size()));
  for (int q = 0; q < 4; ++q) {
    PK_EXPECT(dxt[k * mc_pad + q] == 0.5f);
    PK_EXPECT(dv[w.values.size() + sz(q)] == 0.25f);
  }
}

void check_tables(uint64_t seed) {
  const bool quick = pk_test::quick();
  struct Shape {
    int64_t n, k;
    double density;
  };
  std::vector<Shape> shapes = {{1, 1, 1.0},   {5, 4, 1.0},   {9, 13, 0.8},   {11, 15, 0.6},
                               {12, 16, 0.5}, {33, 37, 0.5}, {203, 131, 0.7}};
  if (quick) shapes.resize(5);
  for (const Table& t : tables()) {
    for (int block : {1, 4})
      for (bool col16 : {true, false})
        for (const Shape& s : shapes) {
          Rng r(seed ^ uint64_t(s.n * 131 + s.k) ^ uint64_t(block * 7 + col16));
          const Weight w = make_weight(r, s.n, s.k, block, col16, s.density);
          const int64_t rows = w.stored_rows();
          for (int mc_pad : t.widths) {
            if (block != 1 && mc_pad == 32 && !t.bsr32) continue;
            for (int64_t mc : {int64_t(1), int64_t(mc_pad / 2 + 1), int64_t(mc_pad)}) {
              if (mc > mc_pad || (mc_pad == 1) != (mc == 1)) continue;
              pk_test::g_context = std::string("table ") + t.name + (block == 1 ? " csr" : " bsr") +
                                   (col16 ? " col16" : " col32") + " n=" + std::to_string(s.n) +
                                   " k=" + std::to_string(s.k) + " MC=" + std::to_string(mc_pad) +
                                   " mc=" + std::to_string(mc);
              check_table_chunk(t, w, r, mc_pad, mc, 0, rows, mc % 2 == 1);
              if (rows > 2) check_table_chunk(t, w, r, mc_pad, mc, 1, rows - 1, true);
            }
          }
        }
    // Wide K: 16-bit indices past 32767 (unsigned), 32-bit ones past 65535.
    for (int64_t k : {int64_t(65536), int64_t(70001)}) {
      Rng r(seed + uint64_t(k));
      const Weight w = wide_weight(r, 12, k);
      for (int mc_pad : t.widths) {
        pk_test::g_context = std::string("table ") + t.name + " wide k=" + std::to_string(k) +
                             " MC=" + std::to_string(mc_pad);
        check_table_chunk(t, w, r, mc_pad, mc_pad == 1 ? 1 : mc_pad - 1, 0, 12, true);
      }
    }
  }
  pk_test::g_context.clear();
}

// ---- The API at every cap ------------------------------------------------------------

// linear_cpu (x with a row stride past K, NaN there: never read) and, for
// CSR, linear_backward_cpu, against the references.
void check_api_case(const Weight& w, Rng& r, int64_t m, bool with_bias, bool nan_in_x) {
  const sp::Matrix mat = w.matrix();
  const int64_t k = w.k, n = w.n, ldx = k + 3;
  std::vector<float> x(sz(m * ldx), NAN);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < k; ++c) x[sz(i * ldx + c)] = r.normal();
  if (nan_in_x && k > 7) {
    x[sz((m / 2) * ldx + 7)] = NAN;
    x[sz((m - 1) * ldx + k - 1)] = INFINITY;
  }
  const std::vector<float> bias = normals(r, n);
  std::vector<float> y(sz(m * n) + 3, -777.0f);
  sp::linear_cpu(mat, x.data(), m, ldx, with_bias ? bias.data() : nullptr, y.data());
  expect_close("linear_cpu", y.data(),
               ref_forward(w, x.data(), m, ldx, with_bias ? bias.data() : nullptr), m * n);
  for (int q = 0; q < 3; ++q) PK_EXPECT(y[sz(m * n + q)] == -777.0f);
  if (w.block != 1 || nan_in_x) return;
  const std::vector<float> dy = normals(r, m * n);
  std::vector<float> dx(sz(m * k) + 3, -777.0f), dv(w.values.size() + 3, -777.0f);
  sp::linear_backward_cpu(mat, dy.data(), x.data(), m, ldx, dx.data(), dv.data());
  Ref dxr, dvr;
  ref_backward(w, dy.data(), x.data(), m, ldx, &dxr, &dvr);
  expect_close("backward dx", dx.data(), dxr, m * k);
  expect_close("backward dvalues", dv.data(), dvr, int64_t(w.values.size()));
  for (int q = 0; q < 3; ++q) {
    PK_EXPECT(dx[sz(m * k + q)] == -777.0f);
    PK_EXPECT(dv[w.values.size() + sz(q)] == -777.0f);
  }
}

void check_api(uint64_t seed) {
  const bool quick = pk_test::quick();
  std::vector<int64_t> ms = {1, 2, 9, 16, 17, 33};
  if (quick) ms = {1, 9, 33};
  pk_test::for_each_cap([&](pk::Isa cap) {
    const std::string at = pk_test::g_context;
    for (int block : {1, 4})
      for (bool col16 : {true, false})
        for (auto nk : {std::pair<int64_t, int64_t>{1, 1},
                        {3, 2},
                        {10, 14},
                        {21, 18},
                        {45, 37},
                        {203, 131}}) {
          Rng r(seed ^ uint64_t(nk.first * 1000 + nk.second) ^ uint64_t(static_cast<int>(cap)));
          const Weight w = make_weight(r, nk.first, nk.second, block, col16, 0.7);
          for (int64_t m : ms) {
            pk_test::g_context = at + (block == 1 ? " csr" : " bsr") + (col16 ? "16" : "32") +
                                 " n=" + std::to_string(nk.first) +
                                 " k=" + std::to_string(nk.second) + " m=" + std::to_string(m);
            check_api_case(w, r, m, m % 2 == 1, false);
            check_api_case(w, r, m, true, true);
          }
        }
    // An all-empty weight, and one large enough for the driver to split rows
    // between threads (by stored values).
    Rng r(seed + 99);
    for (int block : {1, 4}) {
      const Weight empty = make_weight(r, 21, 18, block, true, 0.0);
      const Weight big = make_weight(r, quick ? 300 : 1003, quick ? 200 : 618, block, true, 0.5);
      for (int64_t m : {int64_t(1), int64_t(9), int64_t(33)}) {
        pk_test::g_context = at + " empty m=" + std::to_string(m);
        check_api_case(empty, r, m, true, false);
        pk_test::g_context = at + " threads m=" + std::to_string(m);
        const int threads = pk::max_threads();
        pk::set_max_threads(3);
        check_api_case(big, r, m, false, false);
        pk::set_max_threads(threads);
      }
    }
  });
}

}  // namespace

int main(int argc, char** argv) {
  pk_test::banner("sparse_isa_test");
  const uint64_t seed = argc > 1 ? std::strtoull(argv[1], nullptr, 0) : 20261207;
  std::printf("seed %llu\n", (unsigned long long)seed);
  check_tables(seed);
  check_api(seed);
  return pk_test::verdict("sparse_isa_test");
}
