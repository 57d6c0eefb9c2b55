// The per-ISA part of the CPU top-k: the streaming scans. Each ISA file
// compiles topk_scan.h with its own flags and returns a table of these; the
// driver (topk_cpu.cpp, baseline flags) picks one table per call from
// active_isa(). Nothing here uses the standard library, so no inline function
// compiled with wide-vector flags can leak into the portable path.
#pragma once
#include <cstdint>

#include "../common/dtype.h"

namespace pk {
namespace topk {

constexpr uint32_t kNoCandidates = 0x80000000u;  // a threshold no key reaches

struct ScanKernels {
  // Scans p[b, e) and stores (bits, index) of each entry whose key
  // (bits & 0x7fffffff, resp. 0x7fff) is >= t into ob/oi, in index order, up
  // to `cap` entries. Returns the number found, which may exceed cap.
  // t <= 2^31 (2^15 for collect_u16): the driver's thresholds are keys, or
  // kNoCandidates.
  int64_t (*collect_u32)(const uint32_t* p, int64_t b, int64_t e, uint32_t t, uint32_t* ob,
                         int64_t* oi, int64_t cap);
  int64_t (*collect_u16)(const uint16_t* p, int64_t b, int64_t e, uint32_t t, uint32_t* ob,
                         int64_t* oi, int64_t cap);
  // Error feedback: y = float(x) + r; r = y; then collects like collect_u32 on
  // the bits of y. Keeps writing r after cap is reached.
  int64_t (*collect_ef)(const void* x, DType dtype, float* r, int64_t b, int64_t e, uint32_t t,
                        uint32_t* ob, int64_t* oi, int64_t cap);
};

const ScanKernels* scan_kernels_portable();
const ScanKernels* scan_kernels_avx2();
const ScanKernels* scan_kernels_avx512();
// Armv8-A NEON; the dotprod and i8mm tiers run it too.
const ScanKernels* scan_kernels_neon();

// The table the driver runs at the current cap (tests check the dispatch).
const ScanKernels* active_scan_kernels();

}  // namespace topk
}  // namespace pk
