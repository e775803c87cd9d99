"""Whole runs under a named network scenario: wall-clock time to a target accuracy per algorithm.

For every algorithm a fresh topology is built with scripts/netns.py (needs root): the
coordinator in namespace <prefix>coord, peer k in <prefix>p<k>, all on one private bridge (or
the user-space switch when the profile has a delay and the kernel no netem); nothing is routed
elsewhere, and the namespaces, links and processes are removed after each run, also on errors,
Ctrl-C and SIGTERM. Profiles (fedmoe/scenarios.py): lan, edge, server-bottleneck, heterogeneous.

Each run writes its usual directory (metrics.jsonl, summary.json) under OUT/PROFILE/ALGORITHM;
OUT/PROFILE/scenario.json, the table and OUT/PROFILE/accuracy_vs_time.png compare them: time to
the target accuracy (default: the final accuracy of --target-from, FedAvg, in the same
scenario), seconds per round, bytes. --rate-scale multiplies every rate of the profile (to
make transfer time comparable with training time on a slow CPU; reported with the results).

Usage (root):
  python bench/scenario.py --network server-bottleneck --algorithms fedmoe-da,fedavg,moe-fedavg \
      --dataset cifar10 --data-dir ../shared/data/cifar10-subset --peers 4 --rounds 5 --out runs/sc
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from netns import Topology  # noqa: E402

from fedmoe.common.accounting import PHASES  # noqa: E402
from fedmoe.common.auth import new_token_file  # noqa: E402
from fedmoe.report import round_overhead  # noqa: E402
from fedmoe.scenarios import (  # noqa: E402
    COORDINATOR,
    PROFILE_NAMES,
    LinkProfile,
    mean_round_seconds,
    profile,
    round_series,
    time_to_target,
)

FEDMOE = [sys.executable, "-m", "fedmoe.cli"]
COORD_PORT, PEER_PORT = 50051, 50052


def topology(prof: LinkProfile, peers: int, prefix: str, scale: float) -> Topology:
    """The profile as a Topology: one rate for all when it is uniform (so a delay can use the
    user-space switch), per-host rates otherwise (veth + tbf)."""
    names = [COORDINATOR, *(f"p{k}" for k in range(peers))]
    rates = prof.host_rates(scale)
    delay = f"{prof.delay_ms:g}ms" if prof.delay_ms else None
    pairs = set(rates.values())
    if len(pairs) == 1 and next(iter(pairs))[1] is None:
        return Topology(names, rate=next(iter(pairs))[0], delay=delay, prefix=prefix)
    return Topology(names, delay=delay, prefix=prefix, host_rates=rates, link="veth")


def run_one(
    prof: LinkProfile, algorithm: str, args: argparse.Namespace, run_argv: list[str], out: Path
) -> dict[str, Any]:
    """One whole run in fresh namespaces; returns what the launcher saw."""
    out.mkdir(parents=True, exist_ok=True)
    token = out / "join-token"
    new_token_file(token)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    data = ["--data-dir", str(Path(args.data_dir).resolve())] if args.data_dir else []
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.peers)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    with topology(prof, args.peers, args.prefix, args.rate_scale) as topo:
        coord = f"{topo.address(COORDINATOR)}:{COORD_PORT}"
        print(f"[{prof.name}] {algorithm}: {topo.describe()}", flush=True)

        def start(name: str, host: str, argv: list[str]) -> None:
            with open(out / f"{name}.log", "w") as log:  # the child keeps its own descriptor
                procs[name] = subprocess.Popen(
                    [*topo.exec_prefix(host), *FEDMOE, *argv],
                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                )  # fmt: skip

        t0 = time.time()
        try:
            start("coordinator", COORDINATOR, [
                "coordinator", "--listen", coord, "--token-file", str(token), "--out", str(out),
                "--algorithm", algorithm, "--peers", str(args.peers), "--rounds",
                str(args.rounds), "--dataset", args.dataset, "--seed", str(args.seed),
                *data, *run_argv,
            ])  # fmt: skip
            for k in range(args.peers):
                start(f"peer-{k}", f"p{k}", [
                    "peer", "--coordinator", coord, "--listen",
                    f"{topo.address(f'p{k}')}:{PEER_PORT}", "--index", str(k),
                    "--token-file", str(token), "--threads", str(threads),
                    "--timeout", str(args.timeout), *data,
                ])  # fmt: skip
            deadline = time.monotonic() + args.timeout
            codes = {n: p.wait(timeout=max(1.0, deadline - time.monotonic()))
                     for n, p in procs.items()}  # fmt: skip
        finally:  # a failure or Ctrl-C: no process outlives its namespace (down() kills too)
            for p in procs.values():
                if p.poll() is None:
                    p.terminate()
            for p in procs.values():
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        link = topo.describe()
    if any(codes.values()):
        tails = "\n".join(
            f"--- {n} (exit {c})\n{(out / f'{n}.log').read_text()[-1500:]}"
            for n, c in codes.items()
            if c
        )
        raise RuntimeError(f"{prof.name}/{algorithm}: a process failed\n{tails}")
    return {"link": link, "launcher_seconds": round(time.time() - t0, 2), "exit": codes}


def completed(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def load_records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def compare(
    runs: dict[str, Path], metric: str, target: float | None, target_from: str
) -> dict[str, Any]:
    """Time to target per algorithm from the run directories (target None: the final mean
    `metric` of `target_from`)."""
    series = {a: round_series(load_records(d), metric) for a, d in runs.items()}
    if target is None:
        if target_from not in series or not series[target_from]:
            raise ValueError(f"target from {target_from!r}, which did not run")
        target = series[target_from][-1][metric]
    out: dict[str, Any] = {"metric": metric, "target": target, "algorithms": {}}
    for alg, rows in series.items():
        summary = json.loads((runs[alg] / "summary.json").read_text())
        records = load_records(runs[alg])
        share = round_overhead(records)
        secs, rnd = time_to_target(rows, target, metric)
        out["algorithms"][alg] = {
            "final": rows[-1][metric] if rows else None,
            "time_to_target_s": secs,
            "round_of_target": rnd,
            "mean_round_s": mean_round_seconds(rows),
            "total_s": rows[-1]["t"] if rows else None,
            "coordinator_mb": summary["bytes"]["coordinator"] / 1e6,
            "p2p_mb": summary["bytes"]["p2p"] / 1e6,
            # where a peer's round goes: mean seconds per phase over all peer rounds
            "phase_mean_s": {
                n: sum(r["phase_seconds"].get(n, 0.0) for r in records) / len(records)
                for n in PHASES
                if any(n in r["phase_seconds"] for r in records)
            },
            "outside_train_evaluate_share": share["outside"] if share else None,
            "series": rows,
            "run_dir": str(runs[alg]),
        }
    ref = out["algorithms"].get(target_from, {}).get("time_to_target_s")
    for row in out["algorithms"].values():
        t = row["time_to_target_s"]
        row["speedup_vs_" + target_from.replace("-", "_")] = (ref / t) if ref and t else None
    out["target_from"] = None if target_from not in runs else target_from
    return out


def format_table(name: str, result: dict[str, Any]) -> str:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    key = next(k for k in next(iter(result["algorithms"].values())) if k.startswith("speedup"))
    head = (f"{'algorithm':<12} {'final':>6} {'to target s':>11} {'round':>5} {'s/round':>8} "
            f"{'total s':>8} {'train s':>7} {'outside':>7} {'coord MB':>9} {'p2p MB':>8} "
            f"{'speedup':>7}")  # fmt: skip
    lines = [f"{name}: target {result['metric']} {result['target']:.4f}", head, "-" * len(head)]
    for alg, r in result["algorithms"].items():
        lines.append(
            f"{alg:<12} {fmt(r['final'], '6.4f')} {fmt(r['time_to_target_s'], '11.1f')} "
            f"{fmt(r['round_of_target'], '5d')} {fmt(r['mean_round_s'], '8.1f')} "
            f"{fmt(r['total_s'], '8.1f')} {fmt(r['phase_mean_s'].get('train'), '7.1f')} "
            f"{fmt(r['outside_train_evaluate_share'], '7.1%')} "
            f"{r['coordinator_mb']:>9.2f} {r['p2p_mb']:>8.2f} "
            f"{fmt(r[key], '7.2f')}"
        )
    lines.append(
        "train s: mean seconds of local training per peer round; outside: share of the peers' "
        "round time outside train and evaluate (transfers and waiting)"
    )
    return "\n".join(lines)


def run_scenario(name: str, args: argparse.Namespace, run_argv: list[str]) -> dict[str, Any]:
    prof = profile(name, args.peers, args.seed)
    base = args.out / name
    runs, launched = {}, {}
    for alg in args.algorithms.split(","):
        runs[alg] = base / alg
        if args.reuse and completed(runs[alg]):
            print(f"[{name}] {alg}: reusing {runs[alg]}", flush=True)
            continue
        launched[alg] = run_one(prof, alg, args, run_argv, runs[alg])
    result = compare(runs, args.metric, args.target, args.target_from)
    result["profile"] = prof.as_dict(args.rate_scale)
    for alg, info in launched.items():
        result["algorithms"][alg]["launcher"] = info
    result["settings"] = {
        "peers": args.peers,
        "rounds": args.rounds,
        "dataset": args.dataset,
        "seed": args.seed,
        "run_options": run_argv,
    }
    if not args.no_plot:
        from fedmoe.plots import accuracy_vs_time_figure

        lines = {a: [(r["t"], r[args.metric]) for r in v["series"]]
                 for a, v in result["algorithms"].items()}  # fmt: skip
        fig = accuracy_vs_time_figure(lines, result["target"], f"{name}: {prof.description}",
                                      args.metric)  # fmt: skip
        fig.savefig(base / "accuracy_vs_time.png", dpi=90)
        result["plot"] = str(base / "accuracy_vs_time.png")
    (base / "scenario.json").write_text(json.dumps(result, indent=2))
    print(format_table(name, result), flush=True)
    return result


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--network", default="server-bottleneck",
                    help=f"profile(s), comma-separated, of {', '.join(PROFILE_NAMES)}")  # fmt: skip
    ap.add_argument("--algorithms", default="fedmoe-da,fedavg,moe-fedavg")
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0, help="run seed and heterogeneous rates' seed")
    ap.add_argument("--metric", default="accuracy", choices=["accuracy", "global_accuracy"])
    ap.add_argument("--target", type=float, default=None,
                    help="target accuracy (default: --target-from's final accuracy)")  # fmt: skip
    ap.add_argument("--target-from", default="fedavg")
    ap.add_argument("--rate-scale", type=float, default=1.0, help="multiply every rate")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per peer")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--prefix", default="fsc-", help="namespace/link name prefix")
    ap.add_argument("--out", type=Path, default=Path("runs/scenario"))
    ap.add_argument("--json", type=Path, default=None, help="all profiles' results in one file")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--reuse", action="store_true",
                    help="keep completed runs found under OUT (only compare and plot them)")  # fmt: skip
    args, run_argv = ap.parse_known_args(argv)  # the rest: coordinator run options
    for name in args.network.split(","):
        profile(name, args.peers, args.seed)  # ValueError early for an unknown name
    if args.rate_scale <= 0:
        ap.error("--rate-scale must be positive")
    if args.target is None and args.target_from not in args.algorithms.split(","):
        ap.error(f"no --target given and --target-from {args.target_from} is not run")
    return args, run_argv


def main(argv: list[str] | None = None) -> int:
    args, run_argv = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench/scenario.py needs root (network namespaces, tc)")

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwind through `with Topology` (always cleans up)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    try:
        results = {name: run_scenario(name, args, run_argv) for name in args.network.split(",")}
    except KeyboardInterrupt:  # the `with Topology` blocks have removed their namespaces
        print("interrupted; the namespaces and processes of the run are removed", file=sys.stderr)
        return 130
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
