"""`fedmoe report DIR... --plot OUT`: PNG figures of one or several run directories.

Figures are drawn on matplotlib `Figure` objects directly (Agg canvas, no pyplot state), so the
drawing functions take a Figure or a SubFigure and one layout serves both the four files of
`--plot DIR` and the single combined picture of `--plot FILE.png`. Runs overlay with one colour
each; the numbers come from fedmoe.report.round_series (each message counted once).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure, SubFigure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedmoe.common.accounting import PHASES  # noqa: E402
from fedmoe.report import Run, round_series  # noqa: E402

MB = 1e6
DPI = 90
Canvas = Figure | SubFigure


def run_colour(i: int) -> str:
    return f"C{i % 10}"


def _rounds_axis(ax: Axes) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)


def draw_accuracy(fig: Canvas, runs: list[Run]) -> list[Axes]:
    """Personalised and global accuracy per round: the mean over peers as a line, each peer
    faintly in the same colour."""
    axes = list(fig.subplots(1, 2, sharey=True))
    for ax, key, title in (
        (axes[0], "accuracy", "personalised accuracy (own test split)"),
        (axes[1], "global_accuracy", "global accuracy (shared test set)"),
    ):
        for i, run in enumerate(runs):
            per_peer: dict[str, list[tuple[int, float]]] = defaultdict(list)
            for rec in run.records:
                per_peer[rec["peer"]].append((rec["round"], rec[key]))
            for points in per_peer.values():
                xs, ys = zip(*sorted(points), strict=True)
                ax.plot(xs, ys, color=run_colour(i), alpha=0.25, linewidth=0.8)
            rows = round_series(run)
            ax.plot(
                [r["round"] for r in rows],
                [r[key] for r in rows],
                color=run_colour(i),
                linewidth=2,
                marker="o",
                markersize=3,
                label=run.label,
            )
        ax.set_title(title)
        _rounds_axis(ax)
    axes[0].set_ylabel("accuracy (line: mean over peers; faint: each peer)")
    axes[0].legend(fontsize="small")
    return axes


def draw_bytes(fig: Canvas, runs: list[Run]) -> list[Axes]:
    """Application bytes per round by class (bars), wire bytes (dotted, diamonds) where
    measured."""
    series = [round_series(run) for run in runs]
    peers_wire = any(r["wire_peers_bytes"] is not None for rows in series for r in rows)
    axes = list(fig.subplots(1, 3 if peers_wire else 2))
    panels = [
        (
            axes[0],
            "coordinator_bytes",
            "wire_coordinator_bytes",
            "coordinator (peer <-> coordinator)",
        ),
        (axes[1], "p2p_bytes", "wire_p2p_bytes", "p2p (peer <-> peer, each message once)"),
    ]
    # Bars, side by side per round (one per run): a class is often silent in some rounds (p2p
    # only on sync rounds), which a line would hide by joining the points.
    width = 0.8 / len(runs)
    for ax, app, wire, title in panels:
        for i, rows in enumerate(series):
            xs = [r["round"] - 0.4 + width * (i + 0.5) for r in rows]
            ax.bar(
                xs,
                [r[app] / MB for r in rows],
                width=width,
                color=run_colour(i),
                label=f"{runs[i].label} (application)",
            )
            wired = [
                (x, r[wire] / MB) for x, r in zip(xs, rows, strict=True) if r[wire] is not None
            ]
            if wired:
                ax.plot(
                    *zip(*wired, strict=True),
                    color="black",
                    markerfacecolor=run_colour(i),
                    marker="D",
                    markersize=4,
                    linestyle=":",
                    label=f"{runs[i].label} (wire)",
                )
        ax.set_title(title)
        ax.set_ylabel("MB per round")
        ax.set_ylim(bottom=0)
        _rounds_axis(ax)
    if peers_wire:
        ax = axes[2]
        for i, rows in enumerate(series):
            wired = [
                (r["round"], r["wire_peers_bytes"] / MB)
                for r in rows
                if r["wire_peers_bytes"] is not None
            ]
            if wired:
                ax.plot(
                    *zip(*wired, strict=True),
                    color=run_colour(i),
                    linestyle=":",
                    label=f"{runs[i].label} (wire)",
                )
        ax.set_title("wire, peers' interfaces (sent + received)")
        ax.set_ylabel("MB per round")
        ax.set_ylim(bottom=0)
        _rounds_axis(ax)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize="small", loc="outside right upper")  # clear of the bars
    return axes


def draw_bytes_vs_accuracy(fig: Canvas, runs: list[Run]) -> list[Axes]:
    """Mean personalised accuracy against the bytes spent so far: all, coordinator, p2p."""
    axes = list(fig.subplots(1, 3, sharey=True))
    panels = (
        ("cumulative_bytes", "coordinator + p2p"),
        ("cumulative_coordinator_bytes", "coordinator"),
        ("cumulative_p2p_bytes", "p2p"),
    )
    for ax, (key, title) in zip(axes, panels, strict=True):
        for i, run in enumerate(runs):
            rows = round_series(run)
            ax.plot(
                [r[key] / MB for r in rows],
                [r["accuracy"] for r in rows],
                color=run_colour(i),
                marker="o",
                markersize=3,
                label=run.label,
            )
        ax.set_title(title)
        ax.set_xlabel("cumulative application MB")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean accuracy (personalised)")
    axes[0].legend(fontsize="small")
    return axes


def draw_phases(fig: Canvas, runs: list[Run]) -> list[Axes]:
    """Seconds per round split into phases (mean over peers), stacked; one panel per run."""
    series = [round_series(run) for run in runs]
    present = {
        k[len("phase_") :] for rows in series for r in rows for k in r if k.startswith("phase_")
    }
    names = [n for n in PHASES if n in present] + sorted(present - set(PHASES))
    # Set1, not the run colours (tab10): a phase is never mistaken for a run.
    colours = {n: matplotlib.colormaps["Set1"](k % 9) for k, n in enumerate(names)}
    axes = list(fig.subplots(len(runs), 1, sharex=True, sharey=True, squeeze=False)[:, 0])
    top = _phase_axis_top(series, names)
    for i, (ax, rows) in enumerate(zip(axes, series, strict=True)):
        xs = [r["round"] for r in rows]
        bottom = [0.0] * len(rows)
        for name in names:
            heights = [r.get(f"phase_{name}") or 0.0 for r in rows]
            ax.bar(xs, heights, bottom=bottom, color=colours[name], label=name, width=0.8)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        if top is not None:
            ax.set_ylim(0, top)
            for x, total in zip(xs, bottom, strict=True):
                if total > top:  # cut: its total written on it
                    ax.text(
                        x,
                        top * 0.97,
                        f"{total:.1f} s",
                        ha="center",
                        va="top",
                        fontsize="x-small",
                        color="white",
                        fontweight="bold",
                    )
        ax.set_title(runs[i].label, color=run_colour(i), fontsize="medium", loc="left")
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3, axis="y")
        if not names:
            ax.text(
                0.5, 0.5, "no phase_seconds in these records", transform=ax.transAxes, ha="center"
            )
    _rounds_axis(axes[-1])
    axes[-1].grid(alpha=0.3, axis="y")
    if names:
        axes[0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(
        "round time by phase (mean over peers)"
        + ("; longer rounds cut, their total written on them" if top is not None else "")
    )
    return axes


def _phase_axis_top(series: list[list[dict]], names: list[str]) -> float | None:
    """Where to cut the seconds axis, or None: a round far longer than the typical one (the
    first, which pays for process and torch warm-up) would flatten every other bar."""
    totals = sorted(sum(r.get(f"phase_{n}") or 0.0 for n in names) for rows in series for r in rows)
    if len(totals) < 3:
        return None
    typical = totals[len(totals) // 2]
    return 4 * typical if totals[-1] > 5 * typical > 0 else None


Drawer = Callable[[Canvas, list[Run]], list[Axes]]
PLOTS: dict[str, tuple[Drawer, float]] = {  # name -> (drawing, height in inches per row/run)
    "accuracy": (draw_accuracy, 4.0),
    "bytes": (draw_bytes, 4.0),
    "bytes_vs_accuracy": (draw_bytes_vs_accuracy, 4.0),
    "phases": (draw_phases, 2.2),
}
WIDTH = 12.0


def _height(name: str, runs: list[Run]) -> float:
    per = PLOTS[name][1]
    return per * len(runs) + 0.8 if name == "phases" else per


def figures(runs: list[Run]) -> dict[str, Figure]:
    """One figure per plot, by name (the file name without .png)."""
    out = {}
    for name, (draw, _) in PLOTS.items():
        fig = Figure(figsize=(WIDTH, _height(name, runs)), layout="constrained")
        draw(fig, runs)
        out[name] = fig
    return out


def combined_figure(runs: list[Run]) -> Figure:
    """All plots, one above the other, in one figure."""
    heights = [_height(name, runs) for name in PLOTS]
    fig = Figure(figsize=(WIDTH, sum(heights)), layout="constrained")
    subfigs = fig.subfigures(len(PLOTS), 1, height_ratios=heights)
    assert not isinstance(subfigs, SubFigure)  # an array for more than one row
    for sub, (draw, _) in zip(subfigs, PLOTS.values(), strict=True):
        draw(sub, runs)
    return fig


def write_plots(runs: list[Run], out: Path, dpi: int = DPI) -> list[Path]:
    """OUT ending in .png: one combined figure there; otherwise OUT is a directory (created)
    that gets accuracy.png, bytes.png, bytes_vs_accuracy.png and phases.png."""
    try:
        if out.suffix.lower() == ".png":
            out.parent.mkdir(parents=True, exist_ok=True)
            combined_figure(runs).savefig(out, dpi=dpi)
            return [out]
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, fig in figures(runs).items():
            path = out / f"{name}.png"
            fig.savefig(path, dpi=dpi)
            paths.append(path)
        return paths
    except OSError as e:
        raise SystemExit(f"report: cannot write plots to {out}: {e}") from None


def accuracy_vs_time_figure(
    lines: dict[str, list[tuple[float, float]]],
    target: float | None,
    title: str,
    metric: str = "accuracy",
) -> Figure:
    """Mean accuracy against wall-clock seconds, one line per algorithm (bench/scenario.py),
    with the target accuracy as a dashed line."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    for i, (name, points) in enumerate(lines.items()):
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, color=run_colour(i), label=name)
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3f}")
    ax.set_xlabel("wall-clock seconds since the first round started")
    ax.set_ylabel(f"mean {metric} over peers")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
