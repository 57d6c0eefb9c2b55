// pykernels._C: the int8 functions over NumPy buffers (check and forward).
#include "common/bind.h"
#include "int8/int8.h"

namespace {

using namespace pk::bind;  // NOLINT: the buffer checks every binding uses

pk::int8::Act act_of(int activation) {
  if (activation < 0 || activation > int(pk::int8::Act::silu))
    throw std::invalid_argument("activation: code " + std::to_string(activation) +
                                " is not one of 0..4");
  return pk::int8::Act(activation);
}

// The fused epilogue of an M x N output: an activation code, an optional
// fp32 [M, N] residual, and the row norm (code, fp32 [N] gamma and beta or
// None, eps).
pk::int8::Epilogue epilogue_of(int activation, py::object& residual, int64_t m, int64_t n,
                               int norm = 0, py::object gamma = py::none(),
                               py::object beta = py::none(), float eps = 1e-5f) {
  pk::int8::Epilogue ep;
  ep.act = act_of(activation);
  if (!residual.is_none()) {
    py::array r = residual.cast<py::array>();
    int64_t rm, rn;
    ep.residual = matrix<float>(r, "residual", &rm, &rn, &ep.ldr, false);
    if (rm != m || rn != n) throw std::invalid_argument("residual: expected shape [M, N]");
  }
  if (norm < 0 || norm > int(pk::int8::Norm::rms))
    throw std::invalid_argument("norm: code " + std::to_string(norm) + " is not one of 0..2");
  ep.norm = pk::int8::Norm(norm);
  ep.gamma = optional_data_of<float>(gamma, "norm_weight", n, false);
  ep.beta = optional_data_of<float>(beta, "norm_bias", n, false);
  ep.eps = eps;
  return ep;
}

void quantize_per_row(py::array x, py::array q, py::array scale, int bits) {
  if (bits != 8 && bits != 7) throw std::invalid_argument("bits must be 8 or 7");
  int64_t r, c, ld, qr, qc, qld;
  const float* px = matrix<float>(x, "x", &r, &c, &ld, false);
  int8_t* pq = matrix<int8_t>(q, "q", &qr, &qc, &qld, true);
  if (qr != r || qc != c || qld != c)
    throw std::invalid_argument("q: expected a contiguous buffer of x's shape");
  float* ps = data_of<float>(scale, "scale", r, true);
  py::gil_scoped_release nogil;
  if (bits == 7)
    pk::int8::quantize_per_row7_cpu(px, r, c, ld, pq, ps);
  else
    pk::int8::quantize_per_row_cpu(px, r, c, ld, pq, ps);
}

void int8_gemm(py::array a, py::array b, py::array c) {
  int64_t m, k, lda, n, kb, ldb, cm, cn, ldc;
  const int8_t* pa = matrix<int8_t>(a, "a", &m, &k, &lda, false);
  const int8_t* pb = matrix<int8_t>(b, "b", &n, &kb, &ldb, false);
  int32_t* pc = matrix<int32_t>(c, "c", &cm, &cn, &ldc, true);
  if (kb != k) throw std::invalid_argument("b: K differs from a's");
  if (cm != m || cn != n) throw std::invalid_argument("c: expected shape [M, N]");
  py::gil_scoped_release nogil;
  pk::int8::gemm_s8s8s32_cpu(pa, pb, pc, m, n, k, lda, ldb, ldc);
}

void int8_pack_weight(py::array w, py::array packed, py::array comp) {
  int64_t n, k, ldw;
  const int8_t* pw = matrix<int8_t>(w, "w", &n, &k, &ldw, false);
  int8_t* pp =
      data_of<int8_t>(packed, "packed", pk::int8::packed_n(n) * pk::int8::packed_k(k), true);
  int32_t* pc = data_of<int32_t>(comp, "comp", pk::int8::packed_n(n), true);
  py::gil_scoped_release nogil;
  pk::int8::pack_weight_cpu(pw, n, k, ldw, pp, pc);
}

void int8_linear(py::array x, int xt, py::array packed, py::array comp, py::array w_scale,
                 py::object bias, py::array y, int yt, int act_bits, int activation,
                 py::object residual, int norm, py::object norm_weight, py::object norm_bias,
                 float eps) {
  if (act_bits != 8 && act_bits != 7) throw std::invalid_argument("act_bits must be 8 or 7");
  int64_t m, k, ldx, ym, n, ldy;
  const void* px = float_matrix(x, "x", xt, &m, &k, &ldx, false);
  void* py_ = float_matrix(y, "y", yt, &ym, &n, &ldy, true);
  if (ym != m || ldy != n) throw std::invalid_argument("y: expected a contiguous [M, N] buffer");
  const int8_t* pp =
      data_of<int8_t>(packed, "packed", pk::int8::packed_n(n) * pk::int8::packed_k(k), false);
  const int32_t* pc = data_of<int32_t>(comp, "comp", pk::int8::packed_n(n), false);
  const float* ps = data_of<float>(w_scale, "w_scale", n, false);
  const float* pb = optional_data_of<float>(bias, "bias", n, false);
  const pk::int8::Epilogue ep =
      epilogue_of(activation, residual, m, n, norm, norm_weight, norm_bias, eps);
  py::gil_scoped_release nogil;
  pk::int8::linear_dynamic_cpu(px, pk::DType(xt), m, k, ldx, pp, pc, ps, pb, n, py_, pk::DType(yt),
                               act_bits, ep);
}

void int8_linear_gated(py::array x, int xt, py::array packed, py::array comp, py::array w_scale,
                       py::object bias, py::array out, int act_bits, int activation) {
  if (act_bits != 8 && act_bits != 7) throw std::invalid_argument("act_bits must be 8 or 7");
  int64_t m, k, ldx, om, n, ldo;
  const void* px = float_matrix(x, "x", xt, &m, &k, &ldx, false);
  float* po = matrix<float>(out, "out", &om, &n, &ldo, true);
  if (om != m) throw std::invalid_argument("out: expected [M, N] rows");
  const int64_t n2 = pk::int8::gated_rows(n);
  const int8_t* pp =
      data_of<int8_t>(packed, "packed", pk::int8::packed_n(n2) * pk::int8::packed_k(k), false);
  const int32_t* pc = data_of<int32_t>(comp, "comp", pk::int8::packed_n(n2), false);
  const float* ps = data_of<float>(w_scale, "w_scale", n2, false);
  const float* pb = optional_data_of<float>(bias, "bias", n2, false);
  const pk::int8::Act act = act_of(activation);
  py::gil_scoped_release nogil;
  pk::int8::linear_dynamic_gated_cpu(px, pk::DType(xt), m, k, ldx, pp, pc, ps, pb, n, act, po, ldo,
                                     act_bits);
}

void int8_linear_q8out(py::array x, int xt, py::array packed, py::array comp, py::array w_scale,
                       py::object bias, int act_bits, int activation, py::array q,
                       py::array q_scale) {
  if (act_bits != 8 && act_bits != 7) throw std::invalid_argument("act_bits must be 8 or 7");
  int64_t m, k, ldx, qm, n, ldq;
  const void* px = float_matrix(x, "x", xt, &m, &k, &ldx, false);
  int8_t* pq = matrix<int8_t>(q, "q", &qm, &n, &ldq, true);
  if (qm != m || ldq != n) throw std::invalid_argument("q: expected a contiguous [M, N] buffer");
  const int8_t* pp =
      data_of<int8_t>(packed, "packed", pk::int8::packed_n(n) * pk::int8::packed_k(k), false);
  const int32_t* pc = data_of<int32_t>(comp, "comp", pk::int8::packed_n(n), false);
  const float* ps = data_of<float>(w_scale, "w_scale", n, false);
  const float* pb = optional_data_of<float>(bias, "bias", n, false);
  float* pqs = data_of<float>(q_scale, "q_scale", m, true);
  const pk::int8::Act act = act_of(activation);
  py::gil_scoped_release nogil;
  pk::int8::linear_dynamic_q8out_cpu(px, pk::DType(xt), m, k, ldx, pp, pc, ps, pb, n, act, pq, pqs,
                                     act_bits);
}

void int8_linear_prequantized(py::array q, py::array x_scale, py::array packed, py::array comp,
                              py::array w_scale, py::object bias, py::array y, int yt,
                              int activation, py::object residual) {
  int64_t m, k, ldq, ym, n, ldy;
  const int8_t* pq = matrix<int8_t>(q, "q", &m, &k, &ldq, false);
  void* py_ = float_matrix(y, "y", yt, &ym, &n, &ldy, true);
  if (ym != m || ldy != n) throw std::invalid_argument("y: expected a contiguous [M, N] buffer");
  const float* pxs = data_of<float>(x_scale, "x_scale", m, false);
  const int8_t* pp =
      data_of<int8_t>(packed, "packed", pk::int8::packed_n(n) * pk::int8::packed_k(k), false);
  const int32_t* pc = data_of<int32_t>(comp, "comp", pk::int8::packed_n(n), false);
  const float* ps = data_of<float>(w_scale, "w_scale", n, false);
  const float* pb = optional_data_of<float>(bias, "bias", n, false);
  const pk::int8::Epilogue ep = epilogue_of(activation, residual, m, n);
  py::gil_scoped_release nogil;
  pk::int8::linear_prequantized_cpu(pq, pxs, m, k, ldq, pp, pc, ps, pb, n, py_, pk::DType(yt), ep);
}

void int8_weight_linear(py::array x, int xt, py::array w, py::array w_scale, py::object bias,
                        py::array y, int yt) {
  int64_t m, k, ldx, n, kw, ldw, ym, yn, ldy;
  const void* px = float_matrix(x, "x", xt, &m, &k, &ldx, false);
  const int8_t* pw = matrix<int8_t>(w, "w", &n, &kw, &ldw, false);
  void* py_ = float_matrix(y, "y", yt, &ym, &yn, &ldy, true);
  if (kw != k || ldw != k) throw std::invalid_argument("w: expected a contiguous [N, K] buffer");
  if (ym != m || yn != n || ldy != n)
    throw std::invalid_argument("y: expected a contiguous [M, N] buffer");
  const float* ps = data_of<float>(w_scale, "w_scale", n, false);
  const float* pb = optional_data_of<float>(bias, "bias", n, false);
  py::gil_scoped_release nogil;
  pk::int8::linear_weight_only_cpu(px, pk::DType(xt), m, k, ldx, pw, ps, pb, n, py_, pk::DType(yt));
}

}  // namespace

