"""fedmoe/scenarios.py: link profiles and time to accuracy, on hand-made metrics records."""

from __future__ import annotations

import math

import pytest

from fedmoe.scenarios import (
    log_uniform_rates,
    mean_round_seconds,
    profile,
    round_series,
    time_to_target,
)


def rec(rnd: int, peer: str, at: float, seconds: float, acc: float) -> dict:
    return {"round": rnd, "peer": peer, "reported_at": at, "seconds": seconds, "accuracy": acc}


# Two peers, three rounds; run clock starts at 1000 - 10 = 990 (peer b's round 1 began first).
RECORDS = [
    rec(1, "a", 1000.0, 8.0, 0.30),
    rec(1, "b", 1001.0, 11.0, 0.40),  # started at 990: the earliest start
    rec(2, "a", 1012.0, 11.0, 0.50),
    rec(2, "b", 1015.0, 14.0, 0.60),  # round 2 done at 1015
    rec(3, "b", 1030.0, 15.0, 0.70),  # records out of order: grouped by round
    rec(3, "a", 1029.0, 14.0, 0.80),
]


def test_round_series_times_from_first_round_start_and_last_report() -> None:
    rows = round_series(RECORDS)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert [r["t"] for r in rows] == pytest.approx([11.0, 25.0, 40.0])
    assert [r["accuracy"] for r in rows] == pytest.approx([0.35, 0.55, 0.75])
    assert [r["round_seconds"] for r in rows] == [11.0, 14.0, 15.0]
    assert mean_round_seconds(rows) == pytest.approx(40.0 / 3)


def test_time_to_target_is_the_first_round_whose_mean_reaches_it() -> None:
    rows = round_series(RECORDS)
    assert time_to_target(rows, 0.55) == (pytest.approx(25.0), 2)  # exactly reached counts
    assert time_to_target(rows, 0.56) == (pytest.approx(40.0), 3)
    assert time_to_target(rows, 0.10) == (pytest.approx(11.0), 1)
    assert time_to_target(rows, 0.76) == (None, None)


def test_time_to_target_on_another_metric() -> None:
    records = [dict(r, global_accuracy=1.0 - r["accuracy"]) for r in RECORDS]
    rows = round_series(records, "global_accuracy")
    assert time_to_target(rows, 0.6, "global_accuracy") == (pytest.approx(11.0), 1)


def test_records_without_timestamp_are_refused() -> None:
    old = [{k: v for k, v in r.items() if k != "reported_at"} for r in RECORDS]
    with pytest.raises(ValueError, match="reported_at"):
        round_series(old)
    assert round_series([]) == []


def test_profiles() -> None:
    sb = profile("server-bottleneck", 3)
    rates = sb.host_rates()
    assert rates["coord"] == ("50000kbit", "50000kbit")
    assert rates["p0"] == rates["p2"] == ("200000kbit", None)
    assert profile("lan", 2).host_rates(0.1)["p1"] == ("100000kbit", None)
    edge = profile("edge", 2)
    assert edge.delay_ms == 20 and set(edge.host_rates().values()) == {("100000kbit", None)}
    het = profile("heterogeneous", 4, seed=7)
    assert het.peers == profile("heterogeneous", 4, seed=7).peers  # seeded: same draw
    assert het.peers != profile("heterogeneous", 4, seed=8).peers
    assert all(up == down for up, down in het.peers)
    with pytest.raises(ValueError, match="unknown network profile"):
        profile("moon", 2)


def test_log_uniform_rates_stay_in_range_and_spread_in_log() -> None:
    rates = log_uniform_rates(2000, seed=1)
    assert all(20.0 <= r <= 500.0 for r in rates)
    logs = sorted(math.log(r) for r in rates)
    mid = logs[len(logs) // 2]
    assert abs(mid - (math.log(20) + math.log(500)) / 2) < 0.2  # median at the geometric mean
