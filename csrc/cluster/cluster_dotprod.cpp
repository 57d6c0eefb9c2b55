// The cluster kernels of cluster_arm.h with SDOT (Armv8.2 dot product): the
// dynamic mode's 16 int8 multiply-adds in one instruction instead of three.
// The weight-only kernels are the NEON ones, recompiled.
#include "cluster_arm.h"

namespace pk {
namespace cluster {

const Kernels* kernels_dotprod() {
  static const Kernels table{.linear4 = &linear4,
                             .linear8 = &linear8,
                             .dynamic4 = &dynamic4,
                             .dynamic8 = &dynamic8,
                             .quantize = &quantize_generic};
  return &table;
}

}  // namespace cluster
}  // namespace pk
