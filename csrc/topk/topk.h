// Top-k sparsification by magnitude: the torch-free API of the topk family.
//
// Selects the k entries of largest |x| of a flat array of n elements and
// writes their values (in x's dtype, signed) and int64 indices, indices in
// ascending order. Ties in magnitude are broken towards the lower index, so
// the result is deterministic. NaN ranks above +-inf (as in torch.topk).
//
// With a residual (fp32, n elements; error feedback), selection is over
// y = x + residual and the residual is overwritten in the same pass with the
// part of y that was not sent: y where not selected, and y - value (the
// rounding remainder, 0 for fp32) where selected, so that
// x + residual_old == densify(values) + residual_new (in fp32 arithmetic).
// A finite y beyond an fp16/bf16 value's range is sent saturated, as the
// largest finite value of its sign, and the excess stays in the residual
// (sending inf would break the identity and poison every later sum). The
// identity is then exact for |y| < 2^29 and within one fp32 rounding of y
// above (fp16's 65504 is then below y's last place); bf16 is always exact.
// A y that is inf or NaN is sent as it is and leaves 0 behind. Where x and
// the residual are both NaN, which of the two payloads y carries is left
// open (as IEEE leaves it: compilers reorder the add, and ISAs differ).
#pragma once
#include <cstdint>

#include "../common/dtype.h"

struct CUstream_st;  // cudaStream_t without the CUDA headers

namespace pk {
namespace topk {

struct Args {
  const void* x = nullptr;  // n elements of dtype
  DType dtype = DType::f32;
  int64_t n = 0;
  int64_t k = 0;               // 0 <= k <= n
  bool approx = false;         // tighter sampled margin; see topk_cpu.cpp
  float* residual = nullptr;   // optional, n fp32, updated in place
  void* values = nullptr;      // k elements of dtype
  int64_t* indices = nullptr;  // k int64
};

// Throws std::invalid_argument on bad arguments. Thread-safe.
void sparsify_cpu(const Args& args);

// Same contract on device pointers, ordered on `stream`; synchronises the
// stream (the candidate count decides the next launch sizes).
void sparsify_cuda(const Args& args, CUstream_st* stream);

// Checks shared by both entry points.
void check_args(const Args& args);

}  // namespace topk
}  // namespace pk
