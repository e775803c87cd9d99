"""Side-by-side runs on one split, model and seed: bytes per round by class, and accuracy.

Each variant is a full `fedmoe local` run (separate processes, real gRPC on loopback).

  python bench/compare.py --dataset digits --peers 4 --rounds 3
  python bench/compare.py --dataset cifar10 --data-dir ../shared/data/cifar10-subset \
      --peers 4 --rounds 20 --alpha 0.5 --out runs/cifar-compare
  python bench/compare.py ... --variant "P=1:--neighbors 1" --variant "tau=1:--temperature 1"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_VARIANTS = [
    "fedmoe-da:--algorithm fedmoe-da",
    "fedavg:--algorithm fedavg",
    "moe-fedavg:--algorithm moe-fedavg",
    "local:--algorithm local",
]


def run_variant(name: str, flags: list[str], common: list[str], out: Path) -> dict:
    run_dir = out / name.replace("/", "_").replace(" ", "_")
    cmd = [sys.executable, "-m", "fedmoe.cli", "local", *common, *flags, "--out", str(run_dir)]
    print(f"== {name}: {' '.join(shlex.quote(c) for c in cmd[3:])}", flush=True)
    started = time.time()
    proc = subprocess.run(cmd, text=True, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("["):
            print("   " + line, flush=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_round: dict[int, dict[str, int]] = {}
    for r in records:
        row = per_round.setdefault(r["round"], {"coordinator": 0, "p2p": 0})
        row["coordinator"] += r["bytes"]["coordinator_sent"] + r["bytes"]["coordinator_received"]
        row["p2p"] += r["bytes"]["p2p_sent"]  # each p2p message once (bytes_moved)
    return {
        "variant": name,
        "flags": flags,
        "final_accuracy_mean": summary["final_accuracy_mean"],
        "final_global_accuracy_mean": summary["final_global_accuracy_mean"],
        "bytes": summary["bytes"],
        "bytes_per_round": per_round,
        "wall_seconds": round(time.time() - started, 1),
        "run_dir": str(run_dir),
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--variant", action="append", default=None, help="NAME:FLAGS (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("runs/compare"))
    ap.add_argument(
        "--json", type=Path, default=None, help="results file (default OUT/compare.json)"
    )
    args, common = ap.parse_known_args()
    variants = args.variant or DEFAULT_VARIANTS
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in variants:
        name, _, flags = spec.partition(":")
        results.append(run_variant(name, shlex.split(flags), common, args.out))

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"\nsame split, model and seed; flags: {' '.join(common)}  ({machine})")
    print("\napplication bytes per round, all peers (sent + received), MB")
    rounds = sorted({r for res in results for r in res["bytes_per_round"]})
    print(f"{'variant':<24} {'class':<12}" + "".join(f"{'r' + str(r):>9}" for r in rounds))
    for res in results:
        for klass in ("coordinator", "p2p"):
            cells = "".join(f"{res['bytes_per_round'][r][klass] / 1e6:>9.3f}" for r in rounds)
            print(f"{res['variant']:<24} {klass:<12}{cells}")
    print(
        f"\n{'variant':<24} {'accuracy':>9} {'global':>8} {'coord MB':>10} {'p2p MB':>10} {'wall s':>7}"
    )
    for res in results:
        print(
            f"{res['variant']:<24} {res['final_accuracy_mean']:>9.4f} "
            f"{res['final_global_accuracy_mean']:>8.4f} {res['bytes']['coordinator'] / 1e6:>10.3f} "
            f"{res['bytes']['p2p'] / 1e6:>10.3f} {res['wall_seconds']:>7.1f}"
        )
    path = args.json or args.out / "compare.json"
    path.write_text(
        json.dumps({"machine": machine, "common_flags": common, "results": results}, indent=2)
    )
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
