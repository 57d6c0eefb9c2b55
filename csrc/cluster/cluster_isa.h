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

// The dynamic mode's operands: activations quantized (4-bit codes: in
// dynamic_x_pos4's order, rows of ldq bytes, zero past K), codebooks as int8
// tables of `tab_len` entries (zero past nc), and the scales.
struct DynArgs {
  const int8_t* xq;
  int64_t kq;           // bytes of a row that hold activations (K, or K padded to a group)
  int64_t ldq;          // row stride, >= kq
  const int32_t* xsum;  // sum_k xq[m, k]
  const float* xs;
  int64_t m, k;
  const uint8_t* codes;
  int64_t code_ld;
  const int8_t* cq;
  int64_t cq_ld;  // bytes between rows' tables; 0 when one table serves all rows
  const float* cs;
  int64_t cs_ld;  // 1, or 0 for one codebook
  const float* bias;
  int64_t n;
  float* y;
};

struct Kernels {
  // Output columns [n0, n1) of y for 4-bit / 8-bit codes; wf is 4 * k
  // floats of this thread's scratch.
  void (*linear4)(const Args& a, int64_t n0, int64_t n1, float* wf);
  void (*linear8)(const Args& a, int64_t n0, int64_t n1, float* wf);
  // Dynamic mode, columns [n0, n1); wq is 4 * ldq bytes of scratch.
  void (*dynamic4)(const DynArgs& a, int64_t n0, int64_t n1, int8_t* wq);
  void (*dynamic8)(const DynArgs& a, int64_t n0, int64_t n1, int8_t* wq);
  // Rows [r0, r1) of src (row stride ld, `len` values) quantized as
  // int8::quantize_per_row does into rows of ldd bytes of dst (zero past
  // len; with perm4, in dynamic_x_pos4's order), their scales, and (sum not
  // null) the sum of each row's codes.
  void (*quantize)(const float* src, int64_t ld, int64_t len, int8_t* dst, int64_t ldd, bool perm4,
                   float* scale, int32_t* sum, int64_t r0, int64_t r1);
};

const Kernels* kernels_portable();
const Kernels* kernels_avx2();
const Kernels* kernels_avx512_vnni();
// aarch64: neon serves every Arm tier; dotprod (SDOT) from that tier up.
const Kernels* kernels_neon();
const Kernels* kernels_dotprod();

}  // namespace cluster
}  // namespace pk
