// Which x86 instruction sets the CPU and the OS support, and the cap that
// PYKERNELS_CPU_ISA (or a test) puts on them. Kernels pick their per-ISA
// implementation from active_isa() through isa_pick.h; the order of the enum
// is the order of preference.
#pragma once
#include <string>
#include <vector>

namespace pk {

enum class Isa : int { portable = 0, avx2 = 1, avx512 = 2, amx = 3 };

const char* isa_name(Isa isa);
// Parses "portable" | "avx2" | "avx512" | "amx"; returns false on anything else.
bool isa_from_name(const std::string& name, Isa* out);

// Best ISA that both the CPU (CPUID) and the OS (XCR0, and for AMX the
// arch_prctl tile-data permission) support.
Isa detected_isa();
// AMX tiles: not in this CPU (or not enabled in XCR0), present but the OS
// refused the tile-data permission (then detected_isa() stops at avx512),
// or granted to this process.
enum class AmxState : int { absent = 0, denied = 1, granted = 2 };
AmxState amx_state();
// ISAs for which this build compiled kernels.
std::vector<Isa> compiled_isas();
// min(detected, compiled, cap). The cap starts from PYKERNELS_CPU_ISA.
Isa active_isa();
void set_isa_cap(Isa cap);
// AVX-512 VNNI (vpdpbusd), which the int8 kernels need on top of avx512.
bool has_avx512_vnni();
Isa isa_cap();

}  // namespace pk
