// Per-thread scratch buffers for the CPU drivers.
#pragma once
#include <cstdint>
#include <vector>

namespace pk {

// Slot `slot` of this thread's scratch for T: it lives as long as the thread
// and only grows. Fresh multi-megabyte allocations cost page faults on every
// call (a 16 MiB buffer, first touched, costs more than packing into it).
// One op call per thread runs at a time and none calls another, so the
// families share the slots. Drivers only: never include this in a per-ISA file.
template <class T>
T* scratch(int slot, int64_t count) {
  static thread_local std::vector<T> bufs[4];
  std::vector<T>& v = bufs[slot];
  if (int64_t(v.size()) < count) v.resize(static_cast<size_t>(count));
  return v.data();
}

}  // namespace pk
