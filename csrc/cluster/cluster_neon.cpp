// Armv8-A cluster kernels (cluster_arm.h): codes looked up by TBL, the
// dynamic mode's int8 products by SMULL/SMLAL2/SADALP, the generic quantizer.
#include "cluster_arm.h"

namespace pk {
namespace cluster {

const Kernels* kernels_neon() {
  static const Kernels table{.linear4 = &linear4,
                             .linear8 = &linear8,
                             .dynamic4 = &dynamic4,
                             .dynamic8 = &dynamic8,
                             .quantize = &quantize_generic};
  return &table;
}

}  // namespace cluster
}  // namespace pk
