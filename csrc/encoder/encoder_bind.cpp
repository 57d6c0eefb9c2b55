// pykernels._C: the encoder layer over NumPy buffers (check and forward).
#include "common/bind.h"
#include "encoder/encoder.h"
#include "int8/int8.h"

namespace {

using namespace pk::bind;  // NOLINT: the buffer checks every binding uses

// (packed, comp, scale, bias or None, n, k): one projection's buffers.
pk::encoder::Linear linear_of(py::tuple t, const char* name) {
  if (t.size() != 6)
    throw std::invalid_argument(std::string(name) + ": expected (packed, comp, scale, bias, n, k)");
  pk::encoder::Linear l;
  l.n = t[4].cast<int64_t>();
  l.k = t[5].cast<int64_t>();
  if (l.n <= 0 || l.k <= 0) throw std::invalid_argument(std::string(name) + ": empty weight");
  py::array packed = t[0].cast<py::array>(), comp = t[1].cast<py::array>(),
            scale = t[2].cast<py::array>();
  py::object bias = t[3];
  l.packed =
      data_of<int8_t>(packed, name, pk::int8::packed_n(l.n) * pk::int8::packed_k(l.k), false);
  l.comp = data_of<int32_t>(comp, name, pk::int8::packed_n(l.n), false);
  l.scale = data_of<float>(scale, name, l.n, false);
  l.bias = optional_data_of<float>(bias, name, l.n, false);
  return l;
}

void encoder_post_norm(py::array x, py::array y, int64_t batch, int64_t seq, py::object kv_len,
                       py::tuple qkv, py::tuple out, py::tuple ffn1, py::tuple ffn2,
                       py::object norm1_w, py::object norm1_b, float eps1, py::object norm2_w,
                       py::object norm2_b, float eps2, int64_t heads, int act, int act_bits) {
  if (act < 0 || act > int(pk::int8::Act::silu))
    throw std::invalid_argument("act: code " + std::to_string(act) + " is not one of 0..4");
  if (act_bits != 8 && act_bits != 7) throw std::invalid_argument("act_bits must be 8 or 7");
  pk::encoder::PostNormBlock b;
  b.qkv = linear_of(qkv, "qkv");
  b.out = linear_of(out, "out");
  b.ffn1 = linear_of(ffn1, "ffn1");
  b.ffn2 = linear_of(ffn2, "ffn2");
  const int64_t hidden = b.qkv.k;
  b.norm1_w = optional_data_of<float>(norm1_w, "norm1_w", hidden, false);
  b.norm1_b = optional_data_of<float>(norm1_b, "norm1_b", hidden, false);
  b.norm2_w = optional_data_of<float>(norm2_w, "norm2_w", hidden, false);
  b.norm2_b = optional_data_of<float>(norm2_b, "norm2_b", hidden, false);
  b.eps1 = eps1;
  b.eps2 = eps2;
  b.heads = heads;
  b.act = act;
  b.act_bits = act_bits;
  int64_t xm, xh, ldx, ym, yh, ldy;
  const float* px = matrix<float>(x, "x", &xm, &xh, &ldx, false);
  float* py_ = matrix<float>(y, "y", &ym, &yh, &ldy, true);
  if (xh != hidden || ldx != hidden || ym != xm || yh != hidden || ldy != hidden)
    throw std::invalid_argument("x, y: expected contiguous [batch * seq, hidden] buffers");
  if (batch < 0 || seq < 0 || batch * seq != xm)
    throw std::invalid_argument("x: rows are not batch * seq");
  const int64_t* pl = optional_data_of<int64_t>(kv_len, "kv_len", batch, false);
  py::gil_scoped_release nogil;
  pk::encoder::post_norm_block_cpu(b, px, batch, seq, pl, py_);
}

}  // namespace

PK_BIND_FAMILY(encoder) {
  m.def("encoder_post_norm", &encoder_post_norm, py::arg("x"), py::arg("y"), py::arg("batch"),
        py::arg("seq"), py::arg("kv_len"), py::arg("qkv"), py::arg("out"), py::arg("ffn1"),
        py::arg("ffn2"), py::arg("norm1_w"), py::arg("norm1_b"), py::arg("eps1"),
        py::arg("norm2_w"), py::arg("norm2_b"), py::arg("eps2"), py::arg("heads"), py::arg("act"),
        py::arg("act_bits"),
        "A post-norm int8 encoder layer in one call: y = LN2(h + ffn2(act(ffn1(h)))), h = "
        "LN1(x + out(attention(qkv(x)))); x, y float32 [batch * seq, hidden].");
}
