// Portable int8 kernels: the plain loops of int8_generic.h, which compilers
// vectorise for the baseline ISA.
#include "int8_epilogue.h"
#include "int8_generic.h"

namespace pk {
namespace int8 {

const GemmKernels* gemm_kernels_portable() {
  static const GemmKernels table{.gemm = &gemm_rowmajor_generic,
                                 .gemm_packed = &gemm_packed_generic,
                                 .pack = &pack_generic,
                                 .quantize_a = &quantize_u8_generic,
                                 .weight_only = &weight_only_generic,
                                 .signed_a = false,
                                 .quantize_a7 = &quantize7_generic<false>,
                                 .a7_zp = false,
                                 .epilogue = &EpilogueMath<4>::apply,
                                 .norm_rows = &EpilogueMath<4>::norm_rows};
  return &table;
}

}  // namespace int8
}  // namespace pk
