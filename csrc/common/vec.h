// GCC vector-extension types of W floats (and W int32), for the kernels
// written once over vector extensions and compiled per ISA file at that
// file's width (attention_generic.h, int8_epilogue.h). GCC ignores
// vector_size on a type that depends on a template parameter, so each width
// is spelled out. Anonymous namespace, as the per-ISA headers that use it.
#pragma once
#include <cstdint>

namespace pk {
namespace {

template <int W>
struct VecTypes;
template <>
struct VecTypes<2> {
  typedef float V __attribute__((vector_size(8)));
  typedef int32_t I __attribute__((vector_size(8)));
};
template <>
struct VecTypes<4> {
  typedef float V __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
};
template <>
struct VecTypes<8> {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
};
template <>
struct VecTypes<16> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
};

}  // namespace
}  // namespace pk
