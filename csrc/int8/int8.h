// int8 family, torch-free API: symmetric per-row quantization, the exact
// int8 x int8 -> int32 GEMM, and the W8A8 / W8A16 linear layers built on a
// prepacked weight.
#pragma once
#include <cstdint>

#include "../common/dtype.h"

namespace pk {
namespace int8 {

// K at or above this could overflow int32 (128 * 128 * K >= 2^31): refused.
constexpr int64_t kMaxK = 131072;

// scale[r] = max|x[r, :]| / 127 (fp32); q = round_half_even(x / scale),
// clamped to [-127, 127]; rows of zeros get scale 0 and q 0. Rows are `ld`
// elements apart. NaN/inf in a row make that row's scale NaN/inf and its q 0.
void quantize_per_row_cpu(const float* x, int64_t rows, int64_t cols, int64_t ld, int8_t* q,
                          float* scale);

// 7-bit activations ("act_bits = 7"): 128 levels spanning [lo, hi] = [min(row,
// 0), max(row, 0)], so a one-sided row (after a ReLU or GELU) keeps all of
// them. scale = hi / 127 - lo / 127 (fp32; the difference of the two
// quotients cannot overflow where hi - lo could), zp = round_half_even(-lo /
// scale) clamped to [0, 127], q = clamp(round_half_even(x / scale), -zp, 127
// - zp), so q + zp is in [0, 127] and q in [-127, 127]; x ~ q * scale as with
// quantize_per_row. Zero, NaN and inf rows as quantize_per_row. What it buys:
// unsigned 7-bit activations times int8 weights never saturate AVX2's
// vpmaddubsw (2 * 127 * 128 < 2^15), which then needs no sign transfer.
void quantize_per_row7_cpu(const float* x, int64_t rows, int64_t cols, int64_t ld, int8_t* q,
                           float* scale);

// c[m, n] = sum_k a[m, k] * b[n, k] in int32 (a: M x K, b: N x K, both
// row-major with leading dimensions lda / ldb; c: M x N with ldc). Exact.
void gemm_s8s8s32_cpu(const int8_t* a, const int8_t* b, int32_t* c, int64_t m, int64_t n, int64_t k,
                      int64_t lda, int64_t ldb, int64_t ldc);

// Packed weight layout "k4n16", the one every CPU path reads. N is padded to
// a multiple of 16 (a panel), K to a multiple of 4 (a group), both with zeros.
// Within a panel, group g is 64 bytes holding w[16p + j, 4g + i] at byte
// 4j + i: one 64-byte load is 16 output channels x 4 k, the operand of one
// VNNI dot-product instruction. Panels go in blocks of four (the last block
// may hold fewer, nv), interleaved by group: block b starts at byte
// 64 * b * kp, and its group g of panel 4b + j is at 64 * (g * nv + j) from
// there. The kernel then reads one stream per block, not four streams a
// power of two apart, which would share one L1 set.
// comp[n] = 128 * sum_k w[n, k]: the correction for activations stored as
// unsigned bytes (a + 128), which is what the VNNI instruction multiplies.
inline int64_t packed_n(int64_t n) { return (n + 15) / 16 * 16; }
inline int64_t packed_k(int64_t k) { return (k + 3) / 4 * 4; }
void pack_weight_cpu(const int8_t* w, int64_t n, int64_t k, int64_t ldw, int8_t* packed,
                     int32_t* comp);

// What the fused epilogue of linear_dynamic_cpu does to each fp32 output,
// after the scales and the bias: y = act(y) + residual. The codes are the
// Python API's (ops/int8.py ACTIVATIONS).
enum class Act : int32_t { none = 0, relu = 1, gelu = 2, gelu_tanh = 3, silu = 4 };
// Where a transformer block ends, after act and residual, each whole row of y
// is normalized: LayerNorm (y - mean) / sqrt(var + eps) * gamma + beta, or
// RMSNorm y / sqrt(mean(y^2) + eps) * gamma (beta unused). Statistics in fp32,
// two passes (mean, then the centred squares), as torch's CPU kernels.
enum class Norm : int32_t { none = 0, layer = 1, rms = 2 };
struct Epilogue {
  Act act = Act::none;
  const float* residual = nullptr;  // M x N fp32 with row stride ldr, or null
  int64_t ldr = 0;
  Norm norm = Norm::none;
  const float* gamma = nullptr;  // [N]; null means ones
  const float* beta = nullptr;   // [N]; null means zeros
  float eps = 1e-5f;
  // Gated output (Llama's act(x W_g) * (x W_u)); set only by
  // linear_dynamic_gated_cpu: y's columns come in blocks of 64, 32 gate
  // outputs then the 32 up outputs of the same columns, and the epilogue
  // writes gated[r, j] = act(gate) * up for the block's 32 columns j < gated_n.
  float* gated = nullptr;
  int64_t ldg = 0;
  int64_t gated_n = 0;
};

// Rows of the gated weight for n_out gated columns: blocks of 32 columns, each
// stored as 32 gate rows then 32 up rows (zero rows past n_out).
inline int64_t gated_rows(int64_t n_out) { return (n_out + 31) / 32 * 64; }

// Dynamic W8A8 linear: y[m, n] = sum_k q(x)[m, k] * w[n, k] * x_scale[m] *
// w_scale[n] + bias[n], with x quantized per row as quantize_per_row does.
// x: M x K of `xt` with row stride ldx; y: M x N of `yt` (row stride n);
// bias may be null. NaN/inf in a row of x give NaN in that row of y.
// act_bits 7 quantizes x as quantize_per_row7 does instead (faster on AVX2).
// A non-trivial epilogue needs yt = f32; each thread applies it to the block
// of y it has just computed.
void linear_dynamic_cpu(const void* x, DType xt, int64_t m, int64_t k, int64_t ldx,
                        const int8_t* packed, const int32_t* comp, const float* w_scale,
                        const float* bias, int64_t n, void* y, DType yt, int act_bits = 8,
                        const Epilogue& epilogue = Epilogue{});

// The dynamic linear whose output is the next layer's quantized input: y =
// act(x W^T + bias) (epilogue.act; no residual) is never stored. Threads take
// chunks of rows over all of N, compute them in their own scratch and quantize
// each row as quantize_per_row does (scale = max|y| / 127, q in [-127, 127],
// round half to even; NaN/inf rows: scale NaN/inf, q 0) into q [M, N]
// (row-major int8) and q_scale [M]. Equal to quantize_per_row of
// linear_dynamic_cpu's fp32 output with the same epilogue.
void linear_dynamic_q8out_cpu(const void* x, DType xt, int64_t m, int64_t k, int64_t ldx,
                              const int8_t* packed, const int32_t* comp, const float* w_scale,
                              const float* bias, int64_t n, Act act, int8_t* q, float* q_scale,
                              int act_bits = 8);

// The dynamic linear of an activation already quantized per row (q: M x K
// int8 in [-127, 127], row stride ldq; x_scale [M]), as linear_dynamic_cpu
// computes after quantizing x itself; y (M x N of yt) with the epilogue.
// q holding -128 is refused (std::invalid_argument).
void linear_prequantized_cpu(const int8_t* q, const float* x_scale, int64_t m, int64_t k,
                             int64_t ldq, const int8_t* packed, const int32_t* comp,
                             const float* w_scale, const float* bias, int64_t n, void* y, DType yt,
                             const Epilogue& epilogue = Epilogue{});

// Gated dynamic W8A8 linear, the first half of a Llama-style MLP: out[m, j]
// = act(x W_g^T + b_g)[m, j] * (x W_u^T + b_u)[m, j] (j < n_out), fp32 out
// with row stride ldo. The weight is packed with gate and up rows interleaved
// (gated_rows(n_out) rows; see Epilogue::gated), as are w_scale and bias, so
// that every 64-column block a thread computes holds both halves of its 32
// outputs: the product is formed while the block is in L1 and the 2 x N
// float intermediate is never written to memory whole (rows go in chunks).
void linear_dynamic_gated_cpu(const void* x, DType xt, int64_t m, int64_t k, int64_t ldx,
                              const int8_t* packed, const int32_t* comp, const float* w_scale,
                              const float* bias, int64_t n_out, Act act, float* out, int64_t ldo,
                              int act_bits = 8);

// Weight-only W8A16 linear: y = x @ (w * w_scale[:, None]).T + bias with x in
// float, the int8 weight row-major (N x K) and dequantized in registers.
// Rows below which packed GEMMs leave AMX tiles for the AVX-512 VNNI
// kernel (results are identical; only speed differs). Tests set it to 1 so
// that every M runs on tiles; returns the previous value.
int64_t set_amx_min_rows(int64_t rows);
int64_t amx_min_rows();

void linear_weight_only_cpu(const void* x, DType xt, int64_t m, int64_t k, int64_t ldx,
                            const int8_t* w, const float* w_scale, const float* bias, int64_t n,
                            void* y, DType yt);

}  // namespace int8
}  // namespace pk
