// Portable int8 kernels: the plain loops of int8_generic.h, which compilers
// vectorise for the baseline ISA.
#include "int8_generic.h"

namespace pk {
namespace int8 {

const GemmKernels* gemm_kernels_portable() {
  static const GemmKernels table{&gemm_rowmajor_generic,
                                 &gemm_packed_generic,
                                 &pack_generic,
                                 &quantize_u8_generic,
                                 &weight_only_generic,
                                 false,
                                 false,
                                 nullptr,
                                 &quantize7_generic<false>,
                                 false};
  return &table;
}

}  // namespace int8
}  // namespace pk
