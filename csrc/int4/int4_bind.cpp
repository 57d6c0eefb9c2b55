// pykernels._C: the int4 functions over NumPy buffers (check and forward).
#include "common/bind.h"
#include "int4/int4.h"

namespace {

using namespace pk::bind;  // NOLINT: the buffer checks every binding uses

using Linear = void (*)(const void*, pk::DType, int64_t, int64_t, int64_t, const uint8_t*,
                        const float*, const uint8_t*, int64_t, const float*, int64_t, void*,
                        pk::DType);

template <Linear fn>
void linear(py::array x, int xt, py::array packed, py::array scales, py::array zeros, int group,
            py::object bias, py::array y, int yt) {
  int64_t m, k, ldx, n, half, ldp, sn, sg, lds, zn, zg, ldz, ym, yn, ldy;
  const void* px = float_matrix(x, "x", xt, &m, &k, &ldx, false);
  const uint8_t* pp = matrix<uint8_t>(packed, "packed", &n, &half, &ldp, false);
  const float* ps = matrix<float>(scales, "scales", &sn, &sg, &lds, false);
  const uint8_t* pz = matrix<uint8_t>(zeros, "zeros", &zn, &zg, &ldz, false);
  void* py_ = float_matrix(y, "y", yt, &ym, &yn, &ldy, true);
  if (group != 32 && group != 64 && group != 128)
    throw std::invalid_argument("group_size must be 32, 64 or 128");
  if (2 * half != k) throw std::invalid_argument("packed: expected [N, K / 2] bytes");
  if (ldp != half) throw std::invalid_argument("packed: expected a contiguous buffer");
  if (k % group) throw std::invalid_argument("group_size must divide K");
  if (sn != n || sg != k / group || lds != sg)
    throw std::invalid_argument("scales: expected a contiguous [N, K / group_size] buffer");
  if (zn != n || zg != k / group || ldz != zg)
    throw std::invalid_argument("zeros: expected a contiguous [N, K / group_size] buffer");
  if (ym != m || yn != n || ldy != n)
    throw std::invalid_argument("y: expected a contiguous [M, N] buffer");
  const float* pb = optional_data_of<float>(bias, "bias", n, false);
  py::gil_scoped_release nogil;
  fn(px, pk::DType(xt), m, k, ldx, pp, ps, pz, group, pb, n, py_, pk::DType(yt));
}

}  // namespace

PK_BIND_FAMILY(int4) {
  m.def("int4_weight_linear", &linear<&pk::int4::linear_weight_only_cpu>, py::arg("x"),
        py::arg("xtype"), py::arg("packed"), py::arg("scales"), py::arg("zeros"),
        py::arg("group_size"), py::arg("bias"), py::arg("y"), py::arg("ytype"),
        "Weight-only int4 linear (float activations) over the group-wise format.");
  m.def("int4_dynamic_linear", &linear<&pk::int4::linear_dynamic_cpu>, py::arg("x"),
        py::arg("xtype"), py::arg("packed"), py::arg("scales"), py::arg("zeros"),
        py::arg("group_size"), py::arg("bias"), py::arg("y"), py::arg("ytype"),
        "Dynamic W4A8 int4 linear: int8 activations per row, exact int32 group sums.");
}
