// The AVX2 and AVX-512 VNNI int8 multiply-add peaks of this machine, for
// RESULTS.md's "% of peak" figures: each thread runs the inner-loop
// instructions of our kernels on 8 (AVX2) or 12 (VNNI) independent
// accumulators, operands in registers, so the figure is the vector units'
// rate, not memory's.
//   avx2-u7:   vpmaddubsw + vpmaddwd + vpaddd (act_bits = 7: 3 per 32 MAC)
//   avx2-sign: vpsignb + vpmaddubsw + vpmaddwd + vpaddd (exact 8-bit: 4 per 32 MAC)
//   vnni:      vpdpbusd zmm (64 MAC each)
//   g++ -O2 -mavx2 -mavx512f -mavx512bw -mavx512vnni -pthread \
//       benchmarks/simd_int8_peak.cpp -o /tmp/simd_int8_peak
//   /tmp/simd_int8_peak 2     # threads
#include <immintrin.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

// Eight accumulators over one weight vector and broadcast, as the AVX2
// kernel's 4 x 2 tile does per group of 4 k.
template <bool Sign>
double avx2(long iters) {
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0,
          c7 = c0;
  __m256i w0 = _mm256_set1_epi8(3), w1 = _mm256_set1_epi8(-5), x0 = _mm256_set1_epi8(7),
          x1 = _mm256_set1_epi8(9), x2 = _mm256_set1_epi8(11), x3 = _mm256_set1_epi8(13);
  const __m256i ones = _mm256_set1_epi16(1);
  auto dot = [&](__m256i acc, __m256i x, __m256i w) {
    const __m256i u = Sign ? _mm256_sign_epi8(x, w) : x;
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, w), ones));
  };
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < iters; ++i) {
    c0 = dot(c0, x0, w0), c1 = dot(c1, x0, w1), c2 = dot(c2, x1, w0), c3 = dot(c3, x1, w1);
    c4 = dot(c4, x2, w0), c5 = dot(c5, x2, w1), c6 = dot(c6, x3, w0), c7 = dot(c7, x3, w1);
    __asm__ volatile("" : "+x"(w0), "+x"(w1), "+x"(x0), "+x"(x1), "+x"(x2), "+x"(x3));
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const __m256i all = _mm256_add_epi32(
      _mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3)),
      _mm256_add_epi32(_mm256_add_epi32(c4, c5), _mm256_add_epi32(c6, c7)));
  if (_mm256_extract_epi32(all, 0) == 42) std::puts("");  // keep the sums alive
  return double(iters) * 8 * 32 / s;
}

// Twelve accumulators, as the VNNI kernel's 6 x 4 tile keeps 24.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) double vnni(long iters) {
  __m512i c[12];
  for (auto& v : c) v = _mm512_setzero_si512();
  __m512i w0 = _mm512_set1_epi8(3), w1 = _mm512_set1_epi8(-5), x0 = _mm512_set1_epi8(7),
          x1 = _mm512_set1_epi8(9), x2 = _mm512_set1_epi8(11);
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < iters; ++i) {
    c[0] = _mm512_dpbusd_epi32(c[0], x0, w0), c[1] = _mm512_dpbusd_epi32(c[1], x0, w1);
    c[2] = _mm512_dpbusd_epi32(c[2], x1, w0), c[3] = _mm512_dpbusd_epi32(c[3], x1, w1);
    c[4] = _mm512_dpbusd_epi32(c[4], x2, w0), c[5] = _mm512_dpbusd_epi32(c[5], x2, w1);
    c[6] = _mm512_dpbusd_epi32(c[6], w0, x0), c[7] = _mm512_dpbusd_epi32(c[7], w1, x0);
    c[8] = _mm512_dpbusd_epi32(c[8], w0, x1), c[9] = _mm512_dpbusd_epi32(c[9], w1, x1);
    c[10] = _mm512_dpbusd_epi32(c[10], w0, x2), c[11] = _mm512_dpbusd_epi32(c[11], w1, x2);
    __asm__ volatile("" : "+v"(w0), "+v"(w1), "+v"(x0), "+v"(x1), "+v"(x2));
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  __m512i all = c[0];
  for (int j = 1; j < 12; ++j) all = _mm512_add_epi32(all, c[j]);
  if (_mm512_reduce_add_epi32(all) == 42) std::puts("");
  return double(iters) * 12 * 64 / s;
}

template <class F>
double on_threads(int nt, F f) {
  std::vector<double> rate(nt);
  std::vector<std::thread> ts;
  for (int t = 0; t < nt; ++t) ts.emplace_back([&, t] { rate[t] = f(); });
  for (auto& t : ts) t.join();
  double sum = 0;
  for (double r : rate) sum += r;
  return sum;
}

}  // namespace

int main(int argc, char** argv) {
  const int nt = argc > 1 ? std::atoi(argv[1]) : 1;
  const long iters = 200000000;
  for (int rep = 0; rep < 3; ++rep) {
    std::printf("threads %d  avx2-u7 %.1f GMAC/s  avx2-sign %.1f GMAC/s", nt,
                on_threads(nt, [&] { return avx2<false>(iters); }) / 1e9,
                on_threads(nt, [&] { return avx2<true>(iters); }) / 1e9);
    if (__builtin_cpu_supports("avx512vnni"))
      std::printf("  vnni %.1f GMAC/s", on_threads(nt, [&] { return vnni(iters / 2); }) / 1e9);
    std::printf("\n");
  }
  return 0;
}
