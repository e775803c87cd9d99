"""`fedmoe report DIR`: the per-round table of a run directory."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from fedmoe.common.accounting import PHASES, bytes_moved


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
                "p2p_bytes": bytes_moved(x["bytes"] for x in recs)["p2p"],
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


def phase_table(records: list[dict]) -> tuple[list[str], list[dict]]:
    """Mean seconds per phase over the peers of each round (records without phase_seconds, from
    older runs, are left out); returns the phases present, in the order they run, and the rows."""
    by_round: dict[int, list[dict]] = defaultdict(list)
    for rec in records:
        if rec.get("phase_seconds"):
            by_round[rec["round"]].append(rec["phase_seconds"])
    present = {name for phases in by_round.values() for p in phases for name in p}
    names = [n for n in PHASES if n in present] + sorted(present - set(PHASES))
    rows = [
        {
            "round": r,
            "peers": len(phases),
            # None: no peer ran this phase in this round (e.g. fetch on a round without sync)
            **{
                n: sum(p.get(n, 0.0) for p in phases) / len(phases)
                if any(n in p for p in phases)
                else None
                for n in names
            },
        }
        for r, phases in sorted(by_round.items())
    ]
    return names, rows


def format_phase_table(names: list[str], rows: list[dict]) -> str:
    widths = [max(9, len(n)) for n in names]
    head = f"{'round':>5} {'peers':>5} " + " ".join(
        f"{n:>{w}}" for n, w in zip(names, widths, strict=True)
    )
    lines = ["seconds per phase (mean over peers)", head, "-" * len(head)]
    for r in rows:
        cells = " ".join(
            f"{'-':>{w}}" if r[n] is None else f"{r[n]:>{w}.3f}"
            for n, w in zip(names, widths, strict=True)
        )
        lines.append(f"{r['round']:>5} {r['peers']:>5} {cells}")
    return "\n".join(lines)


def print_report(run_dir: Path, as_json: bool = False) -> int:
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    if as_json:
        if summary is None:
            raise SystemExit(f"report: {summary_path} not found")
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    records = load_records(run_dir)
    print(format_table(round_table(records)))
    names, phases = phase_table(records)
    if phases:
        print()
        print(format_phase_table(names, phases))
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
