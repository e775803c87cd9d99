"""Faults injected into real processes: peers and the coordinator killed with SIGKILL mid-run.

The kill points are armed through FEDMOE_FAULTS (common/faults.py), so each fault lands at the
same place in the protocol every time instead of depending on timing.
"""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest

from tests.cluster import Cluster

# Small chunks: one expert is ~70 chunks, so a kill after 20 lands inside a transfer.
FAST = [
    *("--dataset", "synthetic", "--chunk-bytes", "4096", "--seed", "3"),
    *("--peer-timeout", "3", "--round-timeout", "60", "--min-peers", "2"),
    *("--sync-every", "1"),  # experts move every round, so a kill lands inside a transfer
]


@pytest.fixture
def cluster_factory(tmp_path: Path):
    made: list[Cluster] = []

    def make(peers: int, rounds: int, extra: list[str] | None = None) -> Cluster:
        c = Cluster(tmp_path, peers, ["--rounds", str(rounds), *FAST, *(extra or [])])
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


def test_peer_killed_during_an_expert_transfer(cluster_factory) -> None:
    c = cluster_factory(3, 4)
    c.start_coordinator()
    for k in range(3):
        c.start_peer(k, faults="kill_after_served_chunks=20" if k == 2 else None)
    assert c.wait("peer-2") == -signal.SIGKILL
    assert c.wait("coordinator") == 0, c.logs()
    assert c.wait("peer-0") == 0 and c.wait("peer-1") == 0, c.logs()
    assert "FAULT INJECTED: kill_after_served_chunks" in c.log_text("peer-2")

    s = c.summary()
    assert s["status"] == "completed" and s["rounds_completed"] == 4
    assert s["dropped_peers"] == ["peer-2"]
    assert s["membership"]["peer-2"]["rounds_missed"] == [1, 2, 3, 4]
    assert s["membership"]["peer-0"]["rounds_missed"] == []
    per_peer = Counter(r["peer"] for r in c.records())
    assert per_peer == {"peer-0": 4, "peer-1": 4}
    # The fetchers lost the stream mid-transfer, retried, then left peer-2 out of Eq. 11.
    fetch_logs = c.log_text("peer-0") + c.log_text("peer-1")
    assert "dropped source peer-2" in fetch_logs
    assert "weights renormalised" in fetch_logs


def test_coordinator_killed_after_round_2_resumes_from_its_checkpoint(cluster_factory) -> None:
    c = cluster_factory(3, 4)
    c.start_coordinator(faults="kill_after_round=2")
    for k in range(3):
        c.start_peer(k)
    assert c.wait("coordinator") == -signal.SIGKILL, c.logs()
    written = Counter(r["round"] for r in c.records())
    assert written == {1: 3, 2: 3}  # exactly the checkpointed rounds survived the kill

    c.start_coordinator()  # same port, same --state-dir and --out
    assert c.wait("coordinator") == 0, c.logs()
    for k in range(3):
        assert c.wait(f"peer-{k}") == 0, c.logs()

    s = c.summary()
    assert s["status"] == "completed" and s["embedding_version"] == 4
    rounds = Counter((r["round"], r["peer"]) for r in c.records())
    assert set(rounds.values()) == {1}, "a round was written twice"
    assert sorted(rounds) == [(r, f"peer-{k}") for r in range(1, 5) for k in range(3)]
    assert any(e["event"] == "coordinator restarted" for e in s["events"])
    assert "resumed run" in c.log_text("coordinator")

    # Restarted once more after the end (a supervisor, a redeployed stack): it says so, exits 0
    # and leaves the final summary.json as it was.
    before = c.summary()
    c.start_coordinator()
    assert c.wait("coordinator") == 0, c.logs()
    assert "already complete" in c.log_text("coordinator")
    assert c.summary() == before


def test_restarted_peer_rejoins_within_one_round(cluster_factory) -> None:
    # A quorum of all three: no round closes without peer-1, so the others cannot finish the run
    # while it restarts (on a loaded machine they did, and the test failed on timing alone).
    c = cluster_factory(3, 6, ["--min-peers", "3"])
    c.start_coordinator()
    for k in range(3):
        c.start_peer(k, faults="kill_after_round=2" if k == 1 else None)
    assert c.wait("peer-1") == -signal.SIGKILL
    c.start_peer(1)  # same index and --state-dir: resumes its model, rejoins the run
    assert c.wait("coordinator") == 0, c.logs()
    for k in range(3):
        assert c.wait(f"peer-{k}") == 0, c.logs()

    s = c.summary()
    rejoined = [e for e in s["events"] if e["event"] == "rejoined"]
    assert len(rejoined) == 1 and rejoined[0]["peers"] == ["peer-1"]
    open_at_rejoin = rejoined[0]["open_round"]
    mine = sorted(r["round"] for r in c.records() if r["peer"] == "peer-1")
    after = [r for r in mine if r > 2]
    assert mine[:2] == [1, 2] and after, mine
    assert after[0] <= open_at_rejoin + 1  # back within one round
    assert after[-1] == 6 and after == list(range(after[0], 7))
    assert "resumed the model of round 2" in c.log_text("peer-1")
    assert s["status"] == "completed"
