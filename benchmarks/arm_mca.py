"""Static throughput estimates of compiled aarch64 loops with llvm-mca.

Reads GCC's assembly (demangled), finds a function's loops (a label and the
backward branch to it), and writes the instructions one pass of the kernel
executes for a unit of work as one straight line (a trace): loops repeated as
often as that work makes them run, an outer loop with its inner loop repeated
inside it. llvm-mca then runs the trace back to back and reports cycles per
trace, which is the estimate. Branches stay in (their targets rewritten to one
label), so their issue slots count; taken-branch and cache effects do not.
These are estimates of a model of the core, not measurements.

    python benchmarks/arm_mca.py list FILE.s FUNCTION_REGEX
    python benchmarks/arm_mca.py trace --part FILE.s FUNCTION_REGEX SPEC [--part ...]
        [--per N] [--mcpu CPU] [--expect-lanes N] [--show]

SPEC: comma-separated segments COUNTxLOOP or COUNTxLOOP^TIMES (loop numbers as
`list` prints them; ^TIMES repeats the one loop nested in LOOP that many
times within each pass of it). Parts (say, decoding weights, then the dot
products over them) are estimated one by one and added, as they run one
after the other; --per divides the total by the units of work they do.
--expect-lanes checks the multiply-add lanes of all parts (4 per FMLA .4s,
1 per scalar FMADD, 8 per SMULL .8h, 16 per SDOT .4s, ...) and --expect
OP=N the count of one instruction, so that a changed compiler output cannot
silently measure something else.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile

COND = "eq|ne|cs|hs|cc|lo|mi|pl|vs|vc|hi|ls|ge|lt|gt|le|al"
BRANCH = re.compile(rf"^\s*(b(?:\.?(?:{COND}))?|cbn?z|tbn?z)\s+(.*)$")
LABEL = re.compile(r"^(\.?[\w.$]+):")


def function_lines(path: str, func: str) -> list[str]:
    """The lines of the first function whose label matches func (demangled)."""
    lines = open(path).read().splitlines()
    pat = re.compile(func)
    start = None
    for i, line in enumerate(lines):
        if start is None:
            if line.endswith(":") and not line.startswith((" ", "\t", ".")) and pat.search(line):
                start = i + 1
        elif line.lstrip().startswith(".size") or (
            line.endswith(":") and not line.startswith((" ", "\t", "."))
        ):
            return lines[start:i]
    if start is None:
        sys.exit(f"no function matching {func!r} in {path}")
    return lines[start:]


def is_insn(line: str) -> bool:
    s = line.strip()
    return bool(s) and not s.startswith((".", "//", "#", "@")) and not LABEL.match(s)


def loops(lines: list[str]) -> list[tuple[int, int]]:
    """(label line, branch line) of every backward branch, in label order."""
    where = {}
    for i, line in enumerate(lines):
        m = LABEL.match(line.strip())
        if m:
            where[m.group(1)] = i
    found = []
    for i, line in enumerate(lines):
        m = BRANCH.match(line)
        if not m:
            continue
        target = m.group(2).split(",")[-1].strip()
        if target in where and where[target] < i:
            found.append((where[target], i))
    return sorted(set(found))


def lanes(insns: list[str]) -> int:
    """Multiply-add lanes: what the kernel's arithmetic does, per trace."""
    total = 0
    for s in insns:
        op = s.split()[0]
        if op in ("fmla", "fmls", "mla", "sdot", "udot", "smlal", "smlal2", "smull", "smull2"):
            arr = re.search(r"\.(\d+)([bhsd])\b", s)
            n = int(arr.group(1)) if arr else 1
            if op in ("sdot", "udot"):
                n *= 4
            total += n
        elif op in ("fmadd", "fmsub", "madd"):
            total += 1
    return total


def histogram(insns: list[str]) -> str:
    c = collections.Counter(s.split()[0] for s in insns)
    return " ".join(f"{k}:{v}" for k, v in c.most_common())


def trace(lines: list[str], spec: str) -> list[str]:
    all_loops = loops(lines)
    out: list[str] = []
    for seg in spec.split(","):
        m = re.fullmatch(r"(\d+)x(\d+)(?:\^(\d+))?", seg.strip())
        if not m:
            sys.exit(f"bad segment {seg!r}")
        count, idx = int(m.group(1)), int(m.group(2))
        a, b = all_loops[idx]
        body = lines[a : b + 1]
        if m.group(3):
            inner = [(c, d) for c, d in all_loops if a < c and d < b]
            if len(inner) != 1:
                sys.exit(f"loop {idx} holds {len(inner)} loops, not one")
            c, d = inner[0]
            body = lines[a:c] + lines[c : d + 1] * int(m.group(3)) + lines[d + 1 : b + 1]
        out += [s.strip() for s in body if is_insn(s)] * count
    return out


