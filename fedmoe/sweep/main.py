"""`fedmoe sweep CONFIG [--out DIR] [--dry-run]`: tune, run, tabulate and plot an experiment
file (fedmoe/sweep/spec.py documents it). Run it again after a stop: completed runs are kept."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import TextIO

from fedmoe.sweep.results import format_markdown, run_result, write_json
from fedmoe.sweep.runner import (
    Launcher,
    completed_summary,
    execute,
    launch_local,
    read_json,
    wall_seconds,
)
from fedmoe.sweep.select import SelectionError, select_lr, tuning_table
from fedmoe.sweep.spec import Experiment, Run, SpecError, load_experiment

RUNS = "runs"  # OUT/runs/<name>-<hash>: tuning and final runs share it (equal flags, one run)


class SweepError(RuntimeError):
    pass


def machine() -> str:
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - only a label
        pass
    return (
        f"{os.cpu_count()}-core {platform.machine()} CPU, {gpu}, Python {platform.python_version()}"
    )


def run_shape(flags: tuple[str, ...]) -> tuple[int, int]:
    """(rounds, peers) of a run, checking its flags as `fedmoe local` would, before anything
    runs: a typo fails now, not hours into the sweep."""
    from fedmoe.cli import config_from_args, parse_args
    from fedmoe.common.config import ConfigError

    try:
        cfg = config_from_args(parse_args(["local", *flags]))
    except SystemExit:  # argparse has said what is wrong
        raise SpecError(f"bad flags: {' '.join(flags)}") from None
    except ConfigError as e:
        raise SpecError(f"{e} (flags: {' '.join(flags)})") from None
    return cfg.rounds, cfg.peers


def measured_rate(root: Path) -> float | None:
    """Seconds per (peer x round) of the runs this sweep has completed, or None."""
    rates = []
    for d in root.glob("*") if root.is_dir() else []:
        summary = completed_summary(d)
        wall = wall_seconds(d) if read_json(d / "sweep-run.json") else None
        if summary and wall and summary.get("rounds") and summary.get("peers"):
            rates.append(wall / (summary["rounds"] * summary["peers"]))
    return sum(rates) / len(rates) if rates else None


def dry_run(exp: Experiment, root: Path, out: TextIO) -> None:
    try:
        selected: dict[str, float] | None = select_lr(tuning_table(exp, root))
    except SelectionError:
        selected = None
    placeholder = {a: exp.lr_grid[0] for a in exp.algorithms}
    finals = exp.final_runs(selected or placeholder)
    rate = measured_rate(root)
    source = "measured on the completed runs here"
    if rate is None and exp.seconds_per_peer_round is not None:
        rate, source = exp.seconds_per_peer_round, "[estimate] of the experiment file"
    # Before tuning ends, the final run of a tuned (algorithm, setting, seed) is the tuning run
    # at the lr it will select: already counted in the tuning phase.
    tuned = {(r.algorithm, r.setting, r.seed) for r in exp.tuning_runs()}
    seen: set[str] = set()
    pending_work = 0
    for phase, runs in (("tune", exp.tuning_runs()), ("final", finals)):
        print(f"== {phase}", file=out)
        for run in runs:
            if run.key in seen:
                continue
            seen.add(run.key)
            if selected is None and phase == "final":
                if (run.algorithm, run.setting, run.seed) in tuned:
                    continue
            rounds, peers = run_shape(run.flags)
            done = completed_summary(root / run.name) is not None
            if not done:
                pending_work += rounds * peers
            name = run.name if (phase == "tune" or selected) else f"{run.name} (lr to be tuned)"
            print(
                f"  {'done' if done else 'todo'}  {name}  {rounds} rounds x {peers} peers", file=out
            )
    todo = "unknown: time one run, or give [estimate] seconds_per_peer_round"
    if rate is not None:
        todo = f"~{pending_work * rate / 60:.0f} min ({rate:.2f} s per peer-round, {source})"
    print(f"work left: {pending_work} peer-rounds; time {todo}", file=out)


def _check_all(exp: Experiment) -> None:
    for run in exp.tuning_runs() + exp.final_runs({a: exp.lr_grid[0] for a in exp.algorithms}):
        run_shape(run.flags)


def _failed(phase: str, outcomes: list) -> None:  # type: ignore[type-arg]
    bad = [o for o in outcomes if not o.ok]
    if bad:
        dirs = "\n  ".join(str(o.run_dir) for o in bad)
        raise SweepError(f"{len(bad)} {phase} run(s) failed (logs inside):\n  {dirs}")


def sweep(
    exp: Experiment,
    out_dir: Path,
    launcher: Launcher = launch_local,
    out: TextIO | None = None,
    check_flags: bool = True,
) -> Path:
    """Tune, run, write results.json, results.md and plots/ under out_dir; return results.md."""
    out = out or sys.stdout
    root = out_dir / RUNS
    if check_flags:
        _check_all(exp)
    t0 = time.monotonic()
    _failed("tuning", execute(exp.tuning_runs(), root, launcher, out, "tune "))
    tuning = tuning_table(exp, root)
    selected = select_lr(tuning)
    print(
        "selected lr (validation accuracy): "
        + ", ".join(f"{a} {lr:g}" for a, lr in selected.items()),
        file=out,
    )
    finals = exp.final_runs(selected)
    _failed("final", execute(finals, root, launcher, out, "final "))
    rows = [run_result(run, root) for run in finals]
    label = machine()
    write_json(out_dir / "results.json", exp, rows, selected, tuning, label)
    from fedmoe.sweep.figures import write_setting_plots  # matplotlib: only when plotting

    plots: dict[str, list[str]] = {}
    for k, setting in enumerate(exp.settings):
        dirs: dict[str, list[Path]] = {}
        for run in finals:
            if run.setting == setting:
                dirs.setdefault(run.algorithm, []).append(root / run.name)
        paths = write_setting_plots(
            setting, dirs, out_dir / "plots", f"{k:02d}-{Run.safe(setting)}"
        )
        plots[setting] = [str(p.relative_to(out_dir)) for p in paths]
    md = out_dir / "results.md"
    md.write_text(format_markdown(exp, rows, selected, tuning, label, plots))
    print(
        f"sweep done in {time.monotonic() - t0:.0f} s: {md}, {out_dir / 'results.json'}", file=out
    )
    return md


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", type=Path, metavar="CONFIG", help="experiment TOML file")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: the file's `out`, else runs/sweep-<file name>)",
    )
    p.add_argument("--dry-run", action="store_true", help="list the runs and the time left")


def run_sweep(args: argparse.Namespace) -> int:
    try:
        exp = load_experiment(args.experiment)
        out_dir = args.out or exp.out or Path("runs") / f"sweep-{args.experiment.stem}"
        if args.dry_run:
            dry_run(exp, out_dir / RUNS, sys.stdout)
            return 0
        sweep(exp, out_dir)
        return 0
    except (SpecError, SelectionError, SweepError) as e:
        print(f"fedmoe sweep: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedmoe sweep", description=__doc__)
    add_sweep_args(parser)
    return run_sweep(parser.parse_args(argv))
