// pykernels._C: the CPU kernels over NumPy buffers. Bindings check buffer
// shapes, dtypes and layout, then release the GIL and forward; the public
// Python API has already validated the user's arguments.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>

#include "cluster/cluster.h"
#include "common/cpu_features.h"
#include "common/parallel.h"
#include "int8/int8.h"
#include "qat/qat.h"
#include "quant/quant.h"
#include "sparse/sparse.h"
#include "svd/svd.h"
#include "topk/topk.h"

namespace py = pybind11;

namespace {

template <class T>
T* data_of(py::array& a, const char* name, int64_t n, bool writable) {
  if (!py::isinstance<py::array_t<T>>(a))
    throw std::invalid_argument(std::string(name) + ": unexpected buffer dtype");
  if (a.ndim() != 1 || a.shape(0) != n)
    throw std::invalid_argument(std::string(name) + ": expected a 1-D buffer of " +
                                std::to_string(n) + " elements");
  if (!(a.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(name) + ": buffer must be contiguous");
  if (writable && !a.writeable())
    throw std::invalid_argument(std::string(name) + ": buffer must be writable");
  return static_cast<T*>(writable ? a.mutable_data() : const_cast<void*>(a.data()));
}

// data_of for an argument that may be None (then nullptr).
template <class T>
T* optional_data_of(py::object& a, const char* name, int64_t n, bool writable) {
  if (a.is_none()) return nullptr;
  py::array arr = a.cast<py::array>();
  return data_of<T>(arr, name, n, writable);
}

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

// Bucketed stochastic quantization (quant.h): x raw bits (uint32 for f32,
// uint16 for f16/bf16), codes uint8 packed, scales fp32, residual fp32 or None.
void quantize_buckets(py::array x, int dtype, int bits, int64_t bucket, bool stochastic,
                      uint64_t seed, py::object residual, py::array codes, py::array scales) {
  using pk::DType;
  pk::quant::QuantizeArgs a;
  a.dtype = static_cast<DType>(dtype);
  a.n = x.size();
  a.bits = bits;
  a.bucket = bucket;
  a.stochastic = stochastic;
  a.seed = seed;
  if (bits != 8 && bits != 4 && bits != 2) throw std::invalid_argument("bits must be 8, 4 or 2");
  if (bucket < 1) throw std::invalid_argument("bucket must be >= 1");
  if (a.dtype == DType::f32)
    a.x = data_of<uint32_t>(x, "x", a.n, false);
  else
    a.x = data_of<uint16_t>(x, "x", a.n, false);
  a.codes = data_of<uint8_t>(codes, "codes", pk::quant::packed_bytes(a.n, bits), true);
  a.scales = data_of<float>(scales, "scales", pk::quant::num_buckets(a.n, bucket), true);
  a.residual = optional_data_of<float>(residual, "residual", a.n, true);
  py::gil_scoped_release nogil;
  pk::quant::quantize_cpu(a);
}

void dequantize_buckets(py::array codes, py::array scales, int64_t n, int bits, int64_t bucket,
                        py::array out, bool accumulate) {
  pk::quant::DequantizeArgs a;
  a.n = n;
  a.bits = bits;
  a.bucket = bucket;
  a.accumulate = accumulate;
  if (n < 0) throw std::invalid_argument("n must be >= 0");
  if (bits != 8 && bits != 4 && bits != 2) throw std::invalid_argument("bits must be 8, 4 or 2");
  if (bucket < 1) throw std::invalid_argument("bucket must be >= 1");
  a.codes = data_of<uint8_t>(codes, "codes", pk::quant::packed_bytes(n, bits), false);
  a.scales = data_of<float>(scales, "scales", pk::quant::num_buckets(n, bucket), false);
  a.out = data_of<float>(out, "out", n, true);
  py::gil_scoped_release nogil;
  pk::quant::dequantize_cpu(a);
}

void pack_bits(py::array values, int width, py::array out) {
  if (width < 0 || width > 32) throw std::invalid_argument("width must be in [0, 32]");
  const int64_t n = values.size();
  const uint32_t* v = data_of<uint32_t>(values, "values", n, false);
  uint8_t* o = data_of<uint8_t>(out, "out", pk::quant::packed_bytes(n, width), true);
  py::gil_scoped_release nogil;
  pk::quant::pack_bits_cpu(v, n, width, o);
}

void unpack_bits(py::array data, int64_t n, int width, py::array values) {
  if (width < 0 || width > 32) throw std::invalid_argument("width must be in [0, 32]");
  if (n < 0) throw std::invalid_argument("n must be >= 0");
  const uint8_t* d = data_of<uint8_t>(data, "data", pk::quant::packed_bytes(n, width), false);
  uint32_t* v = data_of<uint32_t>(values, "values", n, true);
  py::gil_scoped_release nogil;
  pk::quant::unpack_bits_cpu(d, n, width, v);
}

// A 2-D buffer with unit stride along rows: (pointer, rows, cols, ld).
template <class T>
T* matrix(py::array& a, const char* name, int64_t* rows, int64_t* cols, int64_t* ld,
          bool writable) {
  if (!py::isinstance<py::array_t<T>>(a))
    throw std::invalid_argument(std::string(name) + ": unexpected buffer dtype");
  if (a.ndim() != 2) throw std::invalid_argument(std::string(name) + ": expected a 2-D buffer");
  *rows = a.shape(0);
  *cols = a.shape(1);
  const int64_t es = int64_t(sizeof(T));
  if (*cols > 1 && a.strides(1) != es)
    throw std::invalid_argument(std::string(name) + ": rows must be contiguous");
  *ld = *rows > 1 ? a.strides(0) / es : *cols;
  if (*rows > 1 && (a.strides(0) % es != 0 || *ld < *cols))
    throw std::invalid_argument(std::string(name) + ": unsupported row stride");
  if (writable && !a.writeable())
    throw std::invalid_argument(std::string(name) + ": buffer must be writable");
  return static_cast<T*>(writable ? a.mutable_data() : const_cast<void*>(a.data()));
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

// A float matrix of element type `code` (DType: fp32, or fp16/bf16 as uint16).
void* float_matrix(py::array& a, const char* name, int code, int64_t* rows, int64_t* cols,
                   int64_t* ld, bool writable) {
  if (code == int(pk::DType::f32)) return matrix<float>(a, name, rows, cols, ld, writable);
  if (code == int(pk::DType::f16) || code == int(pk::DType::bf16))
    return matrix<uint16_t>(a, name, rows, cols, ld, writable);
  throw std::invalid_argument(std::string(name) + ": unknown float type code");
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
                 py::object bias, py::array y, int yt, int act_bits) {
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
  py::gil_scoped_release nogil;
  pk::int8::linear_dynamic_cpu(px, pk::DType(xt), m, k, ldx, pp, pc, ps, pb, n, py_, pk::DType(yt),
                               act_bits);
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

// A C-contiguous buffer of `count` elements of T, any shape.
template <class T>
T* contiguous_of(py::array& a, const char* name, int64_t count, bool writable) {
  if (!py::isinstance<py::array_t<T>>(a))
    throw std::invalid_argument(std::string(name) + ": unexpected buffer dtype");
  if (a.size() != count || !(a.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(name) + ": expected a contiguous buffer of " +
                                std::to_string(count) + " elements");
  if (writable && !a.writeable())
    throw std::invalid_argument(std::string(name) + ": buffer must be writable");
  return static_cast<T*>(writable ? a.mutable_data() : const_cast<void*>(a.data()));
}

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

pk::Isa parse_isa(const std::string& name) {
  pk::Isa isa;
  if (!pk::isa_from_name(name, &isa))
    throw std::invalid_argument("cpu isa must be one of portable, avx2, avx512, amx; got '" + name +
                                "'");
  return isa;
}

py::dict cpu_info() {
  py::dict d;
  py::list compiled;
  for (pk::Isa i : pk::compiled_isas()) compiled.append(pk::isa_name(i));
  d["isa_compiled"] = compiled;
  d["isa_detected"] = pk::isa_name(pk::detected_isa());
  d["isa_cap"] = pk::isa_name(pk::isa_cap());
  d["isa_active"] = pk::isa_name(pk::active_isa());
  d["avx512_vnni"] = pk::has_avx512_vnni();
  const pk::AmxState amx = pk::amx_state();
  d["amx_tiles"] = amx == pk::AmxState::granted  ? "granted"
                   : amx == pk::AmxState::denied ? "denied"
                                                 : "absent";
  d["int8_amx_min_rows"] = pk::int8::amx_min_rows();
  d["threads"] = pk::max_threads();
  d["threading"] = pk::threading_name();
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pykernels CPU kernels (torch-free, over NumPy buffers)";
  m.def("topk_sparsify", &topk_sparsify, py::arg("x"), py::arg("dtype"), py::arg("k"),
        py::arg("approx"), py::arg("residual"), py::arg("values"), py::arg("indices"),
        "Top-k by magnitude of the raw bits in x (uint32 for f32, uint16 for f16/bf16).");
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
        py::arg("act_bits") = 8, "Dynamic W8A8 linear over a packed weight.");
  m.def("int8_weight_linear", &int8_weight_linear, py::arg("x"), py::arg("xtype"), py::arg("w"),
        py::arg("w_scale"), py::arg("bias"), py::arg("y"), py::arg("ytype"),
        "Weight-only int8 linear (float activations).");
  m.def("fake_quant_per_row", &fake_quant_per_row, py::arg("x"), py::arg("y"), py::arg("mask"),
        py::arg("scale"), "Fused int8 fake quantization per row with the STE mask (float32).");
  m.def("fake_quant_backward", &fake_quant_backward, py::arg("grad"), py::arg("mask"),
        py::arg("out"), "out = grad where mask, else 0 (1-D buffers).");
  m.def("cluster_linear", &cluster_linear, py::arg("x"), py::arg("codes"), py::arg("codebook"),
        py::arg("bias"), py::arg("bits"), py::arg("dynamic"), py::arg("y"),
        "y = x @ W.T + bias with W read from packed 4/8-bit codes and [N or 1, C] codebooks "
        "(dynamic: int8 activations and codebooks, exact int32 sums).");
  m.def("sparse_linear", &sparse_linear, py::arg("x"), py::arg("row_ptr"), py::arg("col"),
        py::arg("values"), py::arg("block"), py::arg("n"), py::arg("bias"), py::arg("y"),
        "y = x @ W.T + bias for a CSR (block 1) or 4x4 BSR (block 4) weight.");
  m.def("sparse_linear_backward", &sparse_linear_backward, py::arg("dy"), py::arg("x"),
        py::arg("row_ptr"), py::arg("col"), py::arg("values"), py::arg("n"), py::arg("dx"),
        py::arg("dvalues"), "dx = dy @ W and the gradient of W's stored values (CSR).");
  m.def("batched_svd", &batched_svd, py::arg("a"), py::arg("u"), py::arg("s"), py::arg("vh"),
        "One-sided Jacobi SVD of each matrix of a [B, m, n]; returns the sweeps needed.");
  m.def("quantize_buckets", &quantize_buckets, py::arg("x"), py::arg("dtype"), py::arg("bits"),
        py::arg("bucket"), py::arg("stochastic"), py::arg("seed"), py::arg("residual"),
        py::arg("codes"), py::arg("scales"),
        "Bucketed absmax quantization to 8/4/2-bit packed codes (stochastic rounding).");
  m.def("dequantize_buckets", &dequantize_buckets, py::arg("codes"), py::arg("scales"),
        py::arg("n"), py::arg("bits"), py::arg("bucket"), py::arg("out"), py::arg("accumulate"),
        "Unpacks and dequantizes codes into out (fp32), or adds them to it.");
  m.def("pack_bits", &pack_bits, py::arg("values"), py::arg("width"), py::arg("out"),
        "The low `width` bits of each uint32 value, packed little-endian.");
  m.def("unpack_bits", &unpack_bits, py::arg("data"), py::arg("n"), py::arg("width"),
        py::arg("values"), "Inverse of pack_bits.");
  m.def("cpu_info", &cpu_info);
  m.def("set_int8_amx_min_rows", &pk::int8::set_amx_min_rows, py::arg("rows"),
        "Rows below which packed int8 GEMMs use AVX-512 VNNI, not AMX tiles; returns the "
        "previous value (tests set 1 to run every M on tiles).");
  m.def(
      "set_cpu_isa", [](const std::string& name) { pk::set_isa_cap(parse_isa(name)); },
      py::arg("name"), "Caps the ISA the CPU kernels use (as PYKERNELS_CPU_ISA does).");
  m.def("set_num_threads", &pk::set_max_threads, py::arg("n"));
  m.def("get_num_threads", &pk::max_threads);
}
