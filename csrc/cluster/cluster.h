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

// y[m, n] = sum_k x[m, k] * codebook[cb_row(n), codes[n, k]] + bias[n], in
// fp32. x: M x K with row stride ldx; codes: N rows of code_row_bytes(K, bits)
// bytes; codebook: rows of n_clusters floats, row n (per_row) or row 0 for
// every n; bias may be null; y: M x N, row stride n. A code >= n_clusters
// reads 0 (the Python layer refuses such codes before any backend runs).
void linear_cpu(const float* x, int64_t m, int64_t k, int64_t ldx, const uint8_t* codes, int bits,
                const float* codebook, int64_t n_clusters, bool per_row, const float* bias,
                int64_t n, float* y);

}  // namespace cluster
}  // namespace pk
