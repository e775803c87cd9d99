"""Round bookkeeping on the coordinator: membership, uploads, aggregation, metrics.

Pure logic: no gRPC here. The service (coordinator/service.py) turns calls into these methods
and their errors (`Refused`) into gRPC statuses. Every wait is bounded by the round timeout.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.config import upload_prefixes
from common.proto import pb
from coordinator.strategies import PeerUpdate, RoundOutcome, Strategy

ADDRESS_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


class Refused(Exception):
    """A request that breaks the protocol; `code` names the gRPC status to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RunFailed(Exception):
    pass


@dataclass
class Member:
    peer_id: str
    index: int
    address: str


def serve_orders(outcome: RoundOutcome) -> dict[str, dict[str, list[int]]]:
    """source peer -> requester -> experts it must serve (the other side of every plan)."""
    orders: dict[str, dict[str, set[int]]] = {}
    for requester, rows in outcome.plans.items():
        for terms in rows.values():
            for t in terms:
                if t.peer_id != requester:
                    orders.setdefault(t.peer_id, {}).setdefault(requester, set()).add(t.expert)
    return {s: {r: sorted(e) for r, e in reqs.items()} for s, reqs in orders.items()}


class RoundBook:
    def __init__(
        self,
        cfg: pb.RunConfig,
        strategy: Strategy,
        on_round_reported: Callable[[int, list[dict[str, Any]]], None],
        round_timeout: float,
    ) -> None:
        self.cfg = cfg
        self.strategy = strategy
        self.on_round_reported = on_round_reported
        self.round_timeout = round_timeout
        self._cv = threading.Condition()
        self.members: dict[str, Member] = {}
        self._updates: dict[int, dict[str, PeerUpdate]] = {}
        self._outcomes: dict[int, RoundOutcome] = {}
        self._reports: dict[int, dict[str, dict[str, Any]]] = {}
        self._schema: dict[str, tuple[int, ...]] = {}
        self.closed_round = 0  # last round whose uploads were aggregated
        self.reported_round = 0  # last round whose metrics were all written
        self.embedding_version = 0
        self.tensors_received: set[str] = set()
        self.failure: str | None = None
        self.last_progress = time.monotonic()

    # ------------------------------------------------------------------ membership

    def join(self, index: int, address: str) -> Member:
        if index >= self.cfg.peers:
            raise Refused(
                "INVALID_ARGUMENT", f"peer index {index} is out of range for {self.cfg.peers} peers"
            )
        match = ADDRESS_RE.match(address)
        if not match or not 0 < int(match.group(2)) < 65536:
            raise Refused("INVALID_ARGUMENT", f"advertised address {address!r} is not host:port")
        with self._cv:
            member = Member(f"peer-{index}", index, address)
            self.members[member.peer_id] = member
            self._progress()
            return member

    def _member(self, peer_id: str) -> Member:
        member = self.members.get(peer_id)
        if member is None:
            raise Refused("PERMISSION_DENIED", f"{peer_id!r} is not a member of this run")
        return member

    def ordered_members(self) -> list[Member]:
        return sorted(self.members.values(), key=lambda m: m.index)

    # ------------------------------------------------------------------ uploads

    def check_round(self, round_: int) -> None:
        if not 1 <= round_ <= self.cfg.rounds:
            raise Refused("INVALID_ARGUMENT", f"round {round_} is outside 1..{self.cfg.rounds}")

    def submit(
        self, peer_id: str, round_: int, num_samples: int, tensors: dict[str, np.ndarray]
    ) -> None:
        self.check_round(round_)
        expected = upload_prefixes(self.cfg, round_)
        if not expected:
            raise Refused("FAILED_PRECONDITION", "this algorithm uploads nothing")
        if num_samples <= 0:
            raise Refused("INVALID_ARGUMENT", "num_samples must be positive")
        for name, array in tensors.items():
            if not name.startswith(expected):
                raise Refused(
                    "INVALID_ARGUMENT", f"tensor {name!r} is not uploaded in round {round_}"
                )
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise Refused("INVALID_ARGUMENT", f"tensor {name!r} has NaN or infinite values")
        missing = [p for p in expected if not any(n.startswith(p) for n in tensors)]
        if missing:
            raise Refused("INVALID_ARGUMENT", f"upload lacks tensors {missing}")
        with self._cv:
            self._member(peer_id)
            if round_ <= self.closed_round:
                raise Refused("FAILED_PRECONDITION", f"round {round_} is already closed")
            if round_ != self.closed_round + 1:
                raise Refused(
                    "FAILED_PRECONDITION",
                    f"round {round_} is not open (the open round is {self.closed_round + 1})",
                )
            # Every peer's tensor must match what the first uploader sent (same model).
            for name, array in tensors.items():
                shape = self._schema.setdefault(name, tuple(array.shape))
                if shape != tuple(array.shape):
                    raise Refused(
                        "INVALID_ARGUMENT",
                        f"tensor {name!r} has shape {list(array.shape)}, the run uses {list(shape)}",
                    )
            updates = self._updates.setdefault(round_, {})
            updates[peer_id] = PeerUpdate(peer_id, num_samples, tensors)
            self.tensors_received.update(n.split(".", 1)[0] for n in tensors)
            self._progress()
            if len(updates) == self.cfg.peers:
                self._close(round_)

    def _close(self, round_: int) -> None:
        updates = [self._updates[round_][m.peer_id] for m in self.ordered_members()]
        outcome = self.strategy.aggregate(round_, updates)
        del self._updates[round_]
        self._outcomes[round_] = outcome
        self._outcomes.pop(round_ - 2, None)  # every peer has moved past it by now
        if any(n.startswith("embedding.") for n in outcome.shared):
            self.embedding_version = round_
        self.closed_round = round_
        self._cv.notify_all()

    def wait_outcome(self, peer_id: str, round_: int) -> tuple[RoundOutcome, int]:
        """Block until `round_` is closed; returns the outcome and the embedding version."""
        self.check_round(round_)
        with self._cv:
            self._member(peer_id)
            ok = self._cv.wait_for(
                lambda: self.closed_round >= round_ or self.failure is not None,
                timeout=self.round_timeout,
            )
            if self.failure is not None:
                raise Refused("ABORTED", f"the run failed: {self.failure}")
            if not ok:
                waiting = sorted(set(self.members) - set(self._updates.get(round_, {})))
                raise Refused(
                    "DEADLINE_EXCEEDED",
                    f"round {round_} did not close within {self.round_timeout:.0f} s; "
                    f"no upload yet from {waiting or 'peers that have not joined'}",
                )
            outcome = self._outcomes.get(round_)
            if outcome is None:
                raise Refused("FAILED_PRECONDITION", f"round {round_} results are no longer held")
            return outcome, self.embedding_version

    # ------------------------------------------------------------------ metrics

    def report(self, peer_id: str, round_: int, record: dict[str, Any]) -> None:
        self.check_round(round_)
        with self._cv:
            self._member(peer_id)
            if round_ <= self.reported_round:
                raise Refused("FAILED_PRECONDITION", f"round {round_} metrics are already written")
            reports = self._reports.setdefault(round_, {})
            reports[peer_id] = record
            self._progress()
            # Rounds are written in order, each once every peer has reported it.
            while len(self._reports.get(self.reported_round + 1, {})) == self.cfg.peers:
                done = self.reported_round + 1
                by_peer = self._reports.pop(done)
                records = [by_peer[m.peer_id] for m in self.ordered_members()]
                self.on_round_reported(done, records)
                self.reported_round = done
                self._cv.notify_all()

    def wait_run_finished(self, peer_id: str) -> bool:
        """Held by peers after their last report so that nobody stops serving experts early."""
        with self._cv:
            self._member(peer_id)
            ok = self._cv.wait_for(
                lambda: self.reported_round >= self.cfg.rounds or self.failure is not None,
                timeout=self.round_timeout,
            )
            if self.failure is not None:
                raise Refused("ABORTED", f"the run failed: {self.failure}")
            return ok

    @property
    def finished(self) -> bool:
        return self.reported_round >= self.cfg.rounds

    def fail(self, reason: str) -> None:
        with self._cv:
            self.failure = reason
            self._cv.notify_all()

    def _progress(self) -> None:
        self.last_progress = time.monotonic()
