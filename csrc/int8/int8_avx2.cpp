// AVX2 int8 kernels: the plain loops of int8_generic.h compiled with -mavx2
// -mfma. AVX2 has no exact u8 x s8 dot product (vpmaddubsw saturates at
// int16), so the compiler's widening to int16/int32 is what keeps it exact.
#include "int8_generic.h"

namespace pk {
namespace int8 {

const GemmKernels* gemm_kernels_avx2() {
  static const GemmKernels table{&gemm_rowmajor_generic, &gemm_packed_generic, &pack_generic,
                                 &quantize_u8_generic, &weight_only_generic};
  return &table;
}

}  // namespace int8
}  // namespace pk
