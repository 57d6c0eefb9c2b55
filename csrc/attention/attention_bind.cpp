// pykernels._C: the attention functions over NumPy buffers (check and forward).
#include "attention/attention.h"
#include "common/bind.h"

namespace {

using namespace pk::bind;  // NOLINT: the buffer checks every binding uses

// A float32 [B, H, S, D] buffer with unit stride along D (or D <= 1) and
// non-negative strides; checks its sizes against `shape` (-1: any) and
// returns the element strides of the first three dimensions.
const float* view4(py::array& a, const char* name, int64_t* shape, pk::attention::View* v,
                   bool writable) {
  if (!py::isinstance<py::array_t<float>>(a))
    throw std::invalid_argument(std::string(name) + ": expected float32");
  if (a.ndim() != 4) throw std::invalid_argument(std::string(name) + ": expected 4 dimensions");
  int64_t st[4];
  for (int i = 0; i < 4; ++i) {
    if (shape[i] >= 0 && a.shape(i) != shape[i])
      throw std::invalid_argument(std::string(name) + ": size " + std::to_string(a.shape(i)) +
                                  " of dimension " + std::to_string(i) + ", expected " +
                                  std::to_string(shape[i]));
    shape[i] = a.shape(i);
    if (a.strides(i) < 0 || a.strides(i) % int64_t(sizeof(float)) != 0)
      throw std::invalid_argument(std::string(name) + ": unsupported strides");
    st[i] = a.strides(i) / int64_t(sizeof(float));
  }
  // An empty array's strides are arbitrary (NumPy gives zeros): nothing is read.
  if (a.size() > 0 && shape[3] > 1 && st[3] != 1)
    throw std::invalid_argument(std::string(name) + ": the last dimension must be contiguous");
  if (writable && !a.writeable())
    throw std::invalid_argument(std::string(name) + ": buffer must be writable");
  *v = {st[0], st[1], st[2]};
  return static_cast<const float*>(a.data());
}

void attention_f32(py::array q, py::array k, py::array v, py::array out, py::object kv_len,
                   py::object q_len, py::object mask, bool causal, double scale) {
  pk::attention::Problem p;
  int64_t qs[4] = {-1, -1, -1, -1};
  p.q = view4(q, "q", qs, &p.qv, false);
  int64_t ks[4] = {qs[0], qs[1], -1, qs[3]};
  p.k = view4(k, "k", ks, &p.kv, false);
  int64_t vs[4] = {qs[0], qs[1], ks[2], -1};
  p.v = view4(v, "v", vs, &p.vv, false);
  int64_t os[4] = {qs[0], qs[1], qs[2], vs[3]};
  p.out = const_cast<float*>(view4(out, "out", os, &p.ov, true));
  p.batch = qs[0];
  p.heads = qs[1];
  p.sq = qs[2];
  p.sk = ks[2];
  p.d = qs[3];
  p.dv = vs[3];
  p.kv_len = optional_data_of<int64_t>(kv_len, "kv_len", p.batch, false);
  p.q_len = optional_data_of<int64_t>(q_len, "q_len", p.batch, false);
  if (!mask.is_none()) {
    py::array m = mask.cast<py::array>();
    int64_t ms[4] = {qs[0], qs[1], qs[2], ks[2]};
    p.mask = view4(m, "mask", ms, &p.mv, false);
  }
  p.causal = causal;
  p.scale = float(scale);
  py::gil_scoped_release nogil;
  pk::attention::attention_f32_cpu(p);
}

}  // namespace

PK_BIND_FAMILY(attention) {
  m.def("attention_f32", &attention_f32, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("kv_len"), py::arg("q_len"), py::arg("mask"), py::arg("causal"), py::arg("scale"),
        "out = softmax(q k^T * scale + mask) v over float32 [B, H, S, D] views; kv_len and "
        "q_len (int64 [B] or None) leave padded keys out and zero padded query rows.");
}
