"""bench/stream_bench.py end to end on loopback, at its smallest: the real client and server over
mutual TLS made on the fly, with a fan-in of two fetcher processes; only the shape of the output
is checked (no timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from stream_bench import jain  # noqa: E402


def test_jain_index() -> None:
    assert jain([5.0, 5.0, 5.0, 5.0]) == pytest.approx(1.0)
    assert jain([8.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)  # one fetcher got it all: 1/n
    assert jain([1.0, 3.0]) == pytest.approx(16 / 20)


def test_stream_bench_tls_fan_in_prints_json_rows() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "stream_bench.py"), "--sizes", "1",
         "--repeats", "2", "--tls", "--fan-in", "2", "--json"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    single, fan = rows
    assert single["kind"] == "single" and single["tls"] is True
    assert single["payload_bytes"] == 1_000_000 and single["repeats"] == 2
    for key in ("fedmoe", "bare_grpc", "raw_tcp"):
        assert single[f"{key}_mbps"] > 0
        assert single[f"{key}_best_mbps"] >= single[f"{key}_mbps"]
    assert single["ratio_vs_raw_tcp"] == pytest.approx(
        single["fedmoe_mbps"] / single["raw_tcp_mbps"], rel=0.01
    )
    assert fan["kind"] == "fan-in" and fan["fetchers"] == 2 and fan["total_bytes"] == 2_000_000
    for side in ("fedmoe", "raw_tcp"):
        s = fan[side]
        assert 0 < s["min_fetcher_mbps"] <= s["max_fetcher_mbps"]
        assert 0.5 <= s["jain"] <= 1.0  # 1/n .. 1 for n = 2
