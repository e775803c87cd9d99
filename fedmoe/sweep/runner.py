"""Running the runs of a sweep, resumably: a run's directory is RUNS/<name>-<hash of its flags>;
one whose summary.json says it completed is skipped, any other (crashed, killed, failed) is
cleared and run again. One progress line per run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from fedmoe.sweep.spec import Run

RUN_RECORD = "sweep-run.json"  # written by the sweep beside summary.json: flags, wall seconds
LOG = "sweep.log"  # stdout and stderr of `fedmoe local`

Launcher = Callable[[Run, Path], int]  # (run, its directory) -> exit status


def launch_local(run: Run, run_dir: Path) -> int:
    """A real `fedmoe local` run (coordinator + peer processes on loopback) in run_dir."""
    cmd = [sys.executable, "-m", "fedmoe.cli", "local", *run.flags, "--out", str(run_dir)]
    with (run_dir / LOG).open("w") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when absent, unreadable or not an object (a run cut short
    may leave anything)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def completed_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary.json if the run completed, else None. A summary alone is not enough:
    a coordinator whose peers all dropped out writes status "completed" with no round done and
    then exits non-zero, so the exit status the sweep recorded and the rounds count too."""
    summary = read_json(run_dir / "summary.json")
    if summary is None or summary.get("status", "completed") != "completed":
        return None
    record = read_json(run_dir / RUN_RECORD)
    if record is not None and record.get("exit_status") != 0:
        return None
    rounds = summary.get("rounds")
    if rounds is not None and summary.get("rounds_completed", rounds) != rounds:
        return None
    if summary.get("final_accuracy_mean") is None:
        return None
    return summary


@dataclass
class Outcome:
    run: Run
    run_dir: Path
    skipped: bool
    ok: bool
    seconds: float


def _result_text(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return ""

    def fmt(key: str) -> str:
        v = summary.get(key)
        return f"{v:.4f}" if isinstance(v, int | float) else "n/a"

    return (
        f"acc {fmt('final_accuracy_mean')} global {fmt('final_global_accuracy_mean')} "
        f"val {fmt('final_val_accuracy_mean')}"
    )


def execute(
    runs: list[Run],
    root: Path,
    launcher: Launcher = launch_local,
    out: TextIO | None = None,
    label: str = "",
) -> list[Outcome]:
    """Run every run not yet completed under root (each distinct flag list once), in order;
    progress lines to out (default: sys.stdout as it is at the call)."""
    out = out or sys.stdout
    unique: dict[str, Run] = {}
    for run in runs:
        unique.setdefault(run.key, run)
    todo = list(unique.values())
    started = time.monotonic()
    outcomes = []
    for k, run in enumerate(todo, 1):
        run_dir = root / run.name
        prefix = f"{label}[{k}/{len(todo)}] {run.name}"
        summary = completed_summary(run_dir)
        if summary is not None:
            print(f"{prefix}  done before  {_result_text(summary)}", file=out, flush=True)
            outcomes.append(Outcome(run, run_dir, True, True, 0.0))
            continue
        if run_dir.exists():  # a partial run: start it afresh, not on top of its leftovers
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        t0 = time.monotonic()
        code = launcher(run, run_dir)
        seconds = time.monotonic() - t0
        summary = completed_summary(run_dir)
        ok = code == 0 and summary is not None
        record = {"flags": list(run.flags), "exit_status": code, "wall_seconds": round(seconds, 2)}
        (run_dir / RUN_RECORD).write_text(json.dumps(record, indent=2))
        status = _result_text(summary) if ok else f"FAILED (exit {code}), see {run_dir / LOG}"
        print(
            f"{prefix}  {seconds:.1f} s (sweep {time.monotonic() - started:.0f} s)  {status}",
            file=out,
            flush=True,
        )
        outcomes.append(Outcome(run, run_dir, False, ok, seconds))
    return outcomes


def wall_seconds(run_dir: Path) -> float | None:
    """The wall time the sweep measured for a run, or the run's own (summary.json) if the sweep
    did not launch it."""
    record = read_json(run_dir / RUN_RECORD)
    if record and isinstance(record.get("wall_seconds"), int | float):
        return float(record["wall_seconds"])
    summary = read_json(run_dir / "summary.json")
    if summary and isinstance(summary.get("seconds"), int | float):
        return float(summary["seconds"])
    return None
