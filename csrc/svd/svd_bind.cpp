// pykernels._C: the svd functions over NumPy buffers (check and forward).
#include "common/bind.h"
#include "svd/svd.h"

namespace {

using namespace pk::bind;  // NOLINT: the buffer checks every binding uses

// a [B, m, n] contiguous; u [B, m, k], s [B, k], vh [B, k, n] (float32 or float64).
template <class T>
int batched_svd_typed(py::array& a, py::array& u, py::array& s, py::array& vh) {
  if (a.ndim() != 3) throw std::invalid_argument("a: expected [B, m, n]");
  const int64_t b = a.shape(0), m = a.shape(1), n = a.shape(2), k = std::min(m, n);
  const T* pa = contiguous_of<T>(a, "a", b * m * n, false);
  T* pu = contiguous_of<T>(u, "u", b * m * k, true);
  T* ps = contiguous_of<T>(s, "s", b * k, true);
  T* pv = contiguous_of<T>(vh, "vh", b * k * n, true);
  py::gil_scoped_release nogil;
  return pk::svd::batched_svd_cpu(pa, b, m, n, pu, ps, pv);
}

int batched_svd(py::array a, py::array u, py::array s, py::array vh) {
  if (py::isinstance<py::array_t<float>>(a)) return batched_svd_typed<float>(a, u, s, vh);
  return batched_svd_typed<double>(a, u, s, vh);
}

}  // namespace

PK_BIND_FAMILY(svd) {
  m.def("batched_svd", &batched_svd, py::arg("a"), py::arg("u"), py::arg("s"), py::arg("vh"),
        "One-sided Jacobi SVD of each matrix of a [B, m, n]; returns the sweeps needed.");
}
