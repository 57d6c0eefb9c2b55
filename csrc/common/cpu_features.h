// Which instruction sets the CPU and the OS support, and the cap that
// PYKERNELS_CPU_ISA (or a test) puts on them. Kernels pick their per-ISA
// implementation from active_isa() through isa_pick.h; the order of the enum
// is the order of preference.
//
// The tiers are levels 0..3 on every architecture, named for the target's
// own instruction sets: portable < avx2 < avx512 < amx on x86-64 (CPUID),
// portable < neon < dotprod < i8mm on aarch64 (getauxval). A name of the
// other architecture is no name here, so code that means one architecture's
// tier cannot compile for the other.
#pragma once
#include <string>
#include <vector>

#if defined(__aarch64__) || defined(_M_ARM64)
#define PK_ARM64 1
#endif

namespace pk {

#ifdef PK_ARM64
// neon: Armv8-A Advanced SIMD (HWCAP_ASIMD). dotprod: SDOT/UDOT
// (HWCAP_ASIMDDP, an Armv8.2 extension). i8mm: SMMLA/UMMLA/USDOT
// (HWCAP2_I8MM, Armv8.2+, mandatory from Armv8.6), with dotprod.
enum class Isa : int { portable = 0, neon = 1, dotprod = 2, i8mm = 3 };
#else
enum class Isa : int { portable = 0, avx2 = 1, avx512 = 2, amx = 3 };
#endif
constexpr int kIsaLevels = 4;
constexpr Isa kIsaTop = static_cast<Isa>(kIsaLevels - 1);

const char* isa_name(Isa isa);
// Parses this architecture's names ("portable" | "avx2" | "avx512" | "amx",
// or "portable" | "neon" | "dotprod" | "i8mm"); false on anything else.
bool isa_from_name(const std::string& name, Isa* out);
// This architecture's names, in order ("portable" first).
std::vector<std::string> isa_names();

// Best ISA that both the CPU and the OS support: CPUID and XCR0, and for AMX
// the arch_prctl tile-data permission, on x86; the auxiliary vector's hwcaps
// on aarch64 Linux (elsewhere on aarch64: neon, which the ABI guarantees).
Isa detected_isa();
// AMX tiles: not in this CPU (or not enabled in XCR0; always on aarch64),
// present but the OS refused the tile-data permission (then detected_isa()
// stops at avx512), or granted to this process.
enum class AmxState : int { absent = 0, denied = 1, granted = 2 };
AmxState amx_state();
// ISAs for which this build compiled kernels.
std::vector<Isa> compiled_isas();
// min(detected, compiled, cap). The cap starts from PYKERNELS_CPU_ISA.
Isa active_isa();
void set_isa_cap(Isa cap);
// AVX-512 VNNI (vpdpbusd), which the int8 kernels need on top of avx512;
// false on aarch64.
bool has_avx512_vnni();
Isa isa_cap();

}  // namespace pk
