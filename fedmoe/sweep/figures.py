"""PNG plots of a sweep, one pair per setting: accuracy against round (mean over seeds, shaded
+- one std), and personalised accuracy against cumulative bytes (coordinator, p2p; mean over
seeds). Per-round numbers come from fedmoe.report.round_series (each message counted once)."""

from __future__ import annotations

import statistics
from pathlib import Path

from matplotlib.ticker import MaxNLocator

from fedmoe.plots import DPI, MB, Figure, run_colour
from fedmoe.report import load_runs, round_series


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def seed_bands(run_dirs: list[Path]) -> list[dict[str, float]]:
    """Per round held by every run: mean and std over the runs of accuracy, global accuracy and
    cumulative coordinator / p2p bytes."""
    series = [{row["round"]: row for row in round_series(run)} for run in load_runs(list(run_dirs))]
    rounds = sorted(set.intersection(*(set(s) for s in series))) if series else []
    bands = []
    for r in rounds:
        band: dict[str, float] = {"round": r}
        for key in (
            "accuracy",
            "global_accuracy",
            "cumulative_coordinator_bytes",
            "cumulative_p2p_bytes",
        ):
            band[key], band[f"{key}_std"] = _mean_std([s[r][key] for s in series])
        bands.append(band)
    return bands


def accuracy_figure(title: str, curves: dict[str, list[dict[str, float]]]) -> Figure:
    fig = Figure(figsize=(12, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, name in (
        (axes[0], "accuracy", "personalised accuracy (own test split)"),
        (axes[1], "global_accuracy", "global accuracy (shared test set)"),
    ):
        for i, (algorithm, bands) in enumerate(curves.items()):
            xs = [b["round"] for b in bands]
            ys = [b[key] for b in bands]
            sd = [b[f"{key}_std"] for b in bands]
            ax.plot(xs, ys, color=run_colour(i), marker="o", markersize=3, label=algorithm)
            ax.fill_between(
                xs,
                [y - s for y, s in zip(ys, sd, strict=True)],
                [y + s for y, s in zip(ys, sd, strict=True)],
                color=run_colour(i),
                alpha=0.2,
            )
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (mean over seeds, band: ± std)")
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    return fig


def bytes_figure(title: str, curves: dict[str, list[dict[str, float]]]) -> Figure:
    fig = Figure(figsize=(12, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, name in (
        (axes[0], "cumulative_coordinator_bytes", "coordinator (peer <-> coordinator)"),
        (axes[1], "cumulative_p2p_bytes", "p2p (peer <-> peer)"),
    ):
        for i, (algorithm, bands) in enumerate(curves.items()):
            ax.plot(
                [b[key] / MB for b in bands],
                [b["accuracy"] for b in bands],
                color=run_colour(i),
                marker="o",
                markersize=3,
                label=algorithm,
            )
        ax.set_title(name)
        ax.set_xlabel("cumulative application MB (mean over seeds)")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("personalised accuracy (mean over seeds)")
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    return fig


def write_setting_plots(
    setting: str, run_dirs: dict[str, list[Path]], out_dir: Path, stem: str
) -> list[Path]:
    """run_dirs: algorithm -> the directories of its seeds. Writes STEM-accuracy.png and
    STEM-bytes.png under out_dir; returns their paths."""
    curves = {a: seed_bands(dirs) for a, dirs in run_dirs.items() if dirs}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, make in (("accuracy", accuracy_figure), ("bytes", bytes_figure)):
        path = out_dir / f"{stem}-{kind}.png"
        make(setting, curves).savefig(path, dpi=DPI)
        paths.append(path)
    return paths
