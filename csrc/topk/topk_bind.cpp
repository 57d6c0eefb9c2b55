// pykernels._C: the topk functions over NumPy buffers (check and forward).
#include "common/bind.h"
#include "topk/topk.h"

namespace {

using namespace pk::bind;  // NOLINT: the buffer checks every binding uses

void topk_sparsify(py::array x, int dtype, int64_t k, bool approx, py::object residual,
                   py::array values, py::array indices) {
  using pk::DType;
  pk::topk::Args a;
  a.dtype = static_cast<DType>(dtype);
  a.n = x.size();
  a.k = k;
  a.approx = approx;
  if (a.dtype == DType::f32) {
    a.x = data_of<uint32_t>(x, "x", a.n, false);
    a.values = data_of<uint32_t>(values, "values", k, true);
  } else {
    a.x = data_of<uint16_t>(x, "x", a.n, false);
    a.values = data_of<uint16_t>(values, "values", k, true);
  }
  a.indices = data_of<int64_t>(indices, "indices", k, true);
  a.residual = optional_data_of<float>(residual, "residual", a.n, true);
  py::gil_scoped_release nogil;
  pk::topk::sparsify_cpu(a);
}

}  // namespace

PK_BIND_FAMILY(topk) {
  m.def("topk_sparsify", &topk_sparsify, py::arg("x"), py::arg("dtype"), py::arg("k"),
        py::arg("approx"), py::arg("residual"), py::arg("values"), py::arg("indices"),
        "Top-k by magnitude of the raw bits in x (uint32 for f32, uint16 for f16/bf16).");
}
