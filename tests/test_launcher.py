"""`fedmoe local` keeps going when a peer process dies: only the coordinator's exit ends the run.

The kill is armed through FEDMOE_FAULTS with a target (`kill_after_round=1@peer-2`), so it lands
in the one process that hosts peer-2, right after that peer reported round 1, every time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from fedmoe.common import faults
from tests.cluster import FEDMOE

RUN = [
    *("--dataset", "synthetic", "--seed", "4", "--rounds", "3"),
    *("--embed-dim", "16", "--expert-hidden", "8", "--experts", "4"),
    *("--peer-timeout", "3", "--round-timeout", "60", "--sync-every", "1"),
]


def test_a_killed_peer_host_leaves_the_run_going(tmp_path: Path) -> None:
    env = {**os.environ, "FEDMOE_FAULTS": "kill_after_round=1@peer-2"}
    proc = subprocess.run(
        [*FEDMOE, "local", "--peers", "6", "--procs", "3", "--min-peers", "3", *RUN]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    killed = -signal.SIGKILL
    assert "peer host peers 2-3 (pid " in proc.stderr
    assert f"exited {killed}; the run goes on while the quorum holds" in proc.stderr
    assert "FAULT INJECTED: kill after round 1 (peer-2)" in (tmp_path / "peers-2-3.log").read_text()

    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "completed" and s["rounds_completed"] == 3
    # Both peers of the dead process are gone; the others took part in every round.
    assert s["dropped_peers"] == ["peer-2", "peer-3"]
    assert s["membership"]["peer-2"]["rounds_missed"] == [2, 3]
    exited = s["launcher"]["exited_early"]
    assert [(e["process"], e["indices"], e["exit"]) for e in exited] == [
        ("peers 2-3", [2, 3], killed)
    ]
    assert s["launcher"]["processes"] == 3 and s["launcher"]["stopped_after_the_run"] == []
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for k in (0, 1, 4, 5):
        assert sorted(r["round"] for r in recs if r["peer"] == f"peer-{k}") == [1, 2, 3]
    assert [r["round"] for r in recs if r["peer"] == "peer-2"] == [1]  # killed after reporting


@pytest.mark.parametrize(
    ("spec", "target", "expected"),
    [
        ("kill_after_round=1@peer-2", "peer-2", 1),
        ("kill_after_round=1@peer-2", "peer-3", None),
        ("kill_after_round=1@peer-2", None, None),  # the coordinator never takes a targeted one
        ("kill_after_round=2", "peer-5", 2),
        ("kill_after_round=2,kill_after_round=1@peer-5", "peer-5", 1),
        ("kill_after_served_chunks=20@peer-0", "peer-0", None),  # another point
    ],
)
def test_targeted_faults(
    monkeypatch: pytest.MonkeyPatch, spec: str, target: str | None, expected: int | None
) -> None:
    monkeypatch.setenv("FEDMOE_FAULTS", spec)
    assert faults.armed("kill_after_round", target) == expected
