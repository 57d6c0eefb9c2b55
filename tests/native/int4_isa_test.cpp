// The int4 family (csrc/int4) against scalar references written here, at
// every ISA cap this CPU runs: weight-only within float rounding of the
// dequantized weight's products, W4A8 to the bit wherever every group sum
// is an exact integer (scales of 1, activations on the int8 grid), and
// within float rounding of the scale products otherwise. Usage:
// int4_isa_test [SEED]; PK_TEST_QUICK=1 runs fewer shapes.
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <vector>

#include "int4/int4.h"
#include "native_test.h"

namespace {

using pk::DType;
using pk_test::Rng;

size_t sz(int64_t n) { return static_cast<size_t>(n); }

struct Problem {
  int64_t m, k, n, g;
  std::vector<float> x, scales, bias;
  std::vector<uint8_t> packed, zeros;
};

Problem make(Rng& r, int64_t m, int64_t k, int64_t n, int64_t g, bool unit) {
  Problem p{m, k, n, g, {}, {}, {}, {}, {}};
  p.x.resize(sz(m * k));
  for (auto& v : p.x) v = unit ? float(int(r.below(255)) - 127) : 3.0f * r.normal();
  for (int64_t i = 0; unit && i < m; ++i) p.x[sz(i * k)] = 127.0f;  // scale exactly 1
  p.packed.resize(sz(n * k / 2));
  for (auto& b : p.packed) b = uint8_t(r.below(256));
  p.scales.resize(sz(n * k / g));
  for (auto& s : p.scales) s = unit ? 1.0f : 0.001f + 0.05f * float(r.below(1000)) / 1000.0f;
  p.zeros.resize(sz(n * k / g));
  for (auto& z : p.zeros) z = uint8_t(r.below(16));
  p.bias.resize(sz(n));
  for (auto& b : p.bias) b = r.normal();
  return p;
}

int code(const Problem& p, int64_t row, int64_t col) {
  const uint8_t b = p.packed[sz(row * (p.k / 2) + col / 2)];
  return col % 2 ? b >> 4 : b & 15;
}

// Weight-only in double from w_hat = float((q - z) * s); also the magnitude
// sum |x| |w_hat| + |bias| that bounds float rounding.
void ref_weight_only(const Problem& p, std::vector<double>& y, std::vector<double>& mag) {
  const int64_t groups = p.k / p.g;
  for (int64_t i = 0; i < p.m; ++i)
    for (int64_t j = 0; j < p.n; ++j) {
      double acc = p.bias[sz(j)], a = std::fabs(p.bias[sz(j)]);
      for (int64_t c = 0; c < p.k; ++c) {
        const int64_t cell = j * groups + c / p.g;
        const float w = float(code(p, j, c) - p.zeros[sz(cell)]) * p.scales[sz(cell)];
        acc += double(p.x[sz(i * p.k + c)]) * w;
        a += std::fabs(double(p.x[sz(i * p.k + c)]) * w);
      }
      y[sz(i * p.n + j)] = acc;
      mag[sz(i * p.n + j)] = a;
    }
}

// W4A8: int8 per-row quantization (int8.h's), exact group sums, double scales.
void ref_dynamic(const Problem& p, std::vector<double>& y, std::vector<double>& mag) {
  const int64_t groups = p.k / p.g;
  std::vector<int> a(sz(p.k));
  for (int64_t i = 0; i < p.m; ++i) {
    float amax = 0.0f;
    for (int64_t c = 0; c < p.k; ++c) amax = std::fmax(amax, std::fabs(p.x[sz(i * p.k + c)]));
    const float s = amax / 127.0f;
    for (int64_t c = 0; c < p.k; ++c)
      a[sz(c)] =
          s > 0
              ? int(std::fmin(127.0f, std::fmax(-127.0f, std::nearbyint(p.x[sz(i * p.k + c)] / s))))
              : 0;
    for (int64_t j = 0; j < p.n; ++j) {
      double acc = 0, am = 0;
      for (int64_t g = 0; g < groups; ++g) {
        int64_t isum = 0;
        for (int64_t c = g * p.g; c < (g + 1) * p.g; ++c)
          isum += int64_t(a[sz(c)]) * (code(p, j, c) - p.zeros[sz(j * groups + g)]);
        acc += double(isum) * p.scales[sz(j * groups + g)];
        am += std::fabs(double(isum) * p.scales[sz(j * groups + g)]);
      }
      y[sz(i * p.n + j)] = acc * s + p.bias[sz(j)];
      mag[sz(i * p.n + j)] = am * s + std::fabs(p.bias[sz(j)]);
    }
  }
}

void check(Rng& r, int64_t m, int64_t k, int64_t n, int64_t g, bool unit) {
  const Problem p = make(r, m, k, n, g, unit);
  std::vector<double> want(sz(m * n)), mag(sz(m * n));
  std::vector<float> y(sz(m * n));
  const double eps = 1e-6 * (std::sqrt(double(k)) + 4);
  for (int mode = 0; mode < 2; ++mode) {
    if (unit && mode == 0) continue;
    (mode ? ref_dynamic : ref_weight_only)(p, want, mag);
    (mode ? pk::int4::linear_dynamic_cpu : pk::int4::linear_weight_only_cpu)(
        p.x.data(), DType::f32, m, k, k, p.packed.data(), p.scales.data(), p.zeros.data(), g,
        p.bias.data(), n, y.data(), DType::f32);
    for (int64_t i = 0; i < m * n; ++i) {
      const double err = std::fabs(double(y[sz(i)]) - want[sz(i)]);
      // unit: every sum is an integer below 2^24 and the bias adds one rounding.
      const double bound = unit ? std::fabs(want[sz(i)]) * 6e-8 : eps * (mag[sz(i)] + 1e-30);
      ++pk_test::g_checks;
      if (!(err <= bound)) {
        pk_test::fail("%s m=%lld k=%lld n=%lld g=%lld at %lld: %.9g vs %.9g",
                      mode ? "dynamic" : "weight_only", (long long)m, (long long)k, (long long)n,
                      (long long)g, (long long)i, double(y[sz(i)]), want[sz(i)]);
        break;
      }
    }
  }
}

void check_refusals() {
  std::vector<float> x(64), s(2), y(4);
  std::vector<uint8_t> packed(128), zeros(8, 16);
  bool threw = false;
  try {
    pk::int4::linear_dynamic_cpu(x.data(), DType::f32, 1, 64, 64, packed.data(), s.data(),
                                 zeros.data(), 32, nullptr, 4, y.data(), DType::f32);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  PK_EXPECT(threw);  // a zero point of 16
  threw = false;
  try {
    pk::int4::linear_weight_only_cpu(x.data(), DType::f32, 1, 64, 64, packed.data(), s.data(),
                                     zeros.data(), 48, nullptr, 4, y.data(), DType::f32);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  PK_EXPECT(threw);  // group size 48
}

}  // namespace

int main(int argc, char** argv) {
  const uint64_t seed = argc > 1 ? std::strtoull(argv[1], nullptr, 0) : 0x14a5eedull;
  pk_test::banner("int4_isa_test");
  std::printf("seed %#llx%s\n", static_cast<unsigned long long>(seed),
              pk_test::quick() ? ", quick" : "");
  Rng r(seed);
  pk_test::for_each_cap([&](pk::Isa) {
    check(r, 1, 32, 3, 32, false);
    check(r, 7, 160, 33, 32, false);
    check(r, 13, 256, 70, 64, false);
    check(r, 9, 512, 40, 128, true);
    if (!pk_test::quick()) check(r, 20, 1024, 100, 128, false);
    // Every weight-only row tile (1..8 rows, 8 + tails, 16) and weight rows
    // past a multiple of the tile's 1..4; K ending in a 32-, 64- or 96-column
    // chunk; every group size.
    for (int64_t m : {1, 2, 3, 4, 5, 6, 7, 8, 9, 16}) {
      check(r, m, 96, 5, 32, false);
      check(r, m, 320, 7, 64, false);
      check(r, m, 384, 6, 128, false);
    }
    check_refusals();
  });
  return pk_test::verdict("int4_isa_test");
}
