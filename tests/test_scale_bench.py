"""bench/scale.py end to end at its smallest: a real coordinator process and 6 protocol-level
peers in 2 worker processes, 2 rounds, on both coordinator servers. Only what the JSON line says
is checked, never how fast (the figures are the benchmark's job)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("server", "liveness"), [("aio", True), ("threads", True), ("aio", False)])
def test_scale_bench_runs_the_protocol_and_reports_both_loops(
    server: str, liveness: bool, tmp_path: Path
) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scale.py"), "--peers", "6", "--procs", "2",
         "--probe-peers", "2", "--rounds", "2", "--train-seconds", "2.5",
         "--out", str(tmp_path / "run"), *([] if liveness else ["--no-liveness"])],
        capture_output=True, text=True, timeout=300, check=True,
        env={**os.environ, "FEDMOE_COORDINATOR_SERVER": server},
    )  # fmt: skip
    # A peer's first heartbeat comes at a random phase within one interval (--peer-timeout 10:
    # 2 s), and each round's simulated training (2.5 s x 0.95-1.0) is longer than that, so every
    # peer beats at least once before its first upload, however fast the machine.
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["status"] == "completed" and line["errors"] == 0
    assert line["peers"] == 6 and line["rounds"] == 2
    assert len(line["round_close"]) == 2  # both rounds closed and were delivered
    assert line["heartbeats"] > 0 and line["heartbeat_p99_ms"] >= line["heartbeat_p50_ms"] > 0
    assert line["probe_peers"] == 2 and line["procs"] == 3  # the probe peers' own process
    assert line["probe_heartbeats"] > 0 and line["probe_heartbeat_p99_ms"] > 0
    assert line["liveness_process"] is liveness
    if liveness:  # a process more, watched apart; its answers were the heartbeats measured
        assert line["liveness_rss_mb"] > 0 and line["liveness_cpu_seconds"] >= 0
        assert line["heartbeat_fallbacks"] < line["heartbeats"]
        log = (tmp_path / "run" / "coordinator.log").read_text()
        assert re.search(r"answered [1-9]\d* heartbeat", log), log[-2000:]
    else:
        assert line["liveness_rss_mb"] is None and line["heartbeat_fallbacks"] == 0
    # Every peer heartbeat, from its worker's heartbeat process (the timings reach the line
    # through the worker), and every peer's rounds are in its timeline.
    peers = json.loads((tmp_path / "run" / "peers.json").read_text())
    assert sorted(p["index"] for p in peers) == list(range(6))
    assert all(
        p["heartbeats_ms"] and len(p["heartbeats_at"]) == len(p["heartbeats_ms"]) for p in peers
    )
    assert all(sorted(p["rounds"]) == ["1", "2"] for p in peers)
    for p in peers:  # each peer's beats: after its own join, none after its last report
        assert p["join_done"] <= min(p["heartbeats_at"]), p["index"]
        assert max(p["heartbeats_at"]) <= p["rounds"]["2"]["report"], p["index"]
    assert line["heartbeat_errors"] == 0, line["heartbeat_error_codes"]
    assert line["worker_cpu_seconds"] > 0 and line["heartbeat_procs_cpu_seconds"] > 0
    lag = line["worker_loop_lag_ms"]
    assert lag["p99"] is not None and lag["max"] >= lag["p99"] >= lag["p50"] >= 0
    if server == "aio":  # only the event-loop server has a loop to probe
        assert line["coordinator_loop_lag_ms"]["p99"] >= 0
        assert line["coordinator_threads_max"] < 40  # no thread per held call
    else:
        assert line["coordinator_loop_lag_ms"] is None


def test_a_heartbeat_process_that_dies_is_reported_not_hidden() -> None:
    """Its peers' heartbeats were not measured: the worker must say so (as its peers' errors),
    not report a p99 over the other workers only, and must not crash on the broken pipe."""
    sys.path.insert(0, str(ROOT))
    try:
        from bench.scale import BeatLink
    finally:
        sys.path.remove(str(ROOT))
    link = BeatLink("127.0.0.1:1")
    link.proc.kill()
    link.proc.wait()
    for k in range(2000):  # enough to fill any pipe buffer: the writes must fail, not block
        link.send(i=k, round=1)
    beats, cpu, failure = link.results()
    assert beats == {} and cpu == 0.0
    assert failure is not None and "heartbeat process" in failure
