// qat kernels compiled with the portable flags (see qat_generic.h).
#include "qat_generic.h"

namespace pk {
namespace qat {

const Kernels* kernels_portable() {
  static const Kernels table{.fake_quant_rows = &fake_quant_rows_generic,
                             .backward = &backward_generic};
  return &table;
}

}  // namespace qat
}  // namespace pk
