// pykernels._C: the sparse functions over NumPy buffers (check and forward).
#include "common/bind.h"
#include "sparse/sparse.h"

namespace {

using namespace pk::bind;  // NOLINT: the buffer checks every binding uses

// A sparse weight from its buffers: row_ptr int64 [rows + 1], col uint16 or
// int32 (one per value, or per block), values float32.
pk::sparse::Matrix sparse_matrix(py::array& row_ptr, py::array& col, py::array& values, int block,
                                 int64_t n, int64_t k) {
  pk::sparse::Matrix w;
  w.n = n;
  w.k = k;
  w.block = block;
  if (block != 1 && block != pk::sparse::kBlock)
    throw std::invalid_argument("block must be 1 or 4");
  const int64_t rows = block == 1 ? n : (n + block - 1) / block;
  w.row_ptr = data_of<int64_t>(row_ptr, "row_ptr", rows + 1, false);
  const int64_t stored = w.row_ptr[rows];
  if (w.row_ptr[0] != 0 || stored < 0) throw std::invalid_argument("row_ptr: must start at 0");
  for (int64_t r = 0; r < rows; ++r)
    if (w.row_ptr[r + 1] < w.row_ptr[r]) throw std::invalid_argument("row_ptr: must not decrease");
  if (py::isinstance<py::array_t<uint16_t>>(col)) {
    w.col = data_of<uint16_t>(col, "col", stored, false);
    w.col16 = true;
  } else {
    w.col = data_of<int32_t>(col, "col", stored, false);
    w.col16 = false;
  }
  w.values = data_of<float>(values, "values", stored * block * block, false);
  // Column indices are checked on every call (a max reduction the compiler
  // vectorises, well under the kernel's time) so the kernels can trust them.
  const int64_t kcols = block == 1 ? k : (k + block - 1) / block;
  int64_t lo = 0, hi = -1;
  if (w.col16) {
    const uint16_t* c = static_cast<const uint16_t*>(w.col);
    uint16_t mx = 0;
    for (int64_t j = 0; j < stored; ++j) mx = std::max(mx, c[j]);
    hi = stored ? int64_t(mx) : -1;
  } else {
    const int32_t* c = static_cast<const int32_t*>(w.col);
    int32_t mn = 0, mx = -1;
    for (int64_t j = 0; j < stored; ++j) {
      mn = std::min(mn, c[j]);
      mx = std::max(mx, c[j]);
    }
    lo = mn;
    hi = mx;
  }
  if (lo < 0 || hi >= kcols)
    throw std::invalid_argument("col: index out of range [0, " + std::to_string(kcols) + ")");
  return w;
}

void sparse_linear(py::array x, py::array row_ptr, py::array col, py::array values, int block,
                   int64_t n, py::object bias, py::array y) {
  int64_t m, k, ldx, ym, yn, ldy;
  const float* px = matrix<float>(x, "x", &m, &k, &ldx, false);
  float* py_ = matrix<float>(y, "y", &ym, &yn, &ldy, true);
  if (ym != m || yn != n || ldy != n) throw std::invalid_argument("y: expected contiguous [M, N]");
  pk::sparse::Matrix w = sparse_matrix(row_ptr, col, values, block, n, k);
  const float* pb = optional_data_of<float>(bias, "bias", n, false);
  py::gil_scoped_release nogil;
  pk::sparse::linear_cpu(w, px, m, ldx, pb, py_);
}

void sparse_linear_backward(py::array dy, py::array x, py::array row_ptr, py::array col,
                            py::array values, int64_t n, py::object dx, py::object dvalues) {
  int64_t m, k, ldx, dm, dn, lddy;
  const float* pdy = matrix<float>(dy, "dy", &dm, &dn, &lddy, false);
  const float* px = matrix<float>(x, "x", &m, &k, &ldx, false);
  if (dm != m || dn != n || lddy != n)
    throw std::invalid_argument("dy: expected contiguous [M, N]");
  pk::sparse::Matrix w = sparse_matrix(row_ptr, col, values, 1, n, k);
  float* pdx = nullptr;
  if (!dx.is_none()) {
    py::array a = dx.cast<py::array>();
    int64_t r, c, ld;
    pdx = matrix<float>(a, "dx", &r, &c, &ld, true);
    if (r != m || c != k || ld != k) throw std::invalid_argument("dx: expected contiguous [M, K]");
  }
  float* pdv = optional_data_of<float>(dvalues, "dvalues", w.row_ptr[n], true);
  py::gil_scoped_release nogil;
  pk::sparse::linear_backward_cpu(w, pdy, px, m, ldx, pdx, pdv);
}

}  // namespace

PK_BIND_FAMILY(sparse) {
  m.def("sparse_linear", &sparse_linear, py::arg("x"), py::arg("row_ptr"), py::arg("col"),
        py::arg("values"), py::arg("block"), py::arg("n"), py::arg("bias"), py::arg("y"),
        "y = x @ W.T + bias for a CSR (block 1) or 4x4 BSR (block 4) weight.");
  m.def("sparse_linear_backward", &sparse_linear_backward, py::arg("dy"), py::arg("x"),
        py::arg("row_ptr"), py::arg("col"), py::arg("values"), py::arg("n"), py::arg("dx"),
        py::arg("dvalues"), "dx = dy @ W and the gradient of W's stored values (CSR).");
}
