"""Application-byte accounting: serialized message sizes per round, class and direction.

Classes (DESIGN.md §2): "coordinator" for peer <-> coordinator messages, "p2p" for peer <-> peer.
The size counted is the protobuf serialized size of each gRPC message, as both ends see it.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from google.protobuf.message import Message

CLASSES = ("coordinator", "p2p")
DIRECTIONS = ("sent", "received")


class ByteCounter:
    """Thread-safe counters keyed by (round, class, direction)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[int, str, str], int] = defaultdict(int)

    def add(self, round_: int, klass: str, direction: str, nbytes: int) -> None:
        if klass not in CLASSES or direction not in DIRECTIONS:
            raise ValueError(f"unknown traffic class/direction {klass}/{direction}")
        with self._lock:
            self._counts[(round_, klass, direction)] += nbytes

    def message(self, round_: int, klass: str, direction: str, msg: Message) -> None:
        self.add(round_, klass, direction, msg.ByteSize())

    def carry(self, from_round: int, to_round: int) -> None:
        """Move a round's counts into a later one (a round the peer skipped is never reported)."""
        with self._lock:
            for key in [k for k in self._counts if k[0] == from_round]:
                self._counts[(to_round, key[1], key[2])] += self._counts.pop(key)

    def round_counts(self, round_: int) -> dict[str, int]:
        """{'coordinator_sent': .., 'coordinator_received': .., 'p2p_sent': .., 'p2p_received': ..}"""
        with self._lock:
            return {
                f"{k}_{d}": self._counts.get((round_, k, d), 0) for k in CLASSES for d in DIRECTIONS
            }

    def totals(self) -> dict[str, int]:
        out = {f"{k}_{d}": 0 for k in CLASSES for d in DIRECTIONS}
        with self._lock:
            for (_, k, d), n in self._counts.items():
                out[f"{k}_{d}"] += n
        return out
