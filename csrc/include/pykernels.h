/* pykernels: plain C ABI of the native kernels, for cffi, Numba (through
 * cffi) and other languages. Functions return PK_OK or a negative code;
 * pk_last_error() describes the last failure on the calling thread. */
#ifndef PYKERNELS_H
#define PYKERNELS_H
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PK_OK 0
#define PK_EINVAL (-1)
#define PK_EINTERNAL (-2)

#define PK_DTYPE_F32 0
#define PK_DTYPE_F16 1
#define PK_DTYPE_BF16 2

/* The k entries of largest magnitude of x[0..n), indices ascending, ties to
 * the lower index. residual (n floats, optional) enables error feedback: see
 * csrc/topk/topk.h. values holds k elements of dtype, indices k int64. */
int pk_topk_sparsify(const void* x, int dtype, int64_t n, int64_t k, int approx, float* residual,
                     void* values, int64_t* indices);

/* Typed float32 forms, convenient from Numba (no void* casts). */
int pk_topk_sparsify_f32(const float* x, int64_t n, int64_t k, int approx, float* values,
                         int64_t* indices);
int pk_topk_sparsify_ef_f32(const float* x, int64_t n, int64_t k, int approx, float* residual,
                            float* values, int64_t* indices);

const char* pk_last_error(void);
const char* pk_version(void);

#ifdef __cplusplus
}
#endif
#endif
