"""`fedmoe report DIR`: the per-round table of a run directory."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from fedmoe.common.accounting import PHASES, bytes_moved


def load_records(run_dir: Path, allow_empty: bool = False) -> list[dict]:
    """The records of metrics.jsonl, each checked; empty is an error unless allowed (the text
    table of a run that finished no round is just its header)."""
    if not run_dir.is_dir():
        raise SystemExit(f"report: {run_dir} is not a directory")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"report: {path} not found (is {run_dir} a run directory?)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"report: cannot read {path}: {e}") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"report: {path} line {n}: not JSON ({e.msg})") from None
        problem = record_problem(rec)
        if problem:
            raise SystemExit(f"report: {path} line {n}: {problem}")
        records.append(rec)
    if not records and not allow_empty:
        raise SystemExit(f"report: {path} holds no records (did the run finish a round?)")
    return records


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def record_problem(rec: object) -> str | None:
    """What makes a metrics record unusable for the tables and plots, or None."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    if not _is_count(rec.get("round")) or not isinstance(rec.get("peer"), str):
        return "needs a whole 'round' and a 'peer' name"
    for key in ("accuracy", "global_accuracy", "loss", "seconds"):
        if not _is_number(rec.get(key)):
            return f"'{key}' is missing or not a number"
    if rec.get("val_accuracy") is not None and not _is_number(rec["val_accuracy"]):
        return "'val_accuracy' must be null or a number"
    b = rec.get("bytes")
    keys = ("coordinator_sent", "coordinator_received", "p2p_sent", "p2p_received")
    if not isinstance(b, dict) or not all(_is_count(b.get(k)) for k in keys):
        return f"'bytes' needs whole counts {', '.join(keys)}"
    w = rec.get("wire")
    if w is not None and not (
        isinstance(w, dict) and _is_count(w.get("sent")) and _is_count(w.get("received"))
    ):
        return "'wire' must be null or hold whole counts 'sent' and 'received'"
    ph = rec.get("phase_seconds", {})
    if not isinstance(ph, dict) or not all(
        isinstance(k, str) and _is_number(v) for k, v in ph.items()
    ):
        return "'phase_seconds' must map phase names to seconds"
    return None


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
                "val_accuracy": _mean_val(recs),
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


def _mean_val(recs: list[dict]) -> float | None:
    """Mean validation accuracy over the records that have one (None: no validation split)."""
    values = [x["val_accuracy"] for x in recs if x.get("val_accuracy") is not None]
    return sum(values) / len(values) if values else None


def _cell(value: float | None) -> str:
    return f"{'n/a':>7}" if value is None else f"{value:>7.4f}"


def format_table(rows: list[dict]) -> str:
    head = f"{'round':>5} {'peers':>5} {'acc':>7} {'global':>7} {'val':>7} {'loss':>7} {'coord MB':>9} {'p2p MB':>9} {'sec':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['round']:>5} {r['peers']:>5} {r['accuracy']:>7.4f} {r['global_accuracy']:>7.4f} "
            f"{_cell(r['val_accuracy'])} {r['loss']:>7.4f} {r['coordinator_bytes'] / 1e6:>9.3f} {r['p2p_bytes'] / 1e6:>9.3f} "
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


def round_overhead(records: list[dict]) -> dict[str, float] | None:
    """Shares of the peers' round seconds (summed over all records with phases) spent outside
    `train` and `evaluate`: in all, in `wait_for_plan` (mostly waiting for slower peers to
    finish training) and in the rest (upload, fetch, merge, report, ... and untimed gaps).
    None when no record has phases or no time passed."""
    timed = [r for r in records if r.get("phase_seconds")]
    total = sum(r["seconds"] for r in timed)
    if not timed or total <= 0:
        return None
    work = sum(r["phase_seconds"].get(n, 0.0) for r in timed for n in ("train", "evaluate"))
    wait = sum(r["phase_seconds"].get("wait_for_plan", 0.0) for r in timed)
    outside = max(0.0, total - work)
    return {
        "outside": outside / total,
        "wait_for_plan": wait / total,
        "rest": max(0.0, outside - wait) / total,
    }


