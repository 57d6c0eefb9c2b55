// pykernels._C: the CPU kernels over NumPy buffers. Bindings check buffer
// shapes, dtypes and layout, then release the GIL and forward; the public
// Python API has already validated the user's arguments.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "common/cpu_features.h"
#include "common/parallel.h"
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

void topk_sparsify(py::array x, int dtype, int64_t k, bool approx, py::object residual,
                   py::array values, py::array indices) {
  using pk::topk::DType;
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
  if (!residual.is_none()) {
    py::array r = residual.cast<py::array>();
    a.residual = data_of<float>(r, "residual", a.n, true);
  }
  py::gil_scoped_release nogil;
  pk::topk::sparsify_cpu(a);
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
  d["threads"] = pk::max_threads();
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pykernels CPU kernels (torch-free, over NumPy buffers)";
  m.def("topk_sparsify", &topk_sparsify, py::arg("x"), py::arg("dtype"), py::arg("k"),
        py::arg("approx"), py::arg("residual"), py::arg("values"), py::arg("indices"),
        "Top-k by magnitude of the raw bits in x (uint32 for f32, uint16 for f16/bf16).");
  m.def("cpu_info", &cpu_info);
  m.def(
      "set_cpu_isa", [](const std::string& name) { pk::set_isa_cap(parse_isa(name)); },
      py::arg("name"), "Caps the ISA the CPU kernels use (as PYKERNELS_CPU_ISA does).");
  m.def("set_num_threads", &pk::set_max_threads, py::arg("n"));
  m.def("get_num_threads", &pk::max_threads);
}
