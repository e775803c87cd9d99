"""Network scenarios and time-to-accuracy, without any networking: what bench/scenario.py applies
to a run (named link profiles) and how it reads the run's metrics records afterwards.

Time comes from the records themselves: `reported_at` (coordinator wall clock when a peer's round
report arrived) and `seconds` (that peer's round). A run's clock starts when its first round
started on its earliest peer (min over round-1 records of reported_at - seconds), so process
start-up and dataset loading, equal for every algorithm, are left out; a round is done when its
last report arrived.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

COORDINATOR = "coord"
EPS = 1e-9  # accuracies are means of floats: "reached" tolerates rounding


@dataclass(frozen=True)
class LinkProfile:
    """Rates in Mbit/s per host and direction (None: unshaped); one-way delay in ms."""

    name: str
    description: str
    coordinator: tuple[float | None, float | None]  # (uplink = egress, downlink = ingress)
    peers: list[tuple[float | None, float | None]] = field(default_factory=list)
    delay_ms: float | None = None

    def host_rates(self, scale: float = 1.0) -> dict[str, tuple[str | None, str | None]]:
        """scripts/netns.py Topology host_rates: tc rate strings, rates multiplied by `scale`."""

        def tc(mbit: float | None) -> str | None:
            return None if mbit is None else f"{mbit * scale * 1000:.0f}kbit"

        out = {COORDINATOR: (tc(self.coordinator[0]), tc(self.coordinator[1]))}
        for k, (up, down) in enumerate(self.peers):
            out[f"p{k}"] = (tc(up), tc(down))
        return out

    def as_dict(self, scale: float = 1.0) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "delay_ms_one_way": self.delay_ms,
            "rate_scale": scale,
            "mbit_s": {
                host: [None if r is None else round(r * scale, 3) for r in pair]
                for host, pair in zip(
                    [COORDINATOR, *(f"p{k}" for k in range(len(self.peers)))],
                    [self.coordinator, *self.peers],
                    strict=True,
                )
            },
        }


PROFILE_NAMES = ("lan", "edge", "server-bottleneck", "heterogeneous")


def log_uniform_rates(n: int, seed: int, low: float = 20.0, high: float = 500.0) -> list[float]:
    """n rates in Mbit/s, log-uniform in [low, high], the same for the same seed."""
    rng = random.Random(seed)
    return [math.exp(rng.uniform(math.log(low), math.log(high))) for _ in range(n)]


def profile(name: str, peers: int, seed: int = 0) -> LinkProfile:
    """The named profile for a coordinator and `peers` peers (ValueError if unknown)."""
    if peers < 1:
        raise ValueError("need at least one peer")
    if name == "lan":
        return LinkProfile(name, "every host 1 Gbit/s", (1000, None), [(1000, None)] * peers)
    if name == "edge":
        return LinkProfile(
            name, "every host 100 Mbit/s, 20 ms one way", (100, None), [(100, None)] * peers, 20
        )
    if name == "server-bottleneck":
        return LinkProfile(
            name,
            "coordinator uplink and downlink 50 Mbit/s, peers 200 Mbit/s",
            (50, 50),
            [(200, None)] * peers,
        )
    if name == "heterogeneous":
        rates = log_uniform_rates(peers, seed)
        return LinkProfile(
            name,
            f"peer up/downlinks log-uniform 20-500 Mbit/s (seed {seed}), coordinator 1 Gbit/s",
            (1000, None),
            [(r, r) for r in rates],
        )
    raise ValueError(f"unknown network profile {name!r}; choose from {', '.join(PROFILE_NAMES)}")


# -- time to accuracy ------------------------------------------------------------------------


def round_series(records: list[dict[str, Any]], metric: str = "accuracy") -> list[dict[str, Any]]:
    """Per round: seconds since the run's first round started (`t`, when its last report
    arrived), the mean `metric` over its peers, and the slowest peer's round seconds."""
    if not records:
        return []
    missing = [r for r in records if not isinstance(r.get("reported_at"), int | float)]
    if missing:
        raise ValueError("records lack 'reported_at' (written by an older coordinator)")
    by_round: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        by_round[rec["round"]].append(rec)
    first = by_round[min(by_round)]
    t0 = min(r["reported_at"] - r["seconds"] for r in first)
    return [
        {
            "round": rnd,
            "t": max(r["reported_at"] for r in recs) - t0,
            metric: sum(r[metric] for r in recs) / len(recs),
            "round_seconds": max(r["seconds"] for r in recs),
        }
        for rnd, recs in sorted(by_round.items())
    ]


def time_to_target(
    series: list[dict[str, Any]], target: float, metric: str = "accuracy"
) -> tuple[float | None, int | None]:
    """(seconds, round) of the first round whose mean `metric` reaches `target`; (None, None)
    if none does."""
    for row in series:
        if row[metric] >= target - EPS:
            return row["t"], row["round"]
    return None, None


def mean_round_seconds(series: list[dict[str, Any]]) -> float | None:
    """Wall seconds per round: the run's clock at its last round over the rounds run."""
    return series[-1]["t"] / len(series) if series else None
