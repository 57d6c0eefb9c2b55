// Per-ISA cluster kernels, compiled once per instruction set (see
// topk_isa.h for why nothing here touches the standard library).
#pragma once
#include <cstdint>

#include "cluster.h"

namespace pk {
namespace cluster {

// One call's operands (cluster.h). Kernels read a row's codebook as a
// table of 16 (4-bit) or 256 (8-bit) entries, zero past nc, so that no code
// can read past its codebook.
struct Args {
  const float* x;
  int64_t m, k, ldx;
  const uint8_t* codes;
  int64_t code_ld;  // bytes per row of codes
  const float* codebook;
  int64_t cb_ld;  // floats between rows' codebooks; 0 when one codebook serves all rows
  int64_t nc;     // entries per codebook
  const float* bias;
  int64_t n;
  float* y;
};

struct Kernels {
  // Output columns [n0, n1) of y for 4-bit / 8-bit codes; wf is 4 * k
  // floats of this thread's scratch.
  void (*linear4)(const Args& a, int64_t n0, int64_t n1, float* wf);
  void (*linear8)(const Args& a, int64_t n0, int64_t n1, float* wf);
};

const Kernels* kernels_portable();
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();

}  // namespace cluster
}  // namespace pk
