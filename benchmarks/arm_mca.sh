#!/usr/bin/env bash
# Static estimates (llvm-mca) of the int8 packed-GEMM inner loops on Arm, for
# benchmarks/RESULTS.md ("Arm tiers"): no Arm hardware ran them. Each kernel file is
# compiled to assembly as the aarch64 build compiles it (its tier's -march
# from CMakeLists.txt, at -O2), the innermost loop of the named tile function
# holding the most of its multiply instruction is cut out (label to backward
# branch, the loop's own add/compare/branch included), and llvm-mca runs it
# for 1000 iterations on the named CPU model. Printed: a markdown table of
# cycles per 64 MACs, the multiply-bound ideal from the model's own
# throughput for that instruction, and the ratio to the portable loop.
#
# Caveat, plainly: LLVM 14 knows the names neoverse-n1, neoverse-n2 and
# neoverse-v1 but schedules all three with its Cortex-A57 model (3-wide
# dispatch, one load pipe, two vector pipes, SDOT and SMMLA 2 per cycle).
# The numbers are that model's, not those cores'.
#
# Usage (from anywhere): benchmarks/arm_mca.sh [ITERATIONS]
# Needs aarch64-linux-gnu-g++ (GCC 12 here), llvm-mca and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
CXX=${CXX_AARCH64:-aarch64-linux-gnu-g++}
MCA=${LLVM_MCA:-llvm-mca}
iters=${1:-1000}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cxx() {  # cxx FILE OUT FLAGS...
  local src=$1 out=$2
  shift 2
  "$CXX" -std=c++20 -O2 -fopenmp-simd -Icsrc "$@" -S "$src" -o "$out"
}
cxx csrc/int8/int8_portable.cpp "$work/portable.s" -march=armv8-a
cxx csrc/int8/int8_portable.cpp "$work/portable_n1.s" -mcpu=neoverse-n1
cxx csrc/int8/int8_neon.cpp "$work/neon.s" -march=armv8-a
cxx csrc/int8/int8_dotprod.cpp "$work/dotprod.s" -march=armv8.2-a+dotprod
cxx csrc/int8/int8_i8mm.cpp "$work/i8mm.s" -march=armv8.2-a+dotprod+i8mm

# extract ASM FUNCTION_SUBSTRING MNEMONIC OUT: the innermost loop of the
# function with the most MNEMONIC instructions, written to OUT.
extract() {
  python3 - "$@" <<'PY'
import re, sys
asm, func, key, out = sys.argv[1:5]
lines = open(asm).read().splitlines()
start = next(i for i, l in enumerate(lines) if re.match(r"^_Z\w*" + re.escape(func) + r"\w*:$", l))
end = next(i for i in range(start, len(lines)) if lines[i].strip().startswith(".size"))
labels, loops = {}, []
for i in range(start, end):
    m = re.match(r"^(\.L\w+):", lines[i])
    if m:
        labels[m.group(1)] = i
    m = re.match(r"^\s+(b\.?[a-z]*|cbn?z|tbn?z)\s+.*?(\.L\w+)\s*$", lines[i])
    if m and m.group(2) in labels:  # a backward branch: a loop
        loops.append((labels[m.group(2)], i))
inner = [(s, e) for s, e in loops if not any(s < s2 and e2 < e for s2, e2 in loops)]
count = lambda se: sum(1 for l in lines[se[0]:se[1] + 1] if l.startswith("\t") and l.split()[0] == key)
best = max(inner, key=count)
body = [l for l in lines[best[0]:best[1] + 1] if not re.match(r"^\s+\.(loc|cfi|p2align)", l)]
open(out, "w").write("\n".join(body) + "\n")
PY
}

# row NAME ASM FUNCTION MNEMONIC MACS_RULE CPU [BASE]: one table row.
# MACS_RULE: mnemonic:MACs pairs, what one instruction of the loop
# contributes; the ideal is those with MACs > 1 issued at the model's
# throughput for each, alone. BASE: this row's cycles per 64 MACs become the
# portable reference the later rows are compared with.
portable_cpm=""
row() {
  local name=$1 asm=$2 func=$3 key=$4 rule=$5 cpu=$6 base=${7:-}
  extract "$work/$asm" "$func" "$key" "$work/loop.s"
  "$MCA" -mtriple=aarch64 -mcpu="$cpu" -iterations="$iters" "$work/loop.s" >"$work/mca.txt" 2>&1 || {
    cat "$work/mca.txt"
    exit 1
  }
  python3 - "$work/loop.s" "$work/mca.txt" "$name" "$key" "$rule" "$cpu" "$iters" "$portable_cpm" <<'PY' >>"$work/table.md"
import re, sys
loop, mca, name, key, rule, cpu, iters, base = sys.argv[1:9]
ins = [l.split()[0] for l in open(loop) if l.startswith("\t")]
macs = sum(int(w) * ins.count(m) for m, w in (p.split(":") for p in rule.split(",")))
txt = open(mca).read()
cycles = int(re.search(r"Total Cycles:\s+(\d+)", txt).group(1)) / int(iters)
# Each multiply instruction's reciprocal throughput in this model.
def rt(m):
    return next(float(x.group(1)) for x in re.finditer(
        r"^\s*\d+\s+\d+\s+([\d.]+)\s.*\s" + m + r"\s", txt, re.M))
cpm = 64 * cycles / macs
mults = [m for m, w in (p.split(":") for p in rule.split(",")) if int(w) > 1 and m != "ldrb"]
ideal = 64 * sum(ins.count(m) * rt(m) for m in mults) / macs if mults else None
vs = f"{float(base) / cpm:.1f}x" if base else "-"
mix = ", ".join(f"{ins.count(m)} {m}" for m in dict.fromkeys(
    [key, "smull", "smlal", "smull2", "smlal2", "sadalp", "ld4", "ldrb", "ldr", "ldp"]) if ins.count(m))
print(f"| {name} | {cpu} | {len(ins)} ({mix}) | {macs} | {cycles:.2f} | {cpm:.2f} | "
      + (f"{ideal:.2f} | {cpm / ideal:.2f}" if ideal else "- | -") + f" | {vs} |")
PY
  if [ -n "$base" ]; then
    portable_cpm=$(tail -1 "$work/table.md" | awk -F'|' '{gsub(/ /, "", $7); print $7}')
  fi
}

