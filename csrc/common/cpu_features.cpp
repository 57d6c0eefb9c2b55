#include "cpu_features.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#define PK_X86 1
#endif

#if defined(PK_ARM64) && defined(__linux__)
#include <sys/auxv.h>
// The hwcap bits, as the kernel's uapi defines them, for C libraries whose
// headers predate them (HWCAP2_I8MM came with Linux 5.10).
#ifndef HWCAP_FP
#define HWCAP_FP (1ul << 0)
#endif
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1ul << 1)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1ul << 20)
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1ul << 13)
#endif
#endif

namespace pk {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::portable:
      return "portable";
#ifdef PK_ARM64
    case Isa::neon:
      return "neon";
    case Isa::dotprod:
      return "dotprod";
    case Isa::i8mm:
      return "i8mm";
#else
    case Isa::avx2:
      return "avx2";
    case Isa::avx512:
      return "avx512";
    case Isa::amx:
      return "amx";
#endif
  }
  return "unknown";
}

bool isa_from_name(const std::string& name, Isa* out) {
  for (int i = 0; i < kIsaLevels; ++i) {
    if (name == isa_name(static_cast<Isa>(i))) {
      *out = static_cast<Isa>(i);
      return true;
    }
  }
  return false;
}

std::vector<std::string> isa_names() {
  std::vector<std::string> v;
  for (int i = 0; i < kIsaLevels; ++i) v.emplace_back(isa_name(static_cast<Isa>(i)));
  return v;
}

namespace {

#ifdef PK_X86
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

// Linux keeps AMX tile data disabled per process until it is requested.
bool request_amx_permission() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

struct Detection {
  Isa isa;
  AmxState amx;
};

Detection detect() {
#ifdef PK_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return {Isa::portable, AmxState::absent};
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!osxsave) return {Isa::portable, AmxState::absent};
  const uint64_t xcr0 = xgetbv0();
  const bool os_avx = (xcr0 & 0x6) == 0x6;
  const bool os_avx512 = (xcr0 & 0xe6) == 0xe6;
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return {Isa::portable, AmxState::absent};
  const bool avx2 = b & (1u << 5);
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31));
  const bool amx = (d & (1u << 24)) && (d & (1u << 25));
  const AmxState st = !(amx && os_amx) ? AmxState::absent : AmxState::denied;
  if (!(os_avx && avx2 && fma && f16c)) return {Isa::portable, st};
  if (!(os_avx512 && avx512)) return {Isa::avx2, st};
  if (st == AmxState::denied && request_amx_permission()) return {Isa::amx, AmxState::granted};
  return {Isa::avx512, st};
#elif defined(PK_ARM64) && defined(__linux__)
  // Each tier needs the ones below it: the dotprod and i8mm files are built
  // for Armv8.2-A plus their extensions (CMakeLists.txt), which is what a CPU
  // that reports them implements (both are Armv8.2+ features).
  const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
  if (!((hw & HWCAP_FP) && (hw & HWCAP_ASIMD))) return {Isa::portable, AmxState::absent};
  if (!(hw & HWCAP_ASIMDDP)) return {Isa::neon, AmxState::absent};
  if (!(hw2 & HWCAP2_I8MM)) return {Isa::dotprod, AmxState::absent};
  return {Isa::i8mm, AmxState::absent};
#elif defined(PK_ARM64)
  // No auxiliary vector to ask: Advanced SIMD is part of the AArch64 ABI.
  return {Isa::neon, AmxState::absent};
#else
  return {Isa::portable, AmxState::absent};
#endif
}

const Detection& detection() {
  static const Detection d = detect();
  return d;
}

Isa initial_cap() {
  const char* env = std::getenv("PYKERNELS_CPU_ISA");
  Isa cap = kIsaTop;
  if (env && *env) isa_from_name(env, &cap);  // unknown names are reported by Python
  return cap;
}

std::atomic<int> g_cap{static_cast<int>(initial_cap())};

}  // namespace

Isa detected_isa() { return detection().isa; }

AmxState amx_state() { return detection().amx; }

std::vector<Isa> compiled_isas() {
  std::vector<Isa> v{Isa::portable};
#ifdef PK_ARM64
#ifdef PK_HAVE_NEON
  v.push_back(Isa::neon);
#endif
#ifdef PK_HAVE_DOTPROD
  v.push_back(Isa::dotprod);
#endif
#ifdef PK_HAVE_I8MM
  v.push_back(Isa::i8mm);
#endif
#else
#ifdef PK_HAVE_AVX2
  v.push_back(Isa::avx2);
#endif
#ifdef PK_HAVE_AVX512
  v.push_back(Isa::avx512);
#endif
#ifdef PK_HAVE_AMX
  v.push_back(Isa::amx);
#endif
#endif
  return v;
}

Isa active_isa() {
  int best = 0;
  for (Isa i : compiled_isas()) {
    const int v = static_cast<int>(i);
    if (v <= static_cast<int>(detected_isa()) && v <= g_cap.load()) best = v > best ? v : best;
  }
  return static_cast<Isa>(best);
}

bool has_avx512_vnni() {
#ifdef PK_X86
  static const bool vnni = [] {
    unsigned a, b, c, d;
    return detected_isa() >= Isa::avx512 && __get_cpuid_count(7, 0, &a, &b, &c, &d) &&
           (c & (1u << 11));
  }();
  return vnni;
#else
  return false;
#endif
}

void set_isa_cap(Isa cap) { g_cap.store(static_cast<int>(cap)); }
Isa isa_cap() { return static_cast<Isa>(g_cap.load()); }

}  // namespace pk
