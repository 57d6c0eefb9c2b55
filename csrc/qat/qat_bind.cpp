// pykernels._C: the qat functions over NumPy buffers (check and forward).
#include "common/bind.h"
#include "qat/qat.h"

namespace {

using namespace pk::bind;  // NOLINT: the buffer checks every binding uses

void fake_quant_per_row(py::array x, py::array y, py::array mask, py::array scale) {
  int64_t r, c, ld, yr, yc, yld, mr, mc, mld;
  const float* px = matrix<float>(x, "x", &r, &c, &ld, false);
  float* py_ = matrix<float>(y, "y", &yr, &yc, &yld, true);
  uint8_t* pm = matrix<uint8_t>(mask, "mask", &mr, &mc, &mld, true);
  if (yr != r || yc != c || yld != c)
    throw std::invalid_argument("y: expected a contiguous buffer of x's shape");
  if (mr != r || mc != c || mld != c)
    throw std::invalid_argument("mask: expected a contiguous buffer of x's shape");
  float* ps = data_of<float>(scale, "scale", r, true);
  py::gil_scoped_release nogil;
  pk::qat::fake_quant_per_row_cpu(px, r, c, ld, py_, pm, ps);
}

void fake_quant_backward(py::array grad, py::array mask, py::array out) {
  const int64_t n = grad.size();
  const float* pg = data_of<float>(grad, "grad", n, false);
  const uint8_t* pm = data_of<uint8_t>(mask, "mask", n, false);
  float* po = data_of<float>(out, "out", n, true);
  py::gil_scoped_release nogil;
  pk::qat::fake_quant_backward_cpu(pg, pm, n, po);
}

}  // namespace

PK_BIND_FAMILY(qat) {
  m.def("fake_quant_per_row", &fake_quant_per_row, py::arg("x"), py::arg("y"), py::arg("mask"),
        py::arg("scale"), "Fused int8 fake quantization per row with the STE mask (float32).");
  m.def("fake_quant_backward", &fake_quant_backward, py::arg("grad"), py::arg("mask"),
        py::arg("out"), "out = grad where mask, else 0 (1-D buffers).");
}
