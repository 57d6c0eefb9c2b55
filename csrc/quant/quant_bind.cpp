// pykernels._C: the quant functions over NumPy buffers (check and forward).
#include "common/bind.h"
#include "quant/quant.h"

namespace {

using namespace pk::bind;  // NOLINT: the buffer checks every binding uses

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

}  // namespace

PK_BIND_FAMILY(quant) {
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
}
