#!/usr/bin/env bash
# ESTIMATES, not measurements: llvm-mca's static model of the inner loops of
# the sparse and cluster kernels, the Arm tier files against the portable
# file, all tuned for Neoverse N1 (benchmarks/RESULTS.md, "Arm tiers", has the
# table and what the model leaves out). Needs aarch64-linux-gnu-g++ (GCC 12
# here), llvm-mca (LLVM 14 here) and c++filt.
#
#   bash benchmarks/arm_mca_sparse.sh          # the table's numbers
#   SHOW=1 bash benchmarks/arm_mca_sparse.sh   # and llvm-mca's full reports
#   MCPUS=cortex-a72 bash benchmarks/arm_mca_sparse.sh  # other models
#
# Flags: the portable files with -mcpu=neoverse-n1 (the portable code at its
# best on that core: GCC may use all of Armv8.2 and N1's tuning), the Arm
# tier files with the -march CMake gives them and -mtune=neoverse-n1 (with
# -mcpu, the neon file would be compiled with dotprod, which its code tests
# for). Each kernel template is kept out of line by taking its address, so
# its loops are its own. Loops are picked by number from
# `python benchmarks/arm_mca.py list FILE.s FUNC` (GCC 12's output), and every
# trace checks its count of multiply-add lanes so that another compiler's
# numbering fails loudly instead of measuring something else.
set -euo pipefail
cd "$(dirname "$0")/.."
CXX=${CXX:-aarch64-linux-gnu-g++}
# Models: LLVM 14 has no Neoverse N1 model of its own (-mcpu=neoverse-n1
# selects the Cortex-A57 one); tsv110 (TaiShan v110, Kunpeng 920, a core of
# N1's class) is the nearest it has.
MCPUS=${MCPUS:-neoverse-n1 tsv110}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
common=(-std=gnu++20 -O3 -fopenmp-simd -Icsrc -S)
portable=(-mcpu=neoverse-n1)
neon=(-march=armv8-a -mtune=neoverse-n1)
dotprod=(-march=armv8.2-a+dotprod -mtune=neoverse-n1)

# compile NAME FLAGS...: $work/NAME.cpp -> $work/NAME.s, demangled.
compile() {
  local name=$1
  shift
  echo "\$ $CXX ${common[*]} $* $name.cpp | c++filt"
  "$CXX" "${common[@]}" "$@" -o - "$work/$name.cpp" | c++filt >"$work/$name.s"
}

cat >"$work/sparse_portable.cpp" <<'EOF'
#include "sparse/sparse_portable.cpp"
namespace pk::sparse {
void* volatile mca_keep[] = {(void*)&csr_forward<16, uint16_t>, (void*)&csr_forward_1<uint16_t>,
                             (void*)&bsr_forward<16, uint16_t>};
}
EOF
cat >"$work/sparse_neon.cpp" <<'EOF'
#include "sparse/sparse_neon.cpp"
namespace pk::sparse {
void* volatile mca_keep[] = {(void*)&csr_rows<16, uint16_t>, (void*)&csr_rows_1<uint16_t>,
                             (void*)&bsr_rows<16, uint16_t>};
}
EOF
cat >"$work/cluster_portable.cpp" <<'EOF'
#include "cluster/cluster_portable.cpp"
namespace pk::cluster {
void* volatile mca_keep[] = {(void*)&linear_generic<4>, (void*)&dynamic_generic<4>,
                             (void*)&dot4<int32_t, int8_t, int8_t>};
}
EOF
for tier in neon dotprod; do
  cat >"$work/cluster_$tier.cpp" <<EOF
#include "cluster/cluster_$tier.cpp"
namespace pk::cluster {
void decode_row4(const Row4& r, int64_t kb, int64_t kl, float* w) { r.decode(kb, kl, w); }
void* volatile mca_keep[] = {(void*)&dense_tile<1>, (void*)&dyn_tile<1>, (void*)&decode_row4};
}
EOF
done

echo "== compile"
compile sparse_portable "${portable[@]}"
compile sparse_neon "${neon[@]}"
compile cluster_portable "${portable[@]}"
compile cluster_neon "${neon[@]}"
compile cluster_dotprod "${dotprod[@]}"

# row LABEL [arm_mca.py trace args...]: one estimate per model, printed with
# its command (files named relative to the temporary directory).
row() {
  local label=$1
  shift
  echo "-- $label"
  for mcpu in $MCPUS; do
    { printf '$ python benchmarks/arm_mca.py trace --mcpu %s' "$mcpu"; printf ' %q' "$@"; echo; } |
      sed "s|$work/||g"
    python benchmarks/arm_mca.py trace --mcpu "$mcpu" ${SHOW:+--show} "$@"
  done
}
S=$work

