// Bucketed stochastic quantization with bit packing: the torch-free API of the
// quant family (the hot loops of pykernels.comm.Quantize).
//
// x (n elements, fp32 / fp16 / bf16) is cut into buckets of `bucket`
// consecutive elements. Each bucket has one fp32 scale and levels
// q in [-L, L], L = 2^(bits-1) - 1 (127, 7 or 1 for 8, 4, 2 bits):
//
//   amax  = max |y| over the bucket (y = float(x), plus the residual with EF),
//           compared as IEEE bit patterns with the sign cleared (so NaN > inf)
//   scale = amax / L,  inv = L / amax                      (fp32 divisions)
//   v     = y * inv                                        (fp32)
//   q     = clamp(floor(v + u), -L, L)  stochastic,  clamp(rint(v), -L, L) otherwise
//   code  = q + L, stored in `bits` bits at bit offset i * bits of the byte
//           stream (little-endian bit order); unused high bits of the last byte are 0
//   decoded value = float(code - L) * scale                (fp32)
//
// A bucket whose amax is 0, or so small that L / amax overflows, gets
// scale 0 and all codes L; a bucket holding NaN or inf gets scale NaN (it
// decodes to NaN) and codes L.
//
// The rounding noise u of element i (global index) comes from a counter-based
// generator, so every implementation (AVX2, portable, Numba, the reference)
// gives the same bits for a seed, whatever the threading:
//   k0, k1 = low and high 32 bits of splitmix64(seed)
//   key    = k0 ^ lowbias32(uint32(i >> 32) ^ k1)           (one key per 2^32 elements)
//   h      = lowbias32(uint32(i) ^ key)
//   u      = float(h >> 8) * 2^-24                          (in [0, 1))
// with splitmix64 and lowbias32 as common/hash.h defines them (arithmetic mod
// 2^64 and 2^32). E[floor(v + u)] = v, so decoding is unbiased up to the fp32
// rounding of v + u and the clamp.
//
// Error feedback (residual, fp32, n elements): y = float(x) + residual, and
// the residual is overwritten with y - decoded value (0 in buckets that are
// not finite), so x + residual_old == decoded + residual_new up to the fp32
// rounding of that subtraction.
//
// Every operation above is a single IEEE fp32 operation (no FMA contraction:
// the family is compiled with -ffp-contract=off), which is what makes the
// implementations agree bit for bit.
#pragma once
#include <cstdint>

#include "../common/dtype.h"

namespace pk {
namespace quant {

constexpr int64_t kMaxBucket = int64_t(1) << 20;

struct QuantizeArgs {
  const void* x = nullptr;  // n elements of dtype
  DType dtype = DType::f32;
  int64_t n = 0;
  int32_t bits = 8;      // 8, 4 or 2
  int64_t bucket = 512;  // 1 <= bucket <= kMaxBucket
  bool stochastic = true;
  uint64_t seed = 0;
  float* residual = nullptr;  // optional, n fp32, updated in place
  uint8_t* codes = nullptr;   // packed_bytes(n, bits)
  float* scales = nullptr;    // num_buckets(n, bucket)
};

struct DequantizeArgs {
  const uint8_t* codes = nullptr;  // packed_bytes(n, bits)
  const float* scales = nullptr;   // num_buckets(n, bucket)
  int64_t n = 0;
  int32_t bits = 8;
  int64_t bucket = 512;
  float* out = nullptr;     // n fp32
  bool accumulate = false;  // out += decoded instead of out = decoded
};

inline int64_t packed_bytes(int64_t n, int32_t bits) { return (n * bits + 7) / 8; }
inline int64_t num_buckets(int64_t n, int64_t bucket) { return (n + bucket - 1) / bucket; }

// Throw std::invalid_argument on bad arguments. Thread-safe.
void quantize_cpu(const QuantizeArgs& args);
void dequantize_cpu(const DequantizeArgs& args);

// Fixed-width bit packing (the wire format's index gaps): the low `width`
// bits (0 <= width <= 32) of each of n values, value i at bit offset
// i * width, little-endian; the unused high bits of the last byte are 0.
// `out` / `in` hold packed_bytes(n, width) bytes.
void pack_bits_cpu(const uint32_t* values, int64_t n, int32_t width, uint8_t* out);
void unpack_bits_cpu(const uint8_t* in, int64_t n, int32_t width, uint32_t* values);

void check_args(const QuantizeArgs& args);
void check_args(const DequantizeArgs& args);

}  // namespace quant
}  // namespace pk
