// Portable cluster kernels: the plain loops of cluster_generic.h, which
// compilers vectorise for the baseline ISA.
#include "cluster_generic.h"

namespace pk {
namespace cluster {

const Kernels* kernels_portable() {
  static const Kernels table{.linear4 = &linear_generic<4>,
                             .linear8 = &linear_generic<8>,
                             .dynamic4 = &dynamic_generic<4>,
                             .dynamic8 = &dynamic_generic<8>,
                             .quantize = &quantize_generic};
  return &table;
}

}  // namespace cluster
}  // namespace pk
