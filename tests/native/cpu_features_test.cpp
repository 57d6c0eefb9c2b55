// Detection, the cap and the table picker (common/cpu_features.h,
// common/isa_pick.h). Usage: cpu_features_test [EXPECTED_DETECTED_TIER];
// .ci/aarch64 names the tier each emulated CPU must be detected as, and sets
// PYKERNELS_CPU_ISA to check that the cap is read from it.
#include <algorithm>
#include <cstdlib>

#include "common/isa_pick.h"
#include "native_test.h"

namespace {

using pk::Isa;
using pk_test::fail;

// Distinct tables, one per tier, to see which one the picker hands out.
const int kTable[pk::kIsaLevels] = {0, 1, 2, 3};
const int* table0() { return &kTable[0]; }
const int* table1() { return &kTable[1]; }
const int* table3() { return &kTable[3]; }

void check_names() {
  for (int i = 0; i < pk::kIsaLevels; ++i) {
    Isa parsed;
    PK_EXPECT(pk::isa_from_name(pk::isa_name(static_cast<Isa>(i)), &parsed));
    PK_EXPECT(static_cast<int>(parsed) == i);
  }
  Isa parsed;
#ifdef PK_ARM64
  for (const char* other : {"avx2", "avx512", "amx", "AVX2", ""}) {
#else
  for (const char* other : {"neon", "dotprod", "i8mm", "NEON", ""}) {
#endif
    if (pk::isa_from_name(other, &parsed))
      fail("'%s' parsed as a tier of this architecture", other);
  }
  PK_EXPECT(pk::isa_names().size() == size_t(pk::kIsaLevels));
  PK_EXPECT(pk::isa_names()[0] == "portable");
}

void check_cap_from_env() {
  const char* env = std::getenv("PYKERNELS_CPU_ISA");
  Isa want = pk::kIsaTop;  // unset or not a name here: no cap (Python warns)
  if (env && *env) pk::isa_from_name(env, &want);
  if (pk::isa_cap() != want)
    fail("PYKERNELS_CPU_ISA=%s: cap %s, want %s", env ? env : "", pk::isa_name(pk::isa_cap()),
         pk::isa_name(want));
}

void check_active() {
  int top_compiled = 0;
  for (Isa i : pk::compiled_isas()) top_compiled = std::max(top_compiled, static_cast<int>(i));
  PK_EXPECT(top_compiled == pk::kIsaLevels - 1);  // every tier has its flags in this build
  const Isa before = pk::isa_cap();
  for (int c = 0; c < pk::kIsaLevels; ++c) {
    pk::set_isa_cap(static_cast<Isa>(c));
    const int want = std::min({c, static_cast<int>(pk::detected_isa()), top_compiled});
    if (static_cast<int>(pk::active_isa()) != want)
      fail("cap %s: active %s, want level %d", pk::isa_name(static_cast<Isa>(c)),
           pk::isa_name(pk::active_isa()), want);
  }
  pk::set_isa_cap(before);
}

// A family that ships tiers 0, 1 and 3 (none for 2): tier 2 runs tier 1's
// table, and a tier above the CPU never calls its factory.
void check_pick() {
  pk::IsaTables<int> t{.portable = &table0};
#ifdef PK_ARM64
  t.neon = &table1;
  t.i8mm = &table3;
#else
  t.avx2 = &table1;
  t.amx = &table3;  // needs VNNI too: on a CPU without it, tier 3 runs table 1
#endif
  const pk::IsaPick<int> pick(t);
  const Isa before = pk::isa_cap();
  const int cpu = static_cast<int>(pk::detected_isa());
  for (int c = 0; c < pk::kIsaLevels; ++c) {
    pk::set_isa_cap(static_cast<Isa>(c));
    const int level = std::min(c, cpu);
    int want = level >= 1 ? 1 : 0;
#ifdef PK_ARM64
    if (level == 3) want = 3;
#else
    if (level == 3 && pk::has_avx512_vnni()) want = 3;
#endif
    if (*pick() != want) fail("cap level %d (cpu %d): table %d, want %d", c, cpu, *pick(), want);
  }
  pk::set_isa_cap(before);
}

}  // namespace

int main(int argc, char** argv) {
  pk_test::banner("cpu_features_test");
  if (argc > 1 && std::string(pk::isa_name(pk::detected_isa())) != argv[1])
    fail("detected %s, want %s", pk::isa_name(pk::detected_isa()), argv[1]);
  check_names();
  check_cap_from_env();
  check_active();
  check_pick();
  return pk_test::verdict("cpu_features_test");
}
