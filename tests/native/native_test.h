// A small harness for the native tests (tests/native/*_test.cpp): each is a
// program linked against the kernels library (pk_kernels) that runs the
// family's kernels at every ISA cap this CPU can run against a scalar
// reference written in the test, and exits nonzero on any mismatch. CMake
// builds them with -DPYKERNELS_NATIVE_TESTS=ON; .ci/aarch64 runs them under
// qemu-aarch64 with several emulated CPUs, and they run natively too.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/cpu_features.h"

namespace pk_test {

inline int g_failures = 0;
inline int64_t g_checks = 0;   // comparisons made, for the verdict line
inline std::string g_context;  // what is being checked, for the messages

// Records a failure; prints only the first few, so one broken kernel does not
// drown the log.
template <class... A>
inline void fail(const char* fmt, A... a) {
  if (++g_failures <= 20) {
    std::printf("FAIL [%s] ", g_context.c_str());
    if constexpr (sizeof...(A) == 0) {
      std::printf("%s", fmt);
    } else {
      std::printf(fmt, a...);
    }
    std::printf("\n");
  }
}

#define PK_EXPECT(cond)                                                \
  do {                                                                 \
    ++::pk_test::g_checks;                                             \
    if (!(cond)) ::pk_test::fail("%s:%d: " #cond, __FILE__, __LINE__); \
  } while (0)

// PK_TEST_QUICK=1: smaller inputs (.ci/aarch64 sets it for the emulated CPUs
// after the first, which repeat the lower tiers).
inline bool quick() {
  const char* e = std::getenv("PK_TEST_QUICK");
  return e && *e && *e != '0';
}

// splitmix64: fresh but reproducible data (the seed is printed).
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint32_t u32() { return uint32_t(next() >> 32); }
  // Uniform in [0, n).
  uint64_t below(uint64_t n) { return n ? next() % n : 0; }
  // Roughly normal, from the sum of four uniforms.
  float normal() {
    double a = 0;
    for (int i = 0; i < 4; ++i) a += double(next() >> 11) * 0x1.0p-53;
    return float((a - 2.0) * 1.7320508);
  }
};

inline uint32_t bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
inline float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// The caps a test runs at: every tier up to what this CPU runs (a cap above
// it would only repeat the top one). The ISAs this build has no files for
// still run, as the lower table they fall back to.
inline std::vector<pk::Isa> caps() {
  std::vector<pk::Isa> v;
  for (int i = 0; i <= static_cast<int>(pk::detected_isa()); ++i)
    v.push_back(static_cast<pk::Isa>(i));
  return v;
}

// Runs body(cap) at each cap, restoring the cap it found.
template <class Body>
void for_each_cap(Body body) {
  const pk::Isa before = pk::isa_cap();
  for (pk::Isa cap : caps()) {
    pk::set_isa_cap(cap);
    g_context = std::string("cap ") + pk::isa_name(cap);
    body(cap);
  }
  pk::set_isa_cap(before);
  g_context.clear();
}

// Prints the CPU's tiers once, and the verdict; main returns this.
inline void banner(const char* name) {
  std::string compiled;
  for (pk::Isa i : pk::compiled_isas()) compiled += std::string(" ") + pk::isa_name(i);
  std::printf("%s: detected %s, compiled%s, cap %s\n", name, pk::isa_name(pk::detected_isa()),
              compiled.c_str(), pk::isa_name(pk::isa_cap()));
}
inline int verdict(const char* name) {
  std::printf("%s: %s (%lld checks, %d failures)\n", name, g_failures ? "FAILED" : "ok",
              (long long)g_checks, g_failures);
  return g_failures != 0;
}

}  // namespace pk_test
