// pykernels._C: the CPU kernels over NumPy buffers. Bindings check buffer
// shapes, dtypes and layout, then release the GIL and forward; the public
// Python API has already validated the user's arguments.
// Each family registers its own functions (csrc/<family>/<family>_bind.cpp,
// common/bind.h); this file holds what is not a family's: the CPU and thread
// controls.
#include <string>

#include "common/bind.h"
#include "common/cpu_features.h"
#include "common/parallel.h"
#include "int8/int8.h"

namespace py = pybind11;

namespace {

pk::Isa parse_isa(const std::string& name) {
  pk::Isa isa;
  if (!pk::isa_from_name(name, &isa)) {
    std::string names;
    for (const std::string& n : pk::isa_names()) names += (names.empty() ? "" : ", ") + n;
    throw std::invalid_argument("cpu isa must be one of " + names + "; got '" + name + "'");
  }
  return isa;
}

py::dict cpu_info() {
  py::dict d;
  py::list compiled;
  for (pk::Isa i : pk::compiled_isas()) compiled.append(pk::isa_name(i));
  d["isa_compiled"] = compiled;
  // Every tier of this architecture, in order: Python's names for the cap.
  py::list names;
  for (const std::string& n : pk::isa_names()) names.append(n);
  d["isa_names"] = names;
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
  // Sorted: the registrars run in link order, which is not ours to fix.
  auto families = pk::bind::registry();
  std::sort(families.begin(), families.end());
  for (const auto& [family, bind] : families) bind(m);
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
