"""The phases of a peer's round: timed on the peer, checked by the coordinator, written to
metrics.jsonl and shown by `fedmoe report`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmoe.common.accounting import PHASES
from fedmoe.common.proto import pb
from fedmoe.coordinator.service import _check_report
from fedmoe.peer.runner import PhaseTimer
from fedmoe.report import format_phase_table, phase_table, round_overhead

FEDMOE = [sys.executable, "-m", "fedmoe.cli"]
# Rounding to 4 decimals in the record, per phase and for the total.
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phases")
    args = ["local", "--peers", "2", "--rounds", "2", "--algorithm", "fedmoe-da"]
    args += ["--dataset", "synthetic", "--seed", "1", "--out", str(out)]
    proc = subprocess.run([*FEDMOE, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return out


def test_every_record_has_its_phases_within_the_round(run_dir: Path) -> None:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["round"], r["peer"]) for r in recs) == [
        (r, f"peer-{k}") for r in (1, 2) for k in range(2)
    ]
    for r in recs:
        phases = r["phase_seconds"]
        assert set(phases) <= set(PHASES)
        # fedmoe-da shares the embedding every round; experts move on even rounds (I = 2).
        required = {"train", "upload", "wait_for_plan", "merge", "evaluate", "report"}
        if r["round"] == 2:
            required |= {"fetch", "serve_wait"}
        else:
            assert "fetch" not in phases and "serve_wait" not in phases
        assert required <= set(phases), phases
        assert all(v >= 0 for v in phases.values()), phases
        assert phases["train"] > 0
        assert sum(phases.values()) <= r["seconds"] + TOLERANCE, r
        assert abs(phases["train"] - r["train_seconds"]) <= TOLERANCE


def test_report_shows_the_phase_table(run_dir: Path) -> None:
    proc = subprocess.run(
        [*FEDMOE, "report", str(run_dir)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    at = lines.index("seconds per phase (mean over peers)")
    head = lines[at + 1].split()
    assert head[:4] == ["round", "peers", "train", "upload"]
    assert "wait_for_plan" in head and "fetch" in head and "evaluate" in head
    assert lines[at + 3].split()[:2] == ["1", "2"] and lines[at + 4].split()[:2] == ["2", "2"]
    assert lines[at + 5].startswith("outside train and evaluate: ")


def test_round_overhead_shares_of_the_round_outside_train_and_evaluate() -> None:
    def rec(seconds: float, **phases: float) -> dict:
        return {"seconds": seconds, "phase_seconds": phases}

    records = [
        rec(10.0, train=6.0, upload=0.5, wait_for_plan=1.0, evaluate=2.0),  # 0.5 s untimed
        rec(10.0, train=7.0, upload=0.5, evaluate=2.5),
        {"seconds": 99.0, "phase_seconds": {}},  # an older record without phases: left out
    ]
    share = round_overhead(records)
    assert share is not None
    assert share["outside"] == pytest.approx(2.5 / 20)  # 20 s of rounds, 17.5 s train+evaluate
    assert share["wait_for_plan"] == pytest.approx(1.0 / 20)
    assert share["rest"] == pytest.approx(1.5 / 20)
    assert round_overhead(records[2:]) is None


def test_phase_timer_adds_up_disjoint_phases() -> None:
    timer = PhaseTimer()
    with timer.phase("upload"):
        time.sleep(0.01)
    with timer.phase("upload"):  # sent again: the phase adds up
        time.sleep(0.01)
    with timer.phase("evaluate"):
        pass
    assert timer.seconds["upload"] >= 0.02 and timer.seconds["evaluate"] >= 0
    assert sum(timer.seconds.values()) <= timer.elapsed()
    with pytest.raises(ValueError), timer.phase("nap"):
        pass
    with pytest.raises(RuntimeError), timer.phase("train"), timer.phase("fetch"):
        pass


def _report(**phases: float) -> pb.MetricsReport:
    r = pb.MetricsReport(peer_id="peer-0", round=1, accuracy=0.5, global_accuracy=0.5, seconds=2)
    r.phase_seconds.update(phases)
    return r


@pytest.mark.parametrize(
    ("phases", "problem"),
    [
        ({"train": 1.0, "upload": 0.5}, None),
        ({}, None),
        ({"train": float("nan")}, "finite"),
        ({"train": float("inf")}, "finite"),
        ({"train": -0.1}, "non-negative"),
        ({"train": 1e12}, "finite"),
        ({"coffee": 0.1}, "unknown phase"),
        ({"train": 1.5, "upload": 1.0}, "add up"),
    ],
)
def test_coordinator_checks_phase_seconds(phases: dict[str, float], problem: str | None) -> None:
    cfg = pb.RunConfig(peers=2, num_experts=4)
    found = _check_report(_report(**phases), cfg)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_phase_table_skips_records_without_phases() -> None:
    old = {"round": 1, "peer": "peer-0"}
    new = {"round": 1, "peer": "peer-1", "phase_seconds": {"train": 2.0, "merge": 1.0}}
    newer = {"round": 1, "peer": "peer-2", "phase_seconds": {"train": 4.0}}
    later = {"round": 2, "peer": "peer-2", "phase_seconds": {"train": 1.0}}
    names, rows = phase_table([old, new, newer, later])
    assert names == ["train", "merge"]
    assert rows == [
        {"round": 1, "peers": 2, "train": 3.0, "merge": 0.5},
        {"round": 2, "peers": 1, "train": 1.0, "merge": None},  # not run: shown as "-"
    ]
    assert format_phase_table(names, rows).splitlines()[-1].split() == ["2", "1", "1.000", "-"]
