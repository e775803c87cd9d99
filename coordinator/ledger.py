"""The report ledger: metrics reports per round, written in round order, each round once.

A round is written when every member expected to report it has done so, or is gone (silent, or
restarted after the round closed), or when its deadline passed. Pure logic, no lock of its own:
the round book calls it under its lock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]


@dataclass(frozen=True)
class Due:
    """Who must report a round, and since when it could be reported (for its deadline)."""

    expected: frozenset[str]
    since: float
    started: bool = True  # False: the run has not started (not everyone joined yet)


class ReportLedger:
    def __init__(self, rounds: int, round_timeout: float) -> None:
        self.rounds = rounds
        self.round_timeout = round_timeout
        self.reported_round = 0  # last round whose metrics were written
        self.pending: dict[int, dict[str, Record]] = {}
        # Participants that restarted after a round closed: they never finish that round.
        self.abandoned: dict[int, set[str]] = {}

    @property
    def finished(self) -> bool:
        return self.reported_round >= self.rounds

    def add(self, round_: int, peer_id: str, record: Record) -> bool:
        """Keep a report; False if it is a retry of one already counted."""
        if round_ <= self.reported_round or peer_id in self.pending.get(round_, {}):
            return False
        self.pending.setdefault(round_, {})[peer_id] = record
        return True

    def abandon(self, round_: int, peer_id: str) -> None:
        self.abandoned.setdefault(round_, set()).add(peer_id)

    def is_done(self, round_: int, peer_id: str) -> bool:
        """Whether `peer_id`'s report of `round_` is in (or it will never send one)."""
        return peer_id in self.pending.get(round_, ()) or peer_id in self.abandoned.get(round_, ())

    def flush(
        self,
        due: Callable[[int], Due | None],
        alive: Callable[[str], bool],
        ordered: Callable[[Iterable[str]], list[str]],
        write: Callable[[int, list[str], list[Record]], None],
        note: Callable[..., None],
        now: float,
    ) -> list[int]:
        """Write every round that is complete, in order; returns the rounds written.

        `due(r)` is None while round r cannot be reported yet (not closed); `write(r, peers,
        records)` persists the records, `note(kind, peers, **info)` records an event.
        """
        written: list[int] = []
        while self.reported_round < self.rounds:
            r = self.reported_round + 1
            d = due(r)
            if d is None:
                break
            got = self.pending.get(r, {})
            deadline = now - d.since >= self.round_timeout
            if not d.started and not deadline:
                break
            gone = self.abandoned.get(r, set())
            # Stops at the first live member still to report: flush runs on every report, and a
            # full scan each time made a round of N reports O(N^2) under the book's lock.
            waiting = any(p not in got and p not in gone and alive(p) for p in d.expected)
            if waiting and not deadline:
                break
            if not got:  # nobody left who can report this round: note it and move on
                note("no report", sorted(d.expected), round=r)
            else:
                missing = sorted(d.expected - set(got))
                if missing:
                    note("no report", missing, round=r)
                peers = ordered(got)
                write(r, peers, [got[p] for p in peers])
            self.pending.pop(r, None)
            self.abandoned.pop(r, None)
            self.reported_round = r
            written.append(r)
        return written

    def snapshot(self) -> dict[str, Any]:
        return {
            "reported_round": self.reported_round,
            "pending_reports": {str(r): v for r, v in self.pending.items()},
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.reported_round = state["reported_round"]
        self.pending = {int(r): v for r, v in state["pending_reports"].items()}
