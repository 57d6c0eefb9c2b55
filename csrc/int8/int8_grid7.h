// The 7-bit activation grid (definition in int8.h), shared by the driver and
// every ISA file so that all of them round alike. Internal linkage: each file
// compiles its own copy with its own flags.
#pragma once
#include <cstdint>

namespace pk {
namespace int8 {
namespace {

// The 7-bit grid of a row from lo = min(row, 0), hi = max(row, 0) and
// whether it held NaN (definition in int8.h). Every 7-bit quantizer, scalar
// or vector, takes its scale and zero point from here.
struct Grid7 {
  float scale;
  int32_t zp;
  bool usable;  // scale is positive and finite: the row is quantized
};

inline Grid7 grid7(float lo, float hi, bool nan) {
  Grid7 g;
  g.scale = nan ? __builtin_nanf("") : hi / 127.0f - lo / 127.0f;
  g.usable = g.scale > 0.0f && g.scale <= 3.4028234663852886e38f;
  g.zp = 0;
  if (g.usable) {
    const float z = __builtin_nearbyintf(-lo / g.scale);
    g.zp = z < 0.0f ? 0 : (z > 127.0f ? 127 : int32_t(z));
  }
  return g;
}

// q of one element on a usable grid, in [-zp, 127 - zp].
inline int32_t q7(float v, const Grid7& g) {
  float r = __builtin_nearbyintf(v / g.scale);
  const float lo = float(-g.zp), hi = float(127 - g.zp);
  r = r < lo ? lo : (r > hi ? hi : r);
  return int32_t(r);
}

}  // namespace
}  // namespace int8
}  // namespace pk
