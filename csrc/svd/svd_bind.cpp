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

// y = q a^T: a [m, n], q [w, n], y [w, m], float32 with contiguous rows.
void dot_rows(py::array a, py::array q, py::array y) {
  int64_t m, n, lda, w, qn, ldq, yw, ym, ldy;
  const float* pa = matrix<float>(a, "a", &m, &n, &lda, false);
  const float* pq = matrix<float>(q, "q", &w, &qn, &ldq, false);
  float* py_ = matrix<float>(y, "y", &yw, &ym, &ldy, true);
  if (qn != n) throw std::invalid_argument("q: expected " + std::to_string(n) + " columns");
  if (yw != w || ym != m) throw std::invalid_argument("y: expected [w, m]");
  py::gil_scoped_release nogil;
  pk::svd::dot_rows_cpu(pa, m, n, lda, pq, w, ldq, py_, ldy);
}

// y = kt^T a: a [m, n], kt [m, w], y [w, n], float32 with contiguous rows.
void combine_rows(py::array a, py::array kt, py::array y) {
  int64_t m, n, lda, km, w, ldk, yw, yn, ldy;
  const float* pa = matrix<float>(a, "a", &m, &n, &lda, false);
  const float* pk_ = matrix<float>(kt, "kt", &km, &w, &ldk, false);
  float* py_ = matrix<float>(y, "y", &yw, &yn, &ldy, true);
  if (km != m) throw std::invalid_argument("kt: expected " + std::to_string(m) + " rows");
  if (yw != w || yn != n) throw std::invalid_argument("y: expected [w, n]");
  py::gil_scoped_release nogil;
  pk::svd::combine_rows_cpu(pa, m, n, lda, pk_, w, ldk, py_, ldy);
}

}  // namespace

PK_BIND_FAMILY(svd) {
  m.def("svd_dot_rows", &dot_rows, py::arg("a"), py::arg("q"), py::arg("y"),
        "y = q @ a.T for float32 a [m, n], q [w, n] (a Krylov pass, a read once).");
  m.def("svd_combine_rows", &combine_rows, py::arg("a"), py::arg("kt"), py::arg("y"),
        "y = kt.T @ a for float32 a [m, n], kt [m, w] (a Krylov pass, a read once).");
  m.def("batched_svd", &batched_svd, py::arg("a"), py::arg("u"), py::arg("s"), py::arg("vh"),
        "One-sided Jacobi SVD of each matrix of a [B, m, n]; returns the sweeps needed.");
}
