// How every family picks its per-ISA kernel table: the table of the active
// ISA tier (active_isa(): what the CPU and the OS support, capped by
// PYKERNELS_CPU_ISA or set_isa_cap()), or, where the family ships none for
// that tier, the next lower one it ships. For the drivers (<family>_cpu.cpp,
// baseline flags) only; it sits in an anonymous namespace besides, so no
// copy of it can be shared with a file compiled for a wider ISA.
#pragma once
#include "cpu_features.h"

// A tier's table factory where this build compiled that tier's files, else
// null, so a driver names every tier it ships without #ifdefs.
#ifdef PK_HAVE_AVX2
#define PK_ISA_AVX2(factory) (factory)
#else
#define PK_ISA_AVX2(factory) nullptr
#endif
#ifdef PK_HAVE_AVX512
#define PK_ISA_AVX512(factory) (factory)
#else
#define PK_ISA_AVX512(factory) nullptr
#endif
#ifdef PK_HAVE_AMX
#define PK_ISA_AMX(factory) (factory)
#else
#define PK_ISA_AMX(factory) nullptr
#endif
#ifdef PK_HAVE_NEON
#define PK_ISA_NEON(factory) (factory)
#else
#define PK_ISA_NEON(factory) nullptr
#endif
#ifdef PK_HAVE_DOTPROD
#define PK_ISA_DOTPROD(factory) (factory)
#else
#define PK_ISA_DOTPROD(factory) nullptr
#endif
#ifdef PK_HAVE_I8MM
#define PK_ISA_I8MM(factory) (factory)
#else
#define PK_ISA_I8MM(factory) nullptr
#endif

namespace pk {
namespace {

// One family's tables by tier; null where it ships none.
template <class T>
struct IsaTables {
  using Factory = const T* (*)();
  Factory portable = nullptr;  // required
  Factory avx2 = nullptr;
  Factory avx512 = nullptr;
  // AVX-512 plus VNNI (vpdpbusd), which the avx512 tier does not include:
  // the avx512 tier runs it where the CPU has VNNI, else `avx512` (or, if
  // null, the avx2 table).
  Factory avx512_vnni = nullptr;
  // AMX tiles. The AMX files are compiled with VNNI as well, so this table
  // too runs only where the CPU has it.
  Factory amx = nullptr;
  // aarch64 (each also runs where the CPU has a higher Arm tier): Armv8-A
  // Advanced SIMD; SDOT/UDOT; SMMLA/UMMLA (with dotprod). A family that
  // gains nothing from an extension leaves its field null and its lower
  // table serves that tier.
  Factory neon = nullptr;
  Factory dotprod = nullptr;
  Factory i8mm = nullptr;
};

template <class T>
class IsaPick {
 public:
  // Resolves each tier once. A tier the CPU lacks keeps the lower table
  // without calling its factory, which was compiled for that tier.
  explicit IsaPick(const IsaTables<T>& t) {
    const Isa cpu = detected_isa();
    at(Isa::portable) = t.portable();
#ifdef PK_ARM64
    at(Isa::neon) = t.neon && cpu >= Isa::neon ? t.neon() : at(Isa::portable);
    at(Isa::dotprod) = t.dotprod && cpu >= Isa::dotprod ? t.dotprod() : at(Isa::neon);
    at(Isa::i8mm) = t.i8mm && cpu >= Isa::i8mm ? t.i8mm() : at(Isa::dotprod);
#else
    const bool vnni = has_avx512_vnni();
    at(Isa::avx2) = t.avx2 && cpu >= Isa::avx2 ? t.avx2() : at(Isa::portable);
    at(Isa::avx512) = t.avx512_vnni && vnni            ? t.avx512_vnni()
                      : t.avx512 && cpu >= Isa::avx512 ? t.avx512()
                                                       : at(Isa::avx2);
    at(Isa::amx) = t.amx && vnni && cpu >= Isa::amx ? t.amx() : at(Isa::avx512);
#endif
  }

  // Read per call: the cap may change between calls (tests run every tier).
  const T* operator()() const { return by_isa_[static_cast<int>(active_isa())]; }

 private:
  const T*& at(Isa isa) { return by_isa_[static_cast<int>(isa)]; }
  const T* by_isa_[kIsaLevels];
};

}  // namespace
}  // namespace pk
