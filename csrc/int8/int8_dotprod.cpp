// Armv8.2-A dot product int8 kernels (SDOT, FEAT_DotProd): the packed and
// row-major GEMMs of int8_sdot.h, the NEON quantizers and epilogue of
// int8_arm.h. Signed activations, as every Arm table.
#include "int8_epilogue.h"
#include "int8_sdot.h"

namespace pk {
namespace int8 {

const GemmKernels* gemm_kernels_dotprod() {
  static const GemmKernels table{.gemm = &gemm_rowmajor<sdot16, 4>,
                                 .gemm_packed = &gemm_packed_sdot,
                                 .pack = &pack_generic,
                                 .quantize_a = &quantize_s8,
                                 .weight_only = &weight_only_generic,
                                 .signed_a = true,
                                 .quantize_a7 = &quantize_s7,
                                 .a7_zp = false,
                                 .epilogue = &EpilogueMath<4>::apply,
                                 .norm_rows = &EpilogueMath<4>::norm_rows};
  return &table;
}

}  // namespace int8
}  // namespace pk