def format_overhead(share: dict[str, float]) -> str:
    return (
        f"outside train and evaluate: {share['outside']:.1%} of the peers' round time "
        f"(wait_for_plan {share['wait_for_plan']:.1%}, the rest {share['rest']:.1%})"
    )


def print_report(run_dir: Path, as_json: bool = False) -> int:
    summary_path = run_dir / "summary.json"
    summary = _load_json_object(summary_path)
    if as_json:
        if summary is None:
            raise SystemExit(f"report: {summary_path} not found")
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    records = load_records(run_dir, allow_empty=True)
    print(format_table(round_table(records)))
    names, phases = phase_table(records)
    if phases:
        print()
        print(format_phase_table(names, phases))
        share = round_overhead(records)
        if share:
            print(format_overhead(share))
    if summary:
        acc, gacc = summary["final_accuracy_mean"], summary["final_global_accuracy_mean"]
        val = summary.get("final_val_accuracy_mean")  # absent in runs from before it existed
        print(
            f"\n{summary['algorithm']}: {summary['peers']} peers, {summary['rounds']} rounds, "
            f"status {summary.get('status')}; final accuracy "
            f"{'n/a' if acc is None else f'{acc:.4f}'} (global {'n/a' if gacc is None else f'{gacc:.4f}'}, "
            f"val {'n/a' if val is None else f'{val:.4f}'}); "
            f"bytes coordinator {summary['bytes']['coordinator'] / 1e6:.3f} MB, "
            f"p2p {summary['bytes']['p2p'] / 1e6:.3f} MB"
        )
    return 0


# --- Several runs, per-round series (for `--csv` and `--plot`) -------------------------------


@dataclass
class Run:
    path: Path
    label: str  # legend and CSV name: the directory name, or the algorithm where names collide
    config: dict
    summary: dict | None
    records: list[dict]


def _load_json_object(path: Path) -> dict | None:
    """A JSON object file of a run directory, None when absent; anything else is an error."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"report: {path}: not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise SystemExit(f"report: {path}: not a JSON object")
    return value


def _labels(paths: list[Path], configs: list[dict]) -> list[str]:
    """Directory names; where two collide (runs/a/run, runs/b/run), the algorithm from
    config.json, then algorithm and seed, then the path itself."""
    names = [p.resolve().name or str(p) for p in paths]

    def fallback(i: int, level: int) -> str:
        algo = str(configs[i].get("algorithm", names[i]))
        return [algo, f"{algo} seed {configs[i].get('seed', '?')}", str(paths[i])][level]

    for level in range(3):
        dup = {n for n in names if names.count(n) > 1}
        if not dup:
            break
        names = [fallback(i, level) if n in dup else n for i, n in enumerate(names)]
    return names


def load_runs(run_dirs: list[Path]) -> list[Run]:
    records = [load_records(d) for d in run_dirs]  # checks each directory first
    configs = [_load_json_object(d / "config.json") or {} for d in run_dirs]
    summaries = [_load_json_object(d / "summary.json") for d in run_dirs]
    labels = _labels(run_dirs, configs)
    return [
        Run(d, label, cfg, summ, recs)
        for d, label, cfg, summ, recs in zip(
            run_dirs, labels, configs, summaries, records, strict=True
        )
    ]


def _coordinator_wire(summary: dict | None) -> dict[int, int]:
    """The coordinator's interface bytes (sent + received) per round, where it was measured."""
    try:
        by_round = summary["wire_bytes"]["by_role"]["coordinator"]["by_round"]  # type: ignore[index]
        return {
            int(r): v["sent"] + v["received"]
            for r, v in by_round.items()
            if _is_count(v.get("sent")) and _is_count(v.get("received"))
        }
    except (TypeError, KeyError, AttributeError, ValueError):
        return {}


