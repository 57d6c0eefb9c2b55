// cluster family, torch-free API: a linear layer whose weight is shared
// through small codebooks (weight clustering). Each weight is a code, an
// index into its row's codebook (or the layer's one codebook); the kernel
// reads the packed codes and the codebooks and never forms the dense weight.
#pragma once
#include <cstdint>

namespace pk {
namespace cluster {

constexpr int kMaxClusters = 256;
constexpr int kMaxClusters4 = 16;  // the most a 4-bit code can name
constexpr int64_t kGroup4 = 128;   // k per 64-byte group of 4-bit codes

// Packed codes, one row of bytes per output channel.
//
// bits = 8: byte k of a row is the code of w[n, k] (row length K bytes).
//
// bits = 4: K is padded with code 0 to a multiple of 128 (a group), and a
// group is 64 bytes read as 16 little-endian uint32 lanes: bits [4j, 4j + 4)
// of lane i hold the code of k = 128 g + 16 j + i. A 64-byte load then holds
// the codes of eight consecutive 16-wide vectors of k, and vector j is one
// shift away (a 16-entry table lookup such as vpermps reads the low four
// bits of each lane only): no byte shuffle to unpack nibbles.
inline int64_t code_row_bytes(int64_t k, int bits) {
  return bits == 4 ? (k + kGroup4 - 1) / kGroup4 * (kGroup4 / 2) : k;
}

// y[m, n] = sum_k x[m, k] * codebook[cb_row(n), codes[n, k]] + bias[n].
//
// dynamic = false (weight-only): in fp32, x as it is.
// dynamic = true (int8 activations, as int8's linear_dynamic): each row of x
// is quantized as pk::int8::quantize_per_row does (scale max|x[m]| / 127,
// round half to even), each codebook row to int8 the same way (scale
// max|codebook row| / 127), the products summed exactly in int32, and
// y = float(acc) * (x_scale[m] * cb_scale[row]) + bias[n]. K must be below
// kMaxK then. A row of x holding NaN or inf gives NaN in that row of y. x: M x K with row stride
// ldx; codes: N rows of code_row_bytes(K, bits) bytes; codebook: rows of n_clusters floats, row n
// (per_row) or row 0 for every n; bias may be null; y: M x N, row stride n. A code >= n_clusters
// reads 0 (the Python layer refuses such codes before any backend runs).
void linear_cpu(const float* x, int64_t m, int64_t k, int64_t ldx, const uint8_t* codes, int bits,
                const float* codebook, int64_t n_clusters, bool per_row, const float* bias,
                int64_t n, float* y, bool dynamic = false);

// K at or above this could overflow the int32 sums of the dynamic mode.
constexpr int64_t kMaxK = 131072;

// Byte offset, within a row of the dynamic mode's activation scratch, of
// x[., k] for 4-bit codes: group g's 128 bytes hold, at 4 i + jj, x[k] with
// k = 128 g + 32 jj + i (the low nibbles of code bytes 0..63), and at 64 +
// 4 i + jj, k + 16 (the high nibbles). Activations are stored in the order
// the codes unpack, so no code needs moving.
inline int64_t dynamic_x_pos4(int64_t k) {
  const int64_t g = k / kGroup4, r = k % kGroup4;
  return kGroup4 * g + 64 * ((r / 16) % 2) + 4 * (r % 16) + r / 32;
}

}  // namespace cluster
}  // namespace pk
