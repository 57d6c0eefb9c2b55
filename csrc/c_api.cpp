// The C ABI: exceptions never cross it; they become codes and a message.
#include <stdexcept>
#include <string>

#include "include/pykernels.h"
#include "topk/topk.h"

#ifndef PK_VERSION
#define PK_VERSION "0.0.0"
#endif

namespace {
thread_local std::string g_error;

template <class F>
int guarded(F f) {
  try {
    f();
    g_error.clear();
    return PK_OK;
  } catch (const std::invalid_argument& e) {
    g_error = e.what();
    return PK_EINVAL;
  } catch (const std::exception& e) {
    g_error = e.what();
    return PK_EINTERNAL;
  } catch (...) {
    g_error = "unknown error";
    return PK_EINTERNAL;
  }
}
}  // namespace

extern "C" {

int pk_topk_sparsify(const void* x, int dtype, int64_t n, int64_t k, int approx, float* residual,
                     void* values, int64_t* indices) {
  return guarded([&] {
    pk::topk::Args a;
    a.x = x;
    a.dtype = static_cast<pk::DType>(dtype);
    a.n = n;
    a.k = k;
    a.approx = approx != 0;
    a.residual = residual;
    a.values = values;
    a.indices = indices;
    pk::topk::sparsify_cpu(a);
  });
}

int pk_topk_sparsify_f32(const float* x, int64_t n, int64_t k, int approx, float* values,
                         int64_t* indices) {
  return pk_topk_sparsify(x, PK_DTYPE_F32, n, k, approx, nullptr, values, indices);
}

int pk_topk_sparsify_ef_f32(const float* x, int64_t n, int64_t k, int approx, float* residual,
                            float* values, int64_t* indices) {
  return pk_topk_sparsify(x, PK_DTYPE_F32, n, k, approx, residual, values, indices);
}

const char* pk_last_error(void) { return g_error.c_str(); }
const char* pk_version(void) { return PK_VERSION; }
}
