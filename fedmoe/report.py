"""`fedmoe report DIR`: the per-round table of a run directory."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def load_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"report: {path} not found (is {run_dir} a run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def round_table(records: list[dict]) -> list[dict]:
    by_round: dict[int, list[dict]] = defaultdict(list)
    for rec in records:
        by_round[rec["round"]].append(rec)
    rows = []
    for r, recs in sorted(by_round.items()):
        n = len(recs)
        rows.append(
            {
                "round": r,
                "peers": n,
                "accuracy": sum(x["accuracy"] for x in recs) / n,
                "global_accuracy": sum(x["global_accuracy"] for x in recs) / n,
                "loss": sum(x["loss"] for x in recs) / n,
                "coordinator_bytes": sum(
                    x["bytes"]["coordinator_sent"] + x["bytes"]["coordinator_received"]
                    for x in recs
                ),
                "p2p_bytes": sum(x["bytes"]["p2p_sent"] + x["bytes"]["p2p_received"] for x in recs),
                "seconds": max(x["seconds"] for x in recs),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'round':>5} {'peers':>5} {'acc':>7} {'global':>7} {'loss':>7} {'coord MB':>9} {'p2p MB':>9} {'sec':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['round']:>5} {r['peers']:>5} {r['accuracy']:>7.4f} {r['global_accuracy']:>7.4f} "
            f"{r['loss']:>7.4f} {r['coordinator_bytes'] / 1e6:>9.3f} {r['p2p_bytes'] / 1e6:>9.3f} "
            f"{r['seconds']:>6.1f}"
        )
    return "\n".join(lines)


def print_report(run_dir: Path, as_json: bool = False) -> int:
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    if as_json:
        if summary is None:
            raise SystemExit(f"report: {summary_path} not found")
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    print(format_table(round_table(load_records(run_dir))))
    if summary:
        acc, gacc = summary["final_accuracy_mean"], summary["final_global_accuracy_mean"]
        print(
            f"\n{summary['algorithm']}: {summary['peers']} peers, {summary['rounds']} rounds, "
            f"status {summary.get('status')}; final accuracy "
            f"{'n/a' if acc is None else f'{acc:.4f}'} (global {'n/a' if gacc is None else f'{gacc:.4f}'}); "
            f"bytes coordinator {summary['bytes']['coordinator'] / 1e6:.3f} MB, "
            f"p2p {summary['bytes']['p2p'] / 1e6:.3f} MB"
        )
    return 0
