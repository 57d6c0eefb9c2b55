// Sparse kernels for the portable build: sparse_generic.h compiled with this
// file's flags (set in CMakeLists.txt).
#include "sparse_generic.h"

namespace pk {
namespace sparse {

const Kernels* kernels_portable() {
  static const Kernels table{
      .forward = &forward_generic, .backward_x = &backward_x_generic, .sddmm = &sddmm_generic};
  return &table;
}

}  // namespace sparse
}  // namespace pk
