"""Federated training with faults in 2 of 6 rounds, against the same run without them.

Issue 26's setting: 5 clients, TopK(0.01) with error feedback, Compressed(FedAvg),
Flower simulations (Ray). Schedules (ROUND:CLIENT:KIND):

- "one per round": round 2, client 0's update holds a NaN (refused by its mod);
  round 4, client 2's payload is corrupted on the way (refused by the server).
- "two per round": as above, and in round 2 client 1's reply has a mismatched
  array (refused by its mod), in round 4 client 3's update holds a NaN.

Each faulty schedule is run again with the same clients simply failing in the
same rounds (their ClientApp raises: Flower's ordinary dropout, no state
touched), so the table separates what the absent updates cost from anything a
fault costs beyond that. Reported per seed: final accuracy against the
fault-free run, and the longest any round waited for its replies (the round
timeout is 120 s; a round that waited for it would show it).

    python benchmarks/federated_faults.py [--seeds 0,1,2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import asdict

from pykernels.comm import _flower_demo as demo

SCHEDULES = {
    "one per round": "2:0:nan,4:2:corrupt",
    "two per round": "2:0:nan,2:1:mismatch,4:2:corrupt,4:3:nan",
}


def dropout_twin(spec: str) -> str:
    """The same (round, client) pairs, each client failing outright."""
    return re.sub(r":[a-z]+(:[0-9.]+)?(?=,|$)", ":raise", spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--codec", default="topk:0.01")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    logging.getLogger("flwr").setLevel(logging.CRITICAL)
    rows, runs = [], []
    for seed in (int(s) for s in args.seeds.split(",")):
        base = demo.Setup(clients=5, rounds=6, seed=seed, timeout=args.timeout)
        clean = demo.simulate(args.codec, base)
        runs.append({"seed": seed, "schedule": "none", **asdict(clean)})
        rows.append(
            f"| {seed} | none | {clean.final_accuracy:.2f} | | | | {max(clean.wait_s):.1f} |"
        )
        for name, spec in SCHEDULES.items():
            for label, s in ((name, spec), (f"{name}, as dropouts", dropout_twin(spec))):
                setup = demo.Setup(**{**asdict(base), "faults": demo.parse_faults(s)})
                r = demo.simulate(args.codec, setup)
                runs.append({"seed": seed, "schedule": label, "spec": s, **asdict(r)})
                rows.append(
                    f"| {seed} | {label} | {r.final_accuracy:.2f} "
                    f"| {r.final_accuracy - clean.final_accuracy:+.2f} "
                    f"| {r.failed} | {r.refused} | {max(r.wait_s):.1f} |"
                )
                print(f"seed {seed}, {label} ({s}):\n{demo.rounds_table(r)}", flush=True)
    print(f"\n{args.codec}, 5 clients, 6 rounds, round timeout {args.timeout:g} s")
    print(
        "| seed | faults | final accuracy (%) | vs no faults (points) | failed | refused "
        "| longest round wait (s) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"timeout": args.timeout, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
