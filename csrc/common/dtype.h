// Element types of float buffers: one numbering for every family, the
// bindings, the C ABI and the Python side, which passes these codes as
// plain ints. fp16 and bf16 travel as their 16-bit patterns (common/half.h
// converts them).
#pragma once
#include <cstdint>

namespace pk {

// f64 holds its code so that no other type can take it; no kernel accepts it
// yet (each entry point checks the types it takes).
enum class DType : int32_t { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };

}  // namespace pk
