"""``python -m pykernels info | bench | demo | compress``."""

from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> int:
    from . import info

    d = info()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    for key, value in d.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for fam, per_dev in value.items():
                print(f"  {fam}: " + ", ".join(f"{dev} -> {b}" for dev, b in per_dev.items()))
        else:
            print(f"{key}: {value}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.isa:
        return _bench_tiers(args)
    import os

    import torch

    from . import bench, info
    from .bench import tiers

    if args.threads:
        torch.set_num_threads(args.threads)
        from . import set_num_threads

        set_num_threads(args.threads)
    devices = (
        [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    families = tuple(args.family) if args.family else bench.FAMILIES
    cases = [c for d in devices for c in bench.collect_cases(families, d, args.quick)]
    results = bench.run(cases)
    print(bench.table(results, {c.name: c.baseline for c in cases}))
    import importlib

    for fam in families:
        mod = importlib.import_module(f"pykernels.bench.{fam}")
        if hasattr(mod, "summary") and any(r.family == fam for r in results):
            print()
            print(mod.summary(results))
    meta = {k: v for k, v in info().items() if not isinstance(v, dict)}
    meta["torch_threads"] = torch.get_num_threads()
    meta["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    meta["caps"] = {k: os.environ[k] for k in tiers.CAP_VARS if k in os.environ}
    if args.json:
        bench.write_json(args.json, results, meta)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        bench.plot(args.plot, results)
        print(f"wrote {args.plot}", file=sys.stderr)
        for fam in families:
            mod = importlib.import_module(f"pykernels.bench.{fam}")
            if hasattr(mod, "plot") and any(r.family == fam for r in results):
                extra = args.plot.rsplit(".", 1)[0] + f"_{fam}.png"
                mod.plot(extra, results)
                print(f"wrote {extra}", file=sys.stderr)
    return 0


def _bench_tiers(args: argparse.Namespace) -> int:
    """Each --isa tier in a child process, ours and the peers capped together."""
    from .bench import tiers

    try:
        chosen = tiers.parse(args.isa)
    except ValueError as e:
        print(f"python -m pykernels bench: {e}", file=sys.stderr)
        return 2
    child: list[str] = []
    for fam in args.family or []:
        child += ["--family", fam]
    if args.quick:
        child.append("--quick")
    if args.threads:
        child += ["--threads", str(args.threads)]
    child += ["--device", "cpu"]
    if args.plot:
        print("--plot is per run: omitted with --isa", file=sys.stderr)
    return tiers.run(chosen, child, args.json)


def _bench_families() -> tuple[str, ...]:
    from .bench import FAMILIES

    return FAMILIES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pykernels")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="what was built and which backend each family uses")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_info.set_defaults(fn=_info)
    p_bench = sub.add_parser("bench", help="each family against its peers, with ratios")
    p_bench.add_argument(
        "--family",
        action="append",
        choices=list(_bench_families()),
        help="repeatable",
    )
    p_bench.add_argument("--device", choices=["cpu", "cuda"])
    p_bench.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
    p_bench.add_argument("--threads", type=int, help="threads for torch and pykernels")
    p_bench.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    p_bench.add_argument("--plot", metavar="PATH.png", help="write a chart (needs matplotlib)")
    p_bench.add_argument(
        "--isa",
        action="append",
        metavar="TIER",
        help="CPU tiers to run, each in a child process with ours and the peers capped "
        "together: avx2, avx512, amx or native (comma-separated or repeated); a tier "
        "this CPU cannot run is skipped",
    )
    p_bench.set_defaults(fn=_bench)
    from .compress.demo import add_parsers as _add_compress_parsers

    _add_compress_parsers(sub)  # demo, compress
    from .comm._flower_demo import add_parser as _add_federated_parser

    _add_federated_parser(sub)  # federated (needs flwr when run, not to parse)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
