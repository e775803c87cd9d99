"""`fedmoe report --plot / --csv` on real runs: two tiny `fedmoe local` runs (real processes,
real gRPC) whose directories share a name, so the overlay must tell them apart by algorithm."""

from __future__ import annotations

import csv
import json
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from fedmoe.cli import main as cli_main
from fedmoe.plots import figures, write_plots
from fedmoe.report import load_runs, round_series

FEDMOE = [sys.executable, "-m", "fedmoe.cli"]
ALGORITHMS = ("fedmoe-da", "fedavg")
PLOTS = ("accuracy", "bytes", "bytes_vs_accuracy", "phases")


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDMOE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("plots")
    dirs = []
    for k, algorithm in enumerate(ALGORITHMS):
        run_dir = root / f"seed-{k}" / "run"  # same name: labels fall back to the algorithm
        proc = run_cli(
            "local",
            "--peers",
            "2",
            "--rounds",
            "2",
            "--algorithm",
            algorithm,
            "--dataset",
            "digits",
            "--out",
            str(run_dir),
        )
        assert proc.returncode == 0, f"{algorithm} failed:\n{proc.stdout}\n{proc.stderr}"
        dirs.append(run_dir)
    return dirs


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_plot_and_csv_from_the_command_line(runs: list[Path], tmp_path: Path) -> None:
    out, table = tmp_path / "plots", tmp_path / "rounds.csv"
    proc = run_cli("report", *map(str, runs), "--plot", str(out), "--csv", str(table))
    assert proc.returncode == 0, proc.stderr
    for name in PLOTS:
        path = out / f"{name}.png"
        assert str(path) in proc.stdout
        width, height = png_size(path)
        assert width >= 400 and height >= 300, (name, width, height)
        assert path.stat().st_size > 10_000, name
    assert table.is_file()


def test_combined_png(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "sub" / "all.png"
    assert write_plots(load_runs(runs), out) == [out]
    width, height = png_size(out)
    assert width >= 800 and height > width  # four plots stacked
    assert out.stat().st_size > 30_000


def test_runs_overlay_with_distinct_labels(runs: list[Path]) -> None:
    loaded = load_runs(runs)
    assert [r.label for r in loaded] == list(ALGORITHMS)  # both directories are named "run"
    figs = figures(loaded)
    for name in ("accuracy", "bytes_vs_accuracy"):
        legend = figs[name].axes[0].get_legend()
        assert [t.get_text() for t in legend.get_texts()] == list(ALGORITHMS), name
    # The accuracy panel: per run one mean line and one faint line per peer (2 peers).
    assert len(figs["accuracy"].axes[0].get_lines()) == 2 * (1 + 2)
    # Phases: one panel per run, each titled with its label.
    titles = [ax.get_title(loc="left") for ax in figs["phases"].axes]
    assert titles == list(ALGORITHMS)


def test_csv_counts_each_message_once(runs: list[Path], tmp_path: Path) -> None:
    table = tmp_path / "rounds.csv"
    assert cli_main(["report", *map(str, runs), "--csv", str(table)]) == 0
    with table.open() as f:
        rows = list(csv.DictReader(f))
    assert {"run", "round", "accuracy", "global_accuracy", "coordinator_bytes", "p2p_bytes"} <= set(
        rows[0]
    )
    assert {"cumulative_bytes", "phase_train_seconds", "wire_p2p_bytes"} <= set(rows[0])
    assert [(r["run"], r["round"]) for r in rows] == [
        (a, str(k)) for a in ALGORITHMS for k in (1, 2)
    ]
    p2p_total = 0
    for algorithm, run_dir in zip(ALGORITHMS, runs, strict=True):
        by_round: dict[int, list[dict]] = defaultdict(list)
        for rec in records(run_dir):
            by_round[rec["round"]].append(rec)
        mine = [r for r in rows if r["run"] == algorithm]
        cumulative = 0
        for row in mine:
            recs = by_round[int(row["round"])]
            coordinator = sum(
                x["bytes"]["coordinator_sent"] + x["bytes"]["coordinator_received"] for x in recs
            )
            p2p = sum(x["bytes"]["p2p_sent"] for x in recs)
            # A p2p message has a peer at both ends: the received side sums to the same figure.
            assert p2p == sum(x["bytes"]["p2p_received"] for x in recs)
            assert int(row["coordinator_bytes"]) == coordinator > 0
            assert int(row["p2p_bytes"]) == p2p
            cumulative += coordinator + p2p
            assert int(row["cumulative_bytes"]) == cumulative
            assert float(row["accuracy"]) == pytest.approx(
                sum(x["accuracy"] for x in recs) / len(recs)
            )
            assert row["wire_p2p_bytes"] == ""  # loopback: not measured
            assert float(row["phase_train_seconds"]) > 0
            p2p_total += p2p
        # summary.json counts each message once too: the same figures.
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["bytes"]["p2p"] == sum(int(r["p2p_bytes"]) for r in mine)
    assert p2p_total > 0  # fedmoe-da streamed experts between the peers


def test_wire_bytes_split_by_class(runs: list[Path], tmp_path: Path) -> None:
    """Records with wire counters and a measured coordinator interface (as in containers):
    wire coordinator = the coordinator's bytes, wire p2p = (peers' - coordinator's) / 2."""
    run_dir = tmp_path / "wired"
    run_dir.mkdir()
    recs = records(runs[0])
    for rec in recs:
        rec["wire"] = {"sent": 5000 + rec["round"], "received": 7000, "interfaces": ["eth0"]}
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    coordinator = {"1": {"sent": 3000, "received": 2000}, "2": {"sent": 3000, "received": 3000}}
    summary = {"wire_bytes": {"by_role": {"coordinator": {"by_round": coordinator}}}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    run = load_runs([run_dir])
    rows = round_series(run[0])
    for row in rows:
        peers = 2 * (5000 + row["round"] + 7000)
        coord = sum(coordinator[str(row["round"])].values())
        assert row["wire_peers_bytes"] == peers
        assert row["wire_coordinator_bytes"] == coord
        assert row["wire_p2p_bytes"] == (peers - coord) // 2
    axes = figures(run)["bytes"].axes
    assert len(axes) == 3  # a panel for the peers' interfaces
    assert any(line.get_linestyle() == ":" for line in axes[1].get_lines())  # wire p2p, dotted


def test_text_table_of_several_runs(runs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", *map(str, runs)]) == 0
    out = capsys.readouterr().out
    assert out.count("coord MB") == 2 and f"== {runs[1]}" in out


def test_bad_directories_are_named(
    runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope"
    proc = run_cli("report", str(runs[0]), str(missing), "--plot", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written before the input is checked

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "metrics.jsonl").write_text((runs[0] / "metrics.jsonl").read_text() + "{oops\n")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "metrics.jsonl").write_text(json.dumps({"round": 1, "peer": "p", "accuracy": "x"}))
    cases = {
        empty: "holds no records",
        garbled: "line 5: not JSON",
        wrong: "'accuracy' is missing or not a number",
        tmp_path / "nothing-here": "not a directory",
    }
    for bad, message in cases.items():
        code = cli_main(["report", str(bad), "--csv", str(tmp_path / "x.csv")])
        err = capsys.readouterr().err
        assert code == 2 and str(bad) in err and message in err, (bad, err)
    assert not (tmp_path / "x.csv").exists()
