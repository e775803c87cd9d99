"""results.json (every final run) and results.md (per setting: mean +- std over seeds; the
selected lr and the tuning table)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from fedmoe.sweep.runner import completed_summary, wall_seconds
from fedmoe.sweep.spec import Experiment, Run

MB = 1e6


def run_result(run: Run, root: Path) -> dict[str, Any]:
    """One final run as a results.json row; bytes are summary.json's `bytes` (each message
    counted once: coordinator = sent + received of every peer, p2p = what the peers sent)."""
    run_dir = root / run.name
    summary = completed_summary(run_dir)
    if summary is None:
        raise RuntimeError(f"{run_dir} has not completed")
    moved = summary.get("bytes") or {}
    return {
        "algorithm": run.algorithm,
        "setting": run.setting,
        "seed": run.seed,
        "lr": run.lr,
        "flags": list(run.flags),
        "run_dir": str(run_dir),
        "final_accuracy": summary.get("final_accuracy_mean"),
        "final_global_accuracy": summary.get("final_global_accuracy_mean"),
        "final_val_accuracy": summary.get("final_val_accuracy_mean"),
        "bytes_coordinator": moved.get("coordinator"),
        "bytes_p2p": moved.get("p2p"),
        "wall_seconds": wall_seconds(run_dir),
    }


def write_json(
    path: Path,
    exp: Experiment,
    rows: list[dict[str, Any]],
    selected: dict[str, float],
    tuning: dict[str, dict[float, float]],
    machine: str,
) -> None:
    data = {
        "experiment": str(exp.path),
        "machine": machine,
        "selected_lr": selected,
        "tuning": {
            "seeds": list(exp.tune_seeds),
            "settings": list(exp.tune_settings),
            "val_accuracy": {a: {repr(lr): v for lr, v in t.items()} for a, t in tuning.items()},
        },
        "runs": rows,
    }
    path.write_text(json.dumps(data, indent=2))


def mean_std(values: list[float | None]) -> tuple[float, float, int] | None:
    """Mean, sample standard deviation (0 for one value) and count of the numbers given."""
    xs = [float(v) for v in values if isinstance(v, int | float) and not math.isnan(v)]
    if not xs:
        return None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs)


def _cell(values: list[float | None], scale: float = 1.0, digits: int = 4) -> str:
    ms = mean_std(values)
    if ms is None:
        return "n/a"
    m, s, _ = ms
    return f"{m / scale:.{digits}f} ± {s / scale:.{digits}f}"


def setting_table(rows: list[dict[str, Any]], algorithms: list[str]) -> list[str]:
    lines = [
        "| algorithm | lr | seeds | personalised acc | global acc | coordinator MB | p2p MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in algorithms:
        mine = [r for r in rows if r["algorithm"] == a]
        if not mine:
            continue
        lines.append(
            f"| {a} | {mine[0]['lr']:g} | {len(mine)} "
            f"| {_cell([r['final_accuracy'] for r in mine])} "
            f"| {_cell([r['final_global_accuracy'] for r in mine])} "
            f"| {_cell([r['bytes_coordinator'] for r in mine], MB, 2)} "
            f"| {_cell([r['bytes_p2p'] for r in mine], MB, 2)} |"
        )
    return lines


def tuning_lines(
    exp: Experiment, tuning: dict[str, dict[float, float]], selected: dict[str, float]
) -> list[str]:
    grid = list(exp.lr_grid)
    lines = [
        "| algorithm | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | selected |",
        "|---|" + "---|" * (len(grid) + 1),
    ]
    for a, by_lr in tuning.items():
        cells = [
            (f"**{by_lr[lr]:.4f}**" if lr == selected[a] else f"{by_lr[lr]:.4f}")
            if lr in by_lr
            else "-"
            for lr in grid
        ]
        lines.append(f"| {a} | " + " | ".join(cells) + f" | {selected[a]:g} |")
    return lines


def format_markdown(
    exp: Experiment,
    rows: list[dict[str, Any]],
    selected: dict[str, float],
    tuning: dict[str, dict[float, float]],
    machine: str,
    plots: dict[str, list[str]] | None = None,
) -> str:
    algorithms = list(exp.algorithms)
    out = [
        f"# Results of {exp.path.name}",
        "",
        f"Machine: {machine}. Base flags: `{' '.join(exp.base)}`. Seeds: "
        f"{', '.join(map(str, exp.seeds))}. Cells: mean ± sample std over seeds of the final "
        "round (accuracy: mean over peers; personalised = each peer's own test split, global = "
        "the shared test set). Bytes: application bytes, each message counted once.",
        "",
    ]
    for name, setting in exp.settings.items():
        mine = [r for r in rows if r["setting"] == name]
        out += [f"## {name}", "", f"Flags: `{' '.join(setting.flags) or '(none)'}`", ""]
        out += setting_table(mine, algorithms)
        for path in (plots or {}).get(name, []):
            out += ["", f"![{name}]({path})"]
        out.append("")
    out += [
        "## Learning rate (tuned on validation accuracy)",
        "",
        f"Each algorithm ran the same grid ({', '.join(f'{lr:g}' for lr in exp.lr_grid)}) on "
        f"settings {', '.join(exp.tune_settings)} with seeds "
        f"{', '.join(map(str, exp.tune_seeds))}; a cell is final_val_accuracy_mean (the split "
        "carved from each peer's training data) averaged over them. Test accuracy plays no part "
        "in the choice (bold: selected).",
        "",
        *tuning_lines(exp, tuning, selected),
        "",
    ]
    return "\n".join(out)