cat >"$work/table.md" <<'HDR'
| loop (tile) | llvm-mca -mcpu | instructions per iteration | MACs per iteration | cycles per iteration | cycles per 64 MACs | multiply-bound ideal | ratio to ideal | fewer cycles per MAC than portable (-mcpu=neoverse-n1) |
|---|---|---|---|---|---|---|---|---|
HDR
# The portable loop first, as shipped (armv8-a) and built for the model's
# CPU, which the others are compared with. Its MACs: each activation byte
# (LDRB) meets the 16 channels of a packed group.
row "portable (armv8-a build)" portable.s gemm_packed_generic mul mul:0,ldrb:16 neoverse-n1
row "portable built -mcpu=neoverse-n1" portable_n1.s gemm_packed_generic mul mul:0,ldrb:16 \
  neoverse-n1 base
row "neon 1x16 (SMULL/SMLAL/SADALP)" neon.s packed_tile smull smull:8,smull2:8,smlal:8,smlal2:8 neoverse-n1
row "dotprod 4x16 (SDOT)" dotprod.s sdot_tileILi4ELi1E sdot sdot:16 neoverse-n1
row "dotprod 1x64, M = 1 (SDOT)" dotprod.s sdot_tileILi1ELi4E sdot sdot:16 neoverse-n1
row "i8mm 8x8 (SMMLA, repacked)" i8mm.s mmla_tileILi4E smmla smmla:32 neoverse-v1
row "i8mm 8x8 (SMMLA, repacked)" i8mm.s mmla_tileILi4E smmla smmla:32 neoverse-n2
row "i8mm's SDOT 4x16 (below 16 rows)" i8mm.s sdot_tileILi4ELi1E sdot sdot:16 neoverse-v1
# cycles ASM FUNCTION MNEMONIC CPU UNIT: llvm-mca's cycles per unit of work
# of a loop, where one unit has UNIT MNEMONIC instructions (a loop may be
# unrolled by the compiler or by hand).
cycles() {
  extract "$work/$1" "$2" "$3" "$work/loop.s"
  local n
  n=$(grep -c -P "^\t$3\t" "$work/loop.s")
  "$MCA" -mtriple=aarch64 -mcpu="$4" -iterations="$iters" "$work/loop.s" |
    awk -v it="$iters" -v n="$n" -v u="$5" '/Total Cycles/ {print $3 / it / (n / u)}'
}
# The i8mm kernel with its repacking, per step of 8 k over one cache block
# (kRc = 96 rows, a block of 64 channels; int8_i8mm.cpp): 12 x 8 tile steps
# of mmla_tile<4> (16 SMMLA each), 48 activation pairs repacked (repack_a:
# one store pair each) and 4 panels (repack_b: four ZIP1 each), for
# 96 x 64 x 8 MACs.
amortized() {
  local cpu=$1 kern a b
  kern=$(cycles i8mm.s mmla_tileILi4E smmla "$cpu" 16)
  a=$(cycles i8mm.s repack_a stp "$cpu" 1)
  b=$(cycles i8mm.s repack_b zip1 "$cpu" 4)
  python3 -c "
k, a, b = $kern, $a, $b
total = 96 * k + 48 * a + 4 * b
cpm = 64 * total / 49152
print(f'| i8mm with its repacking, 96 rows x 64 channels | $cpu | {96 * k:.0f} + {48 * a:.0f} (A) + {4 * b:.0f} (B) cycles '
      f'| 49152 | {total:.0f} | {cpm:.2f} | 1.00 | {cpm:.2f} | {$portable_cpm / cpm:.1f}x |')" >>"$work/table.md"
}
amortized neoverse-v1

echo "llvm-mca: $("$MCA" --version | sed -n 's/.*LLVM version \([0-9.]*\).*/\1/p'), $("$CXX" --version | head -1), $iters iterations"
echo
cat "$work/table.md"
