// Per-ISA int8 kernels, compiled once per instruction set (see topk_isa.h for
// why nothing here touches the standard library).
#pragma once
#include <cstdint>

#include "int8.h"

namespace pk {
namespace int8 {

// One GEMM over a packed weight (layout in int8.h) with its epilogue.
struct PackedGemm {
  // M x kp activations in the kernel table's format (GemmKernels::signed_a):
  // unsigned bytes a + 128, or the signed bytes themselves, in [-127, 127].
  const uint8_t* a;
  int64_t lda;
  const int8_t* b;  // packed weight
  int64_t kp;
  const int32_t* comp;  // packed_n(n) entries, zero past n; unused with signed_a
  int64_t n;            // real N: columns past it are computed, never stored
  void* c;
  int64_t ldc;
  // a_scale null: c = int32 (acc - comp, or acc with signed_a). Otherwise c, of type yt, =
  // float(acc - comp) * a_scale[m] * b_scale[n] + bias[n] (bias may be null).
  const float* a_scale = nullptr;
  const float* b_scale = nullptr;
  const float* bias = nullptr;
  DType yt = DType::f32;
  // Non-null only for a table with a7_zp (7-bit activations): a holds q + zp
  // in [0, 127] (unsigned, never biased) and the kernel subtracts
  // a_zp[row] * comp[col] / 128 (= zp * sum_k w) instead of comp.
  const int32_t* a_zp = nullptr;
};

// Panel p of a packed weight of np_ / 16 panels: its first byte, and the
// distance from one group to the next (layout in int8.h). Internal linkage:
// every ISA file compiles its own copy.
static inline const int8_t* panel_base(const int8_t* b, int64_t kp, int64_t np_, int64_t p,
                                       int64_t* group_stride) {
  const int64_t blk = p / 4, panels = np_ / 16;
  const int64_t nv = panels - 4 * blk < 4 ? panels - 4 * blk : 4;
  *group_stride = 64 * nv;
  return b + 64 * blk * kp + 64 * (p % 4);
}

// The address `off` bytes from p, for prefetches: it may lie past the end
// of p's buffer (a prefetch never faults), where pointer arithmetic would
// be undefined, so it is done on the integer.
static inline const char* byte_at(const void* p, int64_t off) {
  return reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + uintptr_t(off));
}

// Row stride of the unsigned activation scratch: kp, plus a cache line when
// kp is a multiple of 256, so that the rows a tile reads together do not all
// fall into one L1 set.
static inline int64_t scratch_ld(int64_t kp) { return kp % 256 == 0 ? kp + 64 : kp; }

struct GemmKernels {
  // Row-major operands, no packing: c[i, j] for rows i in [m0, m1) of a and
  // rows j in [n0, n1) of b.
  void (*gemm)(const int8_t* a, const int8_t* b, int32_t* c, int64_t m0, int64_t m1, int64_t n0,
               int64_t n1, int64_t k, int64_t lda, int64_t ldb, int64_t ldc);
  // Rows [m0, m1) and 16-column panels [p0, p1) of a packed GEMM; p0 is a
  // multiple of 4 and p1 ends a block of four panels (or the last block).
  void (*gemm_packed)(const PackedGemm& g, int64_t m0, int64_t m1, int64_t p0, int64_t p1);
  // Panels [p0, p1) of pack_weight_cpu (layout and comp in int8.h).
  void (*pack)(const int8_t* w, int64_t n, int64_t k, int64_t ldw, int8_t* packed, int32_t* comp,
               int64_t p0, int64_t p1);
  // Rows [r0, r1) of x quantized as quantize_per_row does, stored in rows of
  // ldq bytes in this table's activation format (the bytes past k zero in it).
  void (*quantize_a)(const void* x, DType xt, int64_t ldx, int64_t k, uint8_t* q, int64_t ldq,
                     float* scale, int64_t r0, int64_t r1);
  // Weight-only linear for output columns [n0, n1): x is M x K fp32 (row
  // stride k), w row-major N x K int8; wf is 4 * k floats of scratch.
  void (*weight_only)(const float* x, int64_t m, int64_t k, const int8_t* w, const float* w_scale,
                      const float* bias, void* y, DType yt, int64_t n, int64_t n0, int64_t n1,
                      float* wf);
  // Activation format of gemm_packed and quantize_a: false, unsigned bytes
  // a + 128 (the weight compensation comp is subtracted); true, signed bytes
  // that must lie in [-127, 127] (int8_gemm corrects for -128).
  bool signed_a = false;
  // gemm_packed works in AMX tiles: it wants few, wide calls (a range of many
  // blocks of panels and every row, see run_packed in int8_cpu.cpp), and the
  // calling thread must hold the OS's tile-data permission (detected_isa()
  // is amx only once the process has it).
  bool tiles = false;
  // AMX only (null elsewhere): c = a b^T over columns [n0, n1) of c, every
  // row of a, with b row-major (rows n0.. n1 read in place, never packed)
  // and a packed as pack() packs a weight (ap, m rows, kp = k): the tiles
  // then compute c^T = b a^T with TDPBSSD (signed x signed, -128 exact).
  // k must be a positive multiple of 64.
  void (*gemm_bt)(const int8_t* ap, int64_t m, const int8_t* b, int64_t ldb, int64_t k, int32_t* c,
                  int64_t ldc, int64_t n0, int64_t n1) = nullptr;
  // Rows [r0, r1) quantized as quantize_per_row7 does. Without a7_zp they are
  // stored in this table's activation format (q + 128, or q) and zp is not
  // written; with it, as q + zp with zp[r] written, for gemm_packed with
  // PackedGemm::a_zp (see there).
  void (*quantize_a7)(const void* x, DType xt, int64_t ldx, int64_t k, uint8_t* q, int64_t ldq,
                      float* scale, int32_t* zp, int64_t r0, int64_t r1);
  bool a7_zp = false;
  // The fused epilogue (int8_epilogue.h) on y[m0 .. m1, c0 .. c1) in place;
  // null in a table means the portable one's.
  void (*epilogue)(const Epilogue& e, float* y, int64_t ldy, int64_t m0, int64_t m1, int64_t c0,
                   int64_t c1) = nullptr;
  // Epilogue::norm over whole rows [m0, m1) of y (n columns) in place; null
  // means the portable one's.
  void (*norm_rows)(const Epilogue& e, float* y, int64_t ldy, int64_t m0, int64_t m1,
                    int64_t n) = nullptr;
};

const GemmKernels* gemm_kernels_portable();
const GemmKernels* gemm_kernels_avx2();
const GemmKernels* gemm_kernels_avx512_vnni();
// AVX-512 VNNI table with an AMX-INT8 tile gemm_packed (same packed weight,
// same unsigned activations).
const GemmKernels* gemm_kernels_amx();
// Arm (int8_neon.cpp, int8_dotprod.cpp, int8_i8mm.cpp): signed activations,
// the same packed weight. neon is baseline Armv8-A (SMULL / SADALP), dotprod
// adds SDOT, i8mm SMMLA for many rows (and dotprod's kernels for few).
const GemmKernels* gemm_kernels_neon();
const GemmKernels* gemm_kernels_dotprod();
const GemmKernels* gemm_kernels_i8mm();

}  // namespace int8
}  // namespace pk
