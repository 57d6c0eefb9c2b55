// pykernels._C_cuda: the CUDA kernels over raw device pointers and a stream
// handle taken from torch tensors in Python, so no libtorch is linked.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "topk/topk.h"

namespace py = pybind11;

#ifndef PK_CUDA_ARCHS
#define PK_CUDA_ARCHS "unknown"
#endif

namespace {

void topk_sparsify(uintptr_t x, int dtype, int64_t n, int64_t k, bool approx, uintptr_t residual,
                   uintptr_t values, uintptr_t indices, uintptr_t stream) {
  pk::topk::Args a;
  a.x = reinterpret_cast<const void*>(x);
  a.dtype = static_cast<pk::DType>(dtype);
  a.n = n;
  a.k = k;
  a.approx = approx;
  a.residual = reinterpret_cast<float*>(residual);
  a.values = reinterpret_cast<void*>(values);
  a.indices = reinterpret_cast<int64_t*>(indices);
  py::gil_scoped_release nogil;
  pk::topk::sparsify_cuda(a, reinterpret_cast<CUstream_st*>(stream));
}

py::dict cuda_info() {
  py::dict d;
  int runtime = 0, driver = 0, count = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    count = 0;
    cudaGetLastError();
  }
  d["archs_compiled"] = std::string(PK_CUDA_ARCHS);
  d["runtime_version"] = runtime;
  d["driver_version"] = driver;
  d["device_count"] = count;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pykernels CUDA kernels (torch-free, over device pointers and streams)";
  m.def("topk_sparsify", &topk_sparsify, py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("k"),
        py::arg("approx"), py::arg("residual"), py::arg("values"), py::arg("indices"),
        py::arg("stream"));
  m.def("cuda_info", &cuda_info);
}
