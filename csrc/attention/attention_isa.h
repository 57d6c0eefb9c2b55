// Per-ISA attention kernels (see topk_isa.h for why nothing here touches the
// standard library): one (batch, head) pair's query rows at a time, with the
// per-thread scratch the driver hands in.
#pragma once
#include <cstdint>

#include "attention.h"

namespace pk {
namespace attention {

struct Kernels {
  // Floats of scratch that head() needs for a problem (per thread).
  int64_t (*scratch_floats)(const Problem& p);
  // Query rows [i0, i1) of batch b, head h, all of them written to p.out.
  void (*head)(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t i1, float* scratch);
};

const Kernels* kernels_portable();
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();

}  // namespace attention
}  // namespace pk
