// What every family's pybind11 file shares: checks of NumPy buffers (the
// bindings check and forward only; the public Python API has validated the
// user's arguments already) and the registration of a family's functions
// into pykernels._C, so a new family adds its own *_bind.cpp and edits
// nothing else. Included only by binding files (baseline flags).
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/dtype.h"

namespace pk::bind {

namespace py = pybind11;

using Binder = void (*)(py::module_&);

// Filled by the static registrars of the *_bind.cpp files when _C is loaded,
// before Python calls the module's init function, which runs them all.
inline std::vector<std::pair<std::string, Binder>>& registry() {
  static std::vector<std::pair<std::string, Binder>> r;
  return r;
}

struct Registrar {
  Registrar(const char* family, Binder fn) { registry().emplace_back(family, fn); }
};

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
  // An empty array's strides are arbitrary (NumPy gives (0, 0)).
  if (*rows == 0 || *cols == 0) {
    *ld = *cols;
    if (writable && !a.writeable())
      throw std::invalid_argument(std::string(name) + ": buffer must be writable");
    return static_cast<T*>(writable ? a.mutable_data() : const_cast<void*>(a.data()));
  }
  if (*cols > 1 && a.strides(1) != es)
    throw std::invalid_argument(std::string(name) + ": rows must be contiguous");
  *ld = *rows > 1 ? a.strides(0) / es : *cols;
  if (*rows > 1 && (a.strides(0) % es != 0 || *ld < *cols))
    throw std::invalid_argument(std::string(name) + ": unsupported row stride");
  if (writable && !a.writeable())
    throw std::invalid_argument(std::string(name) + ": buffer must be writable");
  return static_cast<T*>(writable ? a.mutable_data() : const_cast<void*>(a.data()));
}

// A float matrix of element type `code` (DType: fp32, or fp16/bf16 as uint16).
inline void* float_matrix(py::array& a, const char* name, int code, int64_t* rows, int64_t* cols,
                          int64_t* ld, bool writable) {
  if (code == int(pk::DType::f32)) return matrix<float>(a, name, rows, cols, ld, writable);
  if (code == int(pk::DType::f16) || code == int(pk::DType::bf16))
    return matrix<uint16_t>(a, name, rows, cols, ld, writable);
  throw std::invalid_argument(std::string(name) + ": unknown float type code");
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

}  // namespace pk::bind

// PK_BIND_FAMILY(int8) { m.def(...); } in csrc/int8/int8_bind.cpp.
#define PK_BIND_FAMILY(family)                                                               \
  static void pk_bind_##family(pybind11::module_& m);                                        \
  static const ::pk::bind::Registrar pk_bind_registrar_##family(#family, &pk_bind_##family); \
  static void pk_bind_##family(pybind11::module_& m)