PK_BIND_FAMILY(int8) {
  m.def("quantize_per_row", &quantize_per_row, py::arg("x"), py::arg("q"), py::arg("scale"),
        py::arg("bits") = 8,
        "Per-row int8 quantization of a float32 [rows, cols] buffer: symmetric (bits 8) or "
        "the 7-bit grid (bits 7).");
  m.def("int8_gemm", &int8_gemm, py::arg("a"), py::arg("b"), py::arg("c"),
        "c[M, N] = a[M, K] @ b[N, K].T in int32, exact.");
  m.def("int8_pack_weight", &int8_pack_weight, py::arg("w"), py::arg("packed"), py::arg("comp"),
        "Packs an int8 [N, K] weight into the k4n16 layout and its compensation.");
  m.def("int8_linear", &int8_linear, py::arg("x"), py::arg("xtype"), py::arg("packed"),
        py::arg("comp"), py::arg("w_scale"), py::arg("bias"), py::arg("y"), py::arg("ytype"),
        py::arg("act_bits") = 8, py::arg("activation") = 0, py::arg("residual") = py::none(),
        py::arg("norm") = 0, py::arg("norm_weight") = py::none(), py::arg("norm_bias") = py::none(),
        py::arg("eps") = 1e-5f,
        "Dynamic W8A8 linear over a packed weight, with the fused epilogue y = norm(act(y) + "
        "residual) (activation codes 0 none, 1 relu, 2 gelu, 3 gelu_tanh, 4 silu; norm codes "
        "0 none, 1 LayerNorm, 2 RMSNorm; fp32 y).");
  m.def("int8_linear_gated", &int8_linear_gated, py::arg("x"), py::arg("xtype"), py::arg("packed"),
        py::arg("comp"), py::arg("w_scale"), py::arg("bias"), py::arg("out"),
        py::arg("act_bits") = 8, py::arg("activation") = 4,
        "Gated dynamic W8A8 linear: out = act(x W_g^T + b_g) * (x W_u^T + b_u) over a weight "
        "packed with gate and up rows interleaved in blocks of 32 (fp32 out [M, N]).");
  m.def("int8_linear_q8out", &int8_linear_q8out, py::arg("x"), py::arg("xtype"), py::arg("packed"),
        py::arg("comp"), py::arg("w_scale"), py::arg("bias"), py::arg("act_bits"),
        py::arg("activation"), py::arg("q"), py::arg("q_scale"),
        "Dynamic W8A8 linear + activation whose output is quantized per row (int8 q [M, N], "
        "q_scale [M]) and never stored in float.");
  m.def("int8_linear_prequantized", &int8_linear_prequantized, py::arg("q"), py::arg("x_scale"),
        py::arg("packed"), py::arg("comp"), py::arg("w_scale"), py::arg("bias"), py::arg("y"),
        py::arg("ytype"), py::arg("activation") = 0, py::arg("residual") = py::none(),
        "Dynamic W8A8 linear of activations already quantized per row (q in [-127, 127]).");
  m.def("int8_weight_linear", &int8_weight_linear, py::arg("x"), py::arg("xtype"), py::arg("w"),
        py::arg("w_scale"), py::arg("bias"), py::arg("y"), py::arg("ytype"),
        "Weight-only int8 linear (float activations).");
}
