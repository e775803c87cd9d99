"""How far a run has come, for `fedmoe status`: totals of the rounds written so far.

Pure logic, O(1) per question: the round book feeds it each round as it is written (the same
records that go to metrics.jsonl), so a status call never walks the records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedmoe.common.accounting import bytes_moved


@dataclass
class RunProgress:
    started: float  # clock reading when this coordinator started (or resumed) the run
    rounds_written: int = 0  # rounds written by this process (not those before a restart)
    coordinator_bytes: int = 0
    p2p_bytes: int = 0
    last_accuracy: float | None = None
    last_global_accuracy: float | None = None
    written_at: list[float] = field(default_factory=list)  # first and latest write only

    def add(self, records: list[dict[str, Any]], now: float) -> None:
        """One written round: its per-peer records (summed as summary.json sums them)."""
        self.rounds_written += 1
        # The service's records have bytes; the book's tests' records not. Each message once.
        keys = ("coordinator_sent", "coordinator_received", "p2p_sent", "p2p_received")
        moved = bytes_moved({k: (r.get("bytes") or {}).get(k, 0) for k in keys} for r in records)
        self.coordinator_bytes += moved["coordinator"]
        self.p2p_bytes += moved["p2p"]
        scored = [r for r in records if "accuracy" in r and "global_accuracy" in r]
        if scored:
            self.last_accuracy = sum(r["accuracy"] for r in scored) / len(scored)
            self.last_global_accuracy = sum(r["global_accuracy"] for r in scored) / len(scored)
        self.written_at = [self.written_at[0] if self.written_at else now, now]

    def mean_round_seconds(self) -> float | None:
        """From the second round on, the mean gap between writes: the first round also holds the
        peers' start-up (joins, data loading), which later rounds do not repeat."""
        if self.rounds_written >= 2:
            first, last = self.written_at
            return (last - first) / (self.rounds_written - 1)
        if self.rounds_written == 1:
            return self.written_at[-1] - self.started
        return None

    def eta_seconds(self, rounds_left: int) -> float | None:
        mean = self.mean_round_seconds()
        return None if mean is None else max(0.0, mean * rounds_left)
