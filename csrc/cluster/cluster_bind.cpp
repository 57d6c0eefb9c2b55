// pykernels._C: the cluster functions over NumPy buffers (check and forward).
#include "cluster/cluster.h"
#include "common/bind.h"

namespace {

using namespace pk::bind;  // NOLINT: the buffer checks every binding uses

void cluster_linear(py::array x, py::array codes, py::array codebook, py::object bias, int bits,
                    bool dynamic, py::array y) {
  if (bits != 4 && bits != 8) throw std::invalid_argument("bits must be 4 or 8");
  int64_t m, k, ldx, n, cb, ldc, cbr, nc, ldcb, ym, yn, ldy;
  const float* px = matrix<float>(x, "x", &m, &k, &ldx, false);
  const uint8_t* pc = matrix<uint8_t>(codes, "codes", &n, &cb, &ldc, false);
  const float* pcb = matrix<float>(codebook, "codebook", &cbr, &nc, &ldcb, false);
  float* py_ = matrix<float>(y, "y", &ym, &yn, &ldy, true);
  if (cb != pk::cluster::code_row_bytes(k, bits) || ldc != cb)
    throw std::invalid_argument("codes: expected a contiguous [N, " +
                                std::to_string(pk::cluster::code_row_bytes(k, bits)) +
                                "] buffer for K = " + std::to_string(k));
  if ((cbr != n && cbr != 1) || ldcb != nc)
    throw std::invalid_argument("codebook: expected a contiguous [N, C] or [1, C] buffer");
  if (nc < 1 || nc > (bits == 4 ? pk::cluster::kMaxClusters4 : pk::cluster::kMaxClusters))
    throw std::invalid_argument("codebook: too many entries for " + std::to_string(bits) +
                                "-bit codes");
  if (ym != m || yn != n || ldy != n)
    throw std::invalid_argument("y: expected a contiguous [M, N] buffer");
  const float* pb = optional_data_of<float>(bias, "bias", n, false);
  const bool per_row = cbr == n;  // with N = 1 both readings are the same
  py::gil_scoped_release nogil;
  pk::cluster::linear_cpu(px, m, k, ldx, pc, bits, pcb, nc, per_row, pb, n, py_, dynamic);
}

}  // namespace

PK_BIND_FAMILY(cluster) {
  m.def("cluster_linear", &cluster_linear, py::arg("x"), py::arg("codes"), py::arg("codebook"),
        py::arg("bias"), py::arg("bits"), py::arg("dynamic"), py::arg("y"),
        "y = x @ W.T + bias with W read from packed 4/8-bit codes and [N or 1, C] codebooks "
        "(dynamic: int8 activations and codebooks, exact int32 sums).");
}