echo "== sparse, CSR forward, 16 columns of M: cycles per 16 stored values"
# portable: GCC runs stored values two at a time in scalar FMAs over the 16
# columns (loop 2, inside loop 1) and a last one or two as vectors (loop 3):
# a row of 16 values is 7 pairs and 2 singles.
row "portable" --part "$S/sparse_portable.s" 'csr_forward<16, unsigned short>' '7x1^16,2x3' \
  --expect-lanes 256
# neon: 4 values per pass (loop 4).
row "neon" --part "$S/sparse_neon.s" 'csr_rows<16, unsigned short>' '4x4' --expect-lanes 256

echo "== sparse, CSR forward, one token: cycles per 16 stored values"
# portable: 4 values per pass of its vector loop (loop 2), two FMLA .2s.
row "portable" --part "$S/sparse_portable.s" 'csr_forward_1<unsigned short>' '4x2' \
  --expect-lanes 16
# neon: 16 values per pass (loop 2).
row "neon" --part "$S/sparse_neon.s" 'csr_rows_1<unsigned short>' '1x2' --expect-lanes 16

echo "== sparse, BSR forward, 16 columns of M: cycles per 4x4 block (16 stored values)"
# portable: a block per pass of loop 1, its four columns in loop 2.
row "portable" --part "$S/sparse_portable.s" 'bsr_forward<16, unsigned short>' '1x1^4' \
  --expect-lanes 256
# neon: a whole block (all four columns inside K) per pass of loop 5.
row "neon" --part "$S/sparse_neon.s" 'bsr_rows<16, unsigned short>' '1x5' --expect-lanes 256

echo "== cluster, 4-bit codes, weight-only, one row of x: cycles per 64 lookups"
# portable: a weight per pass of its decode loop (loop 5), then dot4 over
# four rows, 4 k per pass (loop 7): 64 weights = 64 decodes + 4 passes.
row "portable" --part "$S/cluster_portable.s" 'linear_generic<4>' '64x5' \
  --part "$S/cluster_portable.s" 'linear_generic<4>' '4x7' --expect-lanes 64 --expect ldrb=64
# neon: a group of 128 weights per pass of the decode (loop 0), then the
# 1-row tile, 4 k of four rows per pass (loop 0): 128 weights, halved.
row "neon" --part "$S/cluster_neon.s" 'Row4::decode' '1x0' \
  --part "$S/cluster_neon.s" 'dense_tile<1>' '8x0' --per 2 --expect-lanes 128 --expect tbl=32

echo "== cluster, 4-bit codes, dynamic (int8), one row of x: cycles per 64 lookups"
# portable: a code byte (two weights) per pass of its decode loop (loop 3),
# then dot4 over four rows, 16 k per pass (loop 0 of dot4<int>).
row "portable" --part "$S/cluster_portable.s" 'dynamic_generic<4>' '32x3' \
  --part "$S/cluster_portable.s" 'dot4<int' '1x0' --expect-lanes 64 --expect ldrsb=64
# neon / dotprod: four rows of one group (512 weights) per pass (loop 3).
row "neon" --part "$S/cluster_neon.s" 'dyn_tile<1>' '1x3' --per 8 --expect-lanes 512 \
  --expect tbl=32
row "dotprod" --part "$S/cluster_dotprod.s" 'dyn_tile<1>' '1x3' --per 8 --expect-lanes 512 \
  --expect tbl=32

echo "== topk, the magnitude scan (f32 keys, a block without survivors): cycles per 16 elements"
for tier in portable neon; do
  ops=$([ "$tier" = portable ] && echo Portable || echo Neon)
  cat >"$work/topk_$tier.cpp" <<EOF
#include "topk/topk_$tier.cpp"
namespace pk::topk {
void* volatile mca_keep[] = {(void*)&scan::collect_plain<$ops, uint32_t, &$ops::mask_u32>};
}
EOF
done
compile topk_portable "${portable[@]}"
compile topk_neon "${neon[@]}"
# portable: an element per pass of its compare loop (loop 1), 64 per block,
# and the block loop once (loop 0); neon: a block of 64 per pass (loop 0).
row "portable" --part "$S/topk_portable.s" 'collect_plain' '64x1' \
  --part "$S/topk_portable.s" 'collect_plain' '1x0' --per 4 --expect cset=65
row "neon" --part "$S/topk_neon.s" 'collect_plain' '1x0' --per 4 --expect cmhs=16