def round_series(run: Run) -> list[dict]:
    """One row per round. Every message is counted once: a coordinator message has one peer end,
    so coordinator bytes = sum over peers of coordinator sent + received; a p2p message has a
    peer at both ends, so p2p bytes = sum over peers of p2p sent (= the sum of p2p received).
    Wire bytes (None where not measured): the peers' interfaces (sent + received) carry every
    coordinator packet once and every p2p packet twice, the coordinator's interface only
    coordinator packets; so wire coordinator = the coordinator's bytes and wire p2p = (peers' -
    coordinator's) / 2."""
    by_round: dict[int, list[dict]] = defaultdict(list)
    for rec in run.records:
        by_round[rec["round"]].append(rec)
    names, phase_rows = phase_table(run.records)
    phases = {row["round"]: row for row in phase_rows}
    coord_wire = _coordinator_wire(run.summary)
    rows: list[dict] = []
    cum = {"coordinator": 0, "p2p": 0}
    for r, recs in sorted(by_round.items()):
        n = len(recs)
        moved = bytes_moved(x["bytes"] for x in recs)  # each message once
        coordinator, p2p = moved["coordinator"], moved["p2p"]
        cum["coordinator"] += coordinator
        cum["p2p"] += p2p
        wires = [x.get("wire") for x in recs]
        peers_wire = sum(w["sent"] + w["received"] for w in wires if w) if all(wires) else None
        wire_coord = coord_wire.get(r) if peers_wire is not None else None
        wire_p2p = (
            (peers_wire - wire_coord) // 2
            if peers_wire is not None and wire_coord is not None
            else None
        )
        row = {
            "run": run.label,
            "algorithm": run.config.get("algorithm", recs[0].get("algorithm", "")),
            "seed": run.config.get("seed"),
            "round": r,
            "peers": n,
            "accuracy": sum(x["accuracy"] for x in recs) / n,
            "global_accuracy": sum(x["global_accuracy"] for x in recs) / n,
            "val_accuracy": _mean_val(recs),
            "loss": sum(x["loss"] for x in recs) / n,
            "coordinator_bytes": coordinator,
            "p2p_bytes": p2p,
            "bytes": coordinator + p2p,
            "cumulative_coordinator_bytes": cum["coordinator"],
            "cumulative_p2p_bytes": cum["p2p"],
            "cumulative_bytes": cum["coordinator"] + cum["p2p"],
            "wire_peers_bytes": peers_wire,
            "wire_coordinator_bytes": wire_coord,
            "wire_p2p_bytes": wire_p2p,
            "seconds": max(x["seconds"] for x in recs),
        }
        for name in names:
            row[f"phase_{name}"] = phases[r][name] if r in phases else None
        rows.append(row)
    return rows


CSV_FIELDS = [
    "run", "algorithm", "seed", "round", "peers", "accuracy", "global_accuracy", "val_accuracy",
    "loss",
    "coordinator_bytes", "p2p_bytes", "bytes", "cumulative_coordinator_bytes",
    "cumulative_p2p_bytes", "cumulative_bytes", "wire_peers_bytes", "wire_coordinator_bytes",
    "wire_p2p_bytes", "seconds",
]  # fmt: skip


def write_csv(runs: list[Run], path: Path) -> None:
    """One row per (run, round); a phase column for every phase any run has (empty where a
    round did not run it), in the order phases run. Empty cells: not measured."""
    series = [row for run in runs for row in round_series(run)]
    present = {k[len("phase_") :] for row in series for k in row if k.startswith("phase_")}
    phases = [n for n in PHASES if n in present] + sorted(present - set(PHASES))
    fields = CSV_FIELDS + [f"phase_{n}_seconds" for n in phases]
    rows = [
        {
            **{k: row[k] for k in CSV_FIELDS},
            **{f"phase_{n}_seconds": row.get(f"phase_{n}") for n in phases},
        }
        for row in series
    ]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    except OSError as e:
        raise SystemExit(f"report: cannot write {path}: {e}") from None
