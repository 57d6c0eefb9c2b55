// attention kernels compiled with the portable flags (see attention_generic.h).
#include "attention_generic.h"

namespace pk {
namespace attention {

const Kernels* kernels_portable() { return Attention<4, 4, 2, 8>::table(); }

}  // namespace attention
}  // namespace pk
