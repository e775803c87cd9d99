"""Choosing each algorithm's learning rate on the validation split, never on test accuracy.

The score of an lr is final_val_accuracy_mean of summary.json (the mean over peers of the
accuracy on the validation split carved from each peer's training data), averaged over the
tuning seeds and settings; the highest wins, the first in grid order on a tie."""

from __future__ import annotations

import math
from pathlib import Path

from fedmoe.sweep.runner import completed_summary
from fedmoe.sweep.spec import Experiment, Run

VAL_KEY = "final_val_accuracy_mean"


class SelectionError(RuntimeError):
    """The tuning runs cannot select an lr (missing, failed, or without a validation split)."""


def val_accuracy(run: Run, root: Path) -> float:
    run_dir = root / run.name
    summary = completed_summary(run_dir)
    if summary is None:
        raise SelectionError(f"tuning run {run_dir} has not completed")
    value = summary.get(VAL_KEY)
    if value is None:
        raise SelectionError(
            f"{run_dir}/summary.json has no {VAL_KEY}: the runs need a validation split, "
            "--val-fraction > 0 in base (lr is selected on validation accuracy, never on test)"
        )
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise SelectionError(f"{run_dir}/summary.json: {VAL_KEY} is not a number")
    return float(value)


def tuning_table(exp: Experiment, root: Path) -> dict[str, dict[float, float]]:
    """algorithm -> lr -> mean validation accuracy over the tuning seeds and settings."""
    scores: dict[str, dict[float, list[float]]] = {}
    for run in exp.tuning_runs():
        scores.setdefault(run.algorithm, {}).setdefault(run.lr, []).append(val_accuracy(run, root))
    return {a: {lr: sum(v) / len(v) for lr, v in by_lr.items()} for a, by_lr in scores.items()}


def select_lr(table: dict[str, dict[float, float]]) -> dict[str, float]:
    def score(item: tuple[float, float]) -> float:
        return -math.inf if math.isnan(item[1]) else item[1]

    # max keeps the first of equal scores: grid order decides a tie
    return {a: max(by_lr.items(), key=score)[0] for a, by_lr in table.items()}
