// attention kernels compiled with the avx2 flags (see attention_generic.h).
#include "attention_generic.h"

namespace pk {
namespace attention {

const Kernels* kernels_avx2() { return Attention<8, 4, 2, 12>::table(); }

}  // namespace attention
}  // namespace pk
