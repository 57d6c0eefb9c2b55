// Per-ISA int4 kernels, compiled once per instruction set and chosen at run
// time (int4_cpu.cpp).
#pragma once
#include <cstdint>

#include "int4.h"

namespace pk {
namespace int4 {

// The weight as the caller passes it (format in int4.h).
struct Weight {
  const uint8_t* packed;
  const float* scales;
  const uint8_t* zeros;
  int64_t n, k, group;
};

// W4A8 activations, prepared once per call by the driver: each row of x
// quantized to int8 (a_scale), its codes reordered within every 8 columns as
// 0, 2, 4, 6, 1, 3, 5, 7 (so the 4 low nibbles of 4 bytes of a weight row meet
// their 4 activations in one dword, the 4 high nibbles the next), and asum,
// the sum of each group of each row's codes (for the zero points:
// sum a (q - z) = sum a q - z * asum, all in int32).
struct Act {
  const int8_t* q;  // M x K, row stride k
  const float* scale;
  const int32_t* asum;  // M x (K / group)
};

// How the driver lays out x in float32 for a table's weight-only kernel
// (row stride k either way).
enum class XLayout {
  // each row's even columns, then its odd ones
  even_odd,
  // rows in tiles of kXTile (the last tile holds the rest, mt rows), each
  // tile's kXTile * k floats from tile * kXTile * k; in a tile, chunk by
  // chunk of 128 columns (the last one may hold 32, 64 or 96: w columns,
  // D = w / 8 dwords of a weight row), the chunk from c0 * mt, row by row
  // (w floats each), the chunk's column 8d + p at p * D + d: nibble p of
  // dword d of the weight row's 64 bytes. A tile's rows of a chunk then sit
  // at fixed offsets from one pointer.
  nibble_chunks,
};

constexpr int64_t kXTile = 8;

struct Kernels {
  // Weight-only, output columns [n0, n1) of every row: xd is x in float32
  // laid out as x_layout says.
  void (*weight_only)(const float* xd, int64_t m, const Weight& w, const float* bias, void* y,
                      DType yt, int64_t n0, int64_t n1);
  // W4A8, rows [m0, m1) x output columns [n0, n1) (n0 a multiple of 32);
  // scratch: scratch_bytes(k, group) bytes of this thread's.
  void (*dynamic)(const Act& a, const Weight& w, const float* bias, void* y, DType yt, int64_t m0,
                  int64_t m1, int64_t n0, int64_t n1, uint8_t* scratch);
  // The reorder and group sums of Act for rows [r0, r1) of q (row stride k).
  void (*prepare)(const int8_t* q, int64_t k, int64_t group, int8_t* out, int32_t* asum, int64_t r0,
                  int64_t r1);
  XLayout x_layout = XLayout::even_odd;
};

// Bytes of a thread's W4A8 scratch: a block of 32 output channels of the
// weight decoded (at most a byte per code: k * 32), and its scales and zero
// points as floats.
inline int64_t scratch_bytes(int64_t k, int64_t group) {
  return k * 32 + 2 * (k / group) * 32 * 4 + 64;
}

const Kernels* kernels_portable();
const Kernels* kernels_avx2();
const Kernels* kernels_avx512_vnni();

}  // namespace int4
}  // namespace pk