POST_STORE = re.compile(r"^(st[a-z0-9]*)\s+(.*),\s*\[(\w+)\],\s*(#?-?\w+)$")
PRE_STORE = re.compile(r"^(st[a-z0-9]*)\s+(.*),\s*\[(\w+),\s*(#?-?\w+)\]!$")


def split_writeback(s: str) -> list[str]:
    """A store that updates its base register, as a store and an add.

    LLVM 14's models make the base register's new value wait for the store's
    data (the instruction issues once all its operands are ready), so a loop
    whose next load takes its address from a post-indexed store runs one
    iteration at a time. Cores split stores into address and data operations,
    and the address (and the writeback) does not wait for the data."""
    m = POST_STORE.match(s)
    if m:
        op, regs, base, inc = m.groups()
        return [f"{op}\t{regs}, [{base}]", f"add\t{base}, {base}, {inc}"]
    m = PRE_STORE.match(s)
    if m:
        op, regs, base, inc = m.groups()
        return [f"add\t{base}, {base}, {inc}", f"{op}\t{regs}, [{base}]"]
    return [s]


def mca(insns: list[str], mcpu: str, iterations: int = 100) -> tuple[float, str]:
    # Every branch goes to one label at the top: llvm-mca needs its targets
    # defined, and ignores where they go.
    text = [".Lmca_top:"]
    for s in [t for insn in insns for t in split_writeback(insn)]:
        m = BRANCH.match(s)
        if m:
            ops = m.group(2).split(",")
            ops[-1] = " .Lmca_top"
            s = f"{m.group(1)} {','.join(ops).strip()}"
        text.append("\t" + s)
    with tempfile.NamedTemporaryFile("w", suffix=".s") as f:
        f.write("\n".join(text) + "\n")
        f.flush()
        cmd = [
            "llvm-mca",
            "-mtriple=aarch64-linux-gnu",
            f"-mcpu={mcpu}",
            f"-iterations={iterations}",
            "-bottleneck-analysis",
            f.name,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(res.stderr)
    cycles = int(re.search(r"Total Cycles:\s+(\d+)", res.stdout).group(1))
    return cycles / iterations, res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="a function's loops, numbered")
    ls.add_argument("asm")
    ls.add_argument("func")
    tr = sub.add_parser("trace", help="cycles of one unit of work")
    tr.add_argument(
        "--part",
        nargs=3,
        action="append",
        required=True,
        metavar=("ASM", "FUNC", "SPEC"),
        help="a trace from one function; parts run one after the other, their cycles add",
    )
    tr.add_argument("--mcpu", default="neoverse-n1")
    tr.add_argument("--per", type=int, default=1, help="units of work the parts do together")
    tr.add_argument("--expect-lanes", type=int, help="multiply-add lanes of all parts")
    tr.add_argument(
        "--expect",
        action="append",
        default=[],
        metavar="OP=N",
        help="instructions of one kind in all parts (for parts without multiply-adds)",
    )
    tr.add_argument("--show", action="store_true", help="print llvm-mca's reports")
    args = ap.parse_args()
    if args.cmd == "list":
        lines = function_lines(args.asm, args.func)
        for i, (a, b) in enumerate(loops(lines)):
            insns = [s.strip() for s in lines[a : b + 1] if is_insn(s)]
            print(f"loop {i}: {lines[a].strip()} {len(insns)} insns, lanes {lanes(insns)}")
            print(f"    {histogram(insns)}")
        return
    total, all_insns, parts = 0.0, [], []
    for asm, func, spec in args.part:
        insns = trace(function_lines(asm, func), spec)
        cycles, report = mca(insns, args.mcpu)
        if args.show:
            print(report)
        total += cycles
        all_insns += insns
        parts.append(f"{cycles:.1f}")
    got = lanes(all_insns)
    if args.expect_lanes is not None and got != args.expect_lanes:
        sys.exit(f"{args.part}: {got} multiply-add lanes, expected {args.expect_lanes}")
    ops = collections.Counter(s.split()[0] for s in all_insns)
    for want in args.expect:
        op, n = want.split("=")
        if ops[op] != int(n):
            sys.exit(f"{args.part}: {ops[op]} {op}, expected {n}")
    split = f" = {' + '.join(parts)}" if len(parts) > 1 else ""
    print(
        f"{total / args.per:.1f} cycles{f' (/{args.per})' if args.per > 1 else ''}"
        f"  [{total:.1f}{split}; {len(all_insns)} instructions, {got} lanes;"
        f" {histogram(all_insns)}]"
    )


if __name__ == "__main__":
    main()
