// attention kernels compiled with the avx512 flags (see attention_generic.h).
#include "attention_generic.h"

namespace pk {
namespace attention {

const Kernels* kernels_avx512() { return Attention<16, 8, 2, 16>::table(); }

}  // namespace attention
}  // namespace pk
