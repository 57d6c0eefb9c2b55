// Portable int4 kernels: the plain loops of int4_generic.h, which compilers
// vectorise for the baseline ISA (and the only ones on aarch64 so far).
#include "int4_generic.h"

namespace pk {
namespace int4 {

const Kernels* kernels_portable() {
  static const Kernels table{.weight_only = &weight_only_generic,
                             .dynamic = &dynamic_generic,
                             .prepare = &prepare_generic};
  return &table;
}

}  // namespace int4
}  // namespace pk
