"""Round bookkeeping on the coordinator: membership, liveness, uploads, aggregation, metrics.

Pure logic: no gRPC here. The service (coordinator/service.py) turns calls into these methods
and their errors (`Refused`) into gRPC statuses; the main loop calls `tick()` so that deadlines
and silent peers are noticed even when no request arrives.

Rules (DESIGN.md §1.4, issue "reliability"):
- The run starts when all N peers have joined (or, after the round deadline, with a quorum).
- A round closes when every live member has uploaded, or at its deadline (`round_timeout` after it
  opened) if at least `min_peers` have. Members silent for `peer_timeout` are left out; late
  uploads are refused and the peer catches up from the latest aggregate.
- A round's metrics are written once every participant has reported or is gone.
- Every state change worth keeping is handed to `persist` (the checkpoint), before it is acked.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from common.config import participants, takes_part, upload_prefixes
from common.logsafe import clip
from common.model_schema import model_schema
from common.netaddr import check_advertise
from common.proto import pb
from coordinator.strategies import PeerUpdate, RoundOutcome, Strategy, Term

# The event log is bounded: a member (or a stolen token) that rejoins in a loop cannot grow the
# coordinator's memory or its checkpoint. The oldest events give way; their count is kept.
MAX_EVENTS = 512
# Upper bounds of a peer's training rows per built-in data set (all the set's rows; CIFAR-10's
# full training set). A claimed sample count above it is a lie that would buy FedAvg weight.
MAX_TRAIN_SAMPLES = {"digits": 1797, "synthetic": 2000, "cifar10": 50_000}


def secret_digest(secret: str) -> str:
    """Sessions and member secrets are looked up and stored by digest, never compared as text."""
    return hashlib.sha256(secret.encode()).hexdigest()


class Refused(Exception):
    """A request that breaks the protocol; `code` names the gRPC status to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Member:
    peer_id: str
    index: int
    address: str
    session: str
    last_seen: float = 0.0
    alive: bool = True
    reported: set[int] = field(default_factory=set)
    joins: int = 1
    secret_digest: str = ""  # of the member secret issued at its first join
    secret: str = ""  # the secret itself, only until the Join reply carries it (never persisted)
    num_samples: int = 0  # declared by its first upload; later uploads must agree


@dataclass
class ClosedRound:
    outcome: RoundOutcome
    participants: list[str]
    tickets: dict[tuple[str, str], str]  # (source, requester) -> ticket
    closed_at: float
    # source -> requester -> experts; computed once, not per peer asking for its plan
    orders: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.orders:
            self.orders = serve_orders(self.outcome)


class Persistence(Protocol):
    def save_update(self, round_: int, update: PeerUpdate) -> None: ...
    def drop_updates(self, round_: int) -> None: ...
    def save_state(self, book: RoundBook) -> None: ...
    def save_member(self, member: Member) -> None: ...


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
        persist: Persistence | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.strategy = strategy
        self.on_round_reported = on_round_reported
        self.persist = persist
        self.clock = clock
        self.uploads = bool(upload_prefixes(cfg, 1))
        self._cv = threading.Condition()
        self.members: dict[str, Member] = {}
        self.updates: dict[str, PeerUpdate] = {}  # uploads of the open round
        self.closed: dict[int, ClosedRound] = {}  # the last two closed rounds
        self.participants: dict[int, list[str]] = {}
        self.closed_at: dict[int, float] = {}  # kept until the round is written
        self.pending_reports: dict[int, dict[str, dict[str, Any]]] = {}
        self.closed_round = 0  # last round whose uploads were aggregated
        self.reported_round = 0  # last round whose metrics were written
        self.embedding_version = 0
        self.round_opened_at = clock()
        self.tensors_received: set[str] = set()
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.events_dropped = 0
        self.round_timings: list[dict[str, Any]] = []  # aggregate + plan time per closed round
        self._sessions: dict[str, str] = {}  # digest of a session -> peer_id
        self.advertise_allow: tuple = ()  # networks advertised addresses must lie in (optional)
        self.max_samples = MAX_TRAIN_SAMPLES.get(cfg.dataset)  # None: not known here
        # Participants that restarted after a round closed: they never finish that round.
        self.abandoned: dict[int, set[str]] = {}
        self.failure: str | None = None
        self.schema = model_schema(cfg)

    # ------------------------------------------------------------------ membership

    def join(self, index: int, address: str, member_secret: str = "") -> Member:
        """Admit peer `index`; `Member.secret` holds its member secret (new on a first join).

        An index is an identity: once taken, only the holder of the member secret issued at the
        first join may rejoin under it while the member is alive. A member that went silent
        (left out after `peer_timeout`) may be taken over without it, so that a peer restarted
        without its --state-dir can come back; its history stays with the index.
        """
        if index >= self.cfg.peers:
            raise Refused(
                "INVALID_ARGUMENT", f"peer index {index} is out of range for {self.cfg.peers} peers"
            )
        try:
            address = check_advertise(address, self.advertise_allow)
        except ValueError as e:
            raise Refused("INVALID_ARGUMENT", f"advertised address refused: {e}") from e
        if len(member_secret) > 128:
            raise Refused("INVALID_ARGUMENT", "member secret too long")
        with self._cv:
            peer_id = f"peer-{index}"
            old = self.members.get(peer_id)
            proven = old is not None and bool(member_secret) and bool(old.secret_digest)
            proven = proven and hmac.compare_digest(
                old.secret_digest if old else "", secret_digest(member_secret)
            )
            if old is not None and old.alive and not proven:
                raise Refused(
                    "PERMISSION_DENIED",
                    f"index {index} belongs to a live member; a restarted peer proves it is that "
                    "member with the secret issued at its first join (kept in its --state-dir)",
                )
            secret = member_secret if proven else secrets.token_urlsafe(24)
            member = Member(peer_id, index, address, secrets.token_urlsafe(24), self.clock())
            member.secret_digest, member.secret = secret_digest(secret), secret
            if old is not None:  # a restarted peer: new session, same identity and history
                member.reported, member.joins = old.reported, old.joins + 1
                member.num_samples = old.num_samples
                self._sessions.pop(secret_digest(old.session), None)
                self._event("rejoined", peer_id, proven=proven)
                for r, peers in self.participants.items():
                    if r > self.reported_round and peer_id in peers and r not in member.reported:
                        self.abandoned.setdefault(r, set()).add(peer_id)
            self.members[peer_id] = member
            self._sessions[secret_digest(member.session)] = peer_id
            self.updates.pop(peer_id, None)
            if self.persist:
                self.persist.save_member(member)
            self._cv.notify_all()
            return member

    def authenticate(self, session: str) -> Member:
        if session and len(session) <= 128:
            with self._cv:
                peer_id = self._sessions.get(secret_digest(session))
                if peer_id is not None:
                    return self.members[peer_id]
        raise Refused("UNAUTHENTICATED", "unknown or expired session: join the run first")

    def index_sessions(self) -> None:
        """Rebuild the session lookup (after a restore)."""
        with self._cv:
            self._sessions = {secret_digest(m.session): p for p, m in self.members.items()}

    def wake(self) -> None:
        """Wake every waiter so that it re-checks its condition (a call was cancelled)."""
        with self._cv:
            self._cv.notify_all()

    def heartbeat(self, member: Member) -> None:
        with self._cv:
            member.last_seen = self.clock()
            if not member.alive:
                member.alive = True
                self._event("back", member.peer_id)
                self._cv.notify_all()

    def reported(self, round_: int) -> list[str]:
        """Members that have reported `round_`: their fetches for it are over."""
        with self._cv:
            done = {p for p, m in self.members.items() if round_ in m.reported}
            done |= self.abandoned.get(round_, set())
            return sorted(done | set(self.pending_reports.get(round_, {})))

    def alive(self) -> list[str]:
        with self._cv:
            return sorted(p for p, m in self.members.items() if m.alive)

    def ordered(self, peer_ids: list[str] | set[str]) -> list[str]:
        return sorted(peer_ids, key=lambda p: self.members[p].index)

    def sampled(self, round_: int) -> set[str]:
        """Members that take part in `round_` (all of them without partial participation)."""
        if not self.cfg.clients_per_round:
            return set(self.members)
        return {f"peer-{k}" for k in participants(self.cfg, round_)} & set(self.members)

    @property
    def open_round(self) -> int:
        return self.closed_round + 1

    # ------------------------------------------------------------------ uploads

    def check_round(self, round_: int) -> None:
        if not 1 <= round_ <= self.cfg.rounds:
            raise Refused("INVALID_ARGUMENT", f"round {round_} is outside 1..{self.cfg.rounds}")

    def submit(
        self, member: Member, round_: int, num_samples: int, tensors: dict[str, np.ndarray]
    ) -> None:
        self.check_round(round_)
        expected = upload_prefixes(self.cfg, round_)
        if not expected:
            raise Refused("FAILED_PRECONDITION", "this algorithm uploads nothing")
        if num_samples <= 0:
            raise Refused("INVALID_ARGUMENT", "num_samples must be positive")
        if self.max_samples is not None and num_samples > self.max_samples:
            raise Refused(
                "INVALID_ARGUMENT",
                f"num_samples {num_samples} exceeds the {self.max_samples} training samples of "
                f"{self.cfg.dataset}",
            )
        if num_samples >= 1 << 40:
            raise Refused("INVALID_ARGUMENT", "num_samples is implausibly large")
        for name, array in tensors.items():
            if not name.startswith(expected):
                raise Refused(
                    "INVALID_ARGUMENT", f"tensor {clip(name)} is not uploaded in round {round_}"
                )
            check_tensor_values(name, array, self.cfg.max_tensor_norm)
        if not takes_part(self.cfg, member.index, round_):
            raise Refused("FAILED_PRECONDITION", f"you are not sampled for round {round_}")
        with self._cv:
            if member.num_samples and num_samples != member.num_samples:
                raise Refused(
                    "INVALID_ARGUMENT",
                    f"num_samples {num_samples} differs from the {member.num_samples} declared by "
                    "your first upload",
                )
            if round_ <= self.closed_round and member.peer_id in self.participants.get(round_, []):
                return  # a retry whose first ack was lost: the upload is already in the round
            if round_ <= self.closed_round:
                raise Refused(
                    "FAILED_PRECONDITION",
                    f"round {round_} is already closed (open round: {self.open_round}); catch up",
                )
            if round_ != self.open_round:
                raise Refused(
                    "FAILED_PRECONDITION",
                    f"round {round_} is not open (the open round is {self.open_round})",
                )
            self._check_schema(round_, tensors)
            update = PeerUpdate(member.peer_id, num_samples, tensors)
            if self.persist:
                self.persist.save_update(round_, update)  # durable before it is acked
            self.updates[member.peer_id] = update
            member.num_samples = num_samples
            self.tensors_received.update(n.split(".", 1)[0] for n in tensors)
            member.last_seen = self.clock()
            self._maybe_close()

    def _check_schema(self, round_: int, tensors: dict[str, np.ndarray]) -> None:
        """An upload must hold exactly the parameters this round shares, with the model's shapes."""
        prefixes = upload_prefixes(self.cfg, round_)
        expected = {n: s for n, s in self.schema.items() if n.startswith(prefixes)}
        extra = sorted(set(tensors) - set(expected))
        if extra:
            raise Refused("INVALID_ARGUMENT", f"upload has tensors the model lacks: {extra[:3]}")
        for name, array in tensors.items():
            if tuple(array.shape) != expected[name]:
                raise Refused(
                    "INVALID_ARGUMENT",
                    f"tensor {name!r} has shape {list(array.shape)}, the model has "
                    f"{list(expected[name])}",
                )
        lacking = sorted(set(expected) - set(tensors))
        if lacking:
            raise Refused("INVALID_ARGUMENT", f"upload lacks tensors of the model: {lacking[:3]}")

    def _maybe_close(self) -> None:
        if not self.uploads or self.closed_round >= self.cfg.rounds or self.failure:
            return
        submitted = set(self.updates)
        sampled = self.sampled(self.open_round)
        expected_count = len(participants(self.cfg, self.open_round))
        live = {p for p in sampled if self.members[p].alive}
        everyone = len(sampled) == expected_count and submitted >= live
        deadline = self.clock() - self.round_opened_at >= self.cfg.round_timeout
        if len(submitted) >= self.cfg.min_peers and (everyone or deadline):
            self._close(self.open_round)

    def _close(self, round_: int) -> None:
        peers = self.ordered(set(self.updates))
        started = time.perf_counter()
        outcome = self.strategy.aggregate(round_, [self.updates[p] for p in peers])
        orders = serve_orders(outcome)
        self.round_timings.append(
            {
                "round": round_,
                "uploads": len(peers),
                "sync": outcome.sync,
                "aggregate_seconds": round(time.perf_counter() - started, 4),
            }
        )
        tickets = {
            (source, requester): secrets.token_urlsafe(16)
            for source, reqs in orders.items()
            for requester in reqs
        }
        late = sorted(set(self.alive()) - set(peers))
        if late:
            self._event("left out", *late, round=round_)
        self.closed[round_] = ClosedRound(outcome, peers, tickets, self.clock(), orders)
        self.closed.pop(round_ - 2, None)  # every participant has moved past it by now
        self.participants[round_] = peers
        self.closed_at[round_] = self.clock()
        self.updates = {}
        if any(n.startswith("embedding.") for n in outcome.shared):
            self.embedding_version = round_
        self.closed_round = round_
        self.round_opened_at = self.clock()
        self._save()
        if self.persist:
            self.persist.drop_updates(round_)
        self._cv.notify_all()

    def _limit(self, wait_seconds: float | None) -> float:
        """How long a call may wait here: the protocol's bound, or less if the caller's deadline
        (or its cancellation, which wakes the wait) comes first."""
        limit = 2 * self.cfg.round_timeout + self.cfg.peer_timeout
        return limit if wait_seconds is None else max(0.0, min(limit, wait_seconds))

    def wait_outcome(
        self,
        member: Member,
        round_: int,
        wait_seconds: float | None = None,
        cancelled: threading.Event | None = None,
    ) -> tuple[ClosedRound, int]:
        """Block until `round_` is closed; returns it and the embedding version."""
        self.check_round(round_)
        limit = self._limit(wait_seconds)
        if round_ > self.open_round:
            raise Refused("FAILED_PRECONDITION", f"round {round_} has not opened yet")
        with self._cv:
            ok = self._cv.wait_for(
                lambda: (
                    self.closed_round >= round_
                    or self.failure is not None
                    or (round_ == self.open_round and member.peer_id not in self.updates)
                    or (cancelled is not None and cancelled.is_set())
                ),
                timeout=limit,
            )
            if cancelled is not None and cancelled.is_set():
                raise Refused("CANCELLED", "the call was cancelled")
            if self.failure is not None:
                raise Refused("ABORTED", f"the run failed: {self.failure}")
            if not ok:
                raise Refused("DEADLINE_EXCEEDED", f"round {round_} did not close in {limit:.0f} s")
            if self.closed_round < round_:
                raise Refused("NOT_FOUND", f"no upload from you for round {round_}: resubmit")
            closed = self.closed.get(round_)
            if closed is None or member.peer_id not in closed.participants:
                raise Refused(
                    "FAILED_PRECONDITION",
                    f"you are not a participant of round {round_} (late); catch up",
                )
            return closed, self.embedding_version

    def latest(
        self,
        after_round: int = 0,
        wait_seconds: float | None = None,
        cancelled: threading.Event | None = None,
    ) -> tuple[int, int, dict[str, np.ndarray]]:
        """(last closed round, embedding version, its aggregate) for catching up; with
        `after_round`, first wait (bounded) until that round is closed."""
        if after_round > self.cfg.rounds:
            raise Refused("INVALID_ARGUMENT", f"round {after_round} is past the run's end")
        with self._cv:
            if after_round:
                self._cv.wait_for(
                    lambda: (
                        self.closed_round >= after_round
                        or self.failure is not None
                        or (cancelled is not None and cancelled.is_set())
                    ),
                    timeout=self._limit(wait_seconds),
                )
                if self.failure is not None:
                    raise Refused("ABORTED", f"the run failed: {self.failure}")
                if self.closed_round < after_round:
                    raise Refused("DEADLINE_EXCEEDED", f"round {after_round} did not close in time")
            closed = self.closed.get(self.closed_round)
            shared = closed.outcome.shared if closed else {}
            return self.closed_round, self.embedding_version, shared

    # ------------------------------------------------------------------ metrics

    def report(self, member: Member, round_: int, record: dict[str, Any]) -> None:
        self.check_round(round_)
        with self._cv:
            member.last_seen = self.clock()
            if round_ <= self.reported_round or member.peer_id in self.pending_reports.get(
                round_, {}
            ):
                return  # a retried report: already counted once
            if self.uploads and round_ > self.closed_round:
                raise Refused("FAILED_PRECONDITION", f"round {round_} is not closed yet")
            if self.uploads and member.peer_id not in self.participants.get(round_, ()):
                raise Refused("FAILED_PRECONDITION", f"you did not take part in round {round_}")
            if not self.uploads and not takes_part(self.cfg, member.index, round_):
                raise Refused("FAILED_PRECONDITION", f"you are not sampled for round {round_}")
            self.pending_reports.setdefault(round_, {})[member.peer_id] = record
            self._maybe_write()
            self._save()

    def _maybe_write(self) -> None:
        """Write rounds in order, each once every participant has reported or is gone."""
        while self.reported_round < self.cfg.rounds and not self.failure:
            r = self.reported_round + 1
            got = self.pending_reports.get(r, {})
            if self.uploads:
                if r > self.closed_round:
                    return
                expected = set(self.participants[r])
                since = self.closed_at.get(r, self.round_opened_at)
            else:  # local: no uploads; every sampled member trains
                expected = self.sampled(r)
                since = self.round_opened_at
            deadline = self.clock() - since >= self.cfg.round_timeout
            if not self.uploads and len(self.members) < self.cfg.peers and not deadline:
                return  # the run has not started: not everyone has joined yet
            gone = self.abandoned.get(r, set())
            waiting = {p for p in expected - set(got) - gone if self.members[p].alive}
            if waiting and not deadline:
                return
            if not got:  # nobody left who can report this round: note it and move on
                self._event("no report", *sorted(expected), round=r)
                self.pending_reports.pop(r, None)
                self.abandoned.pop(r, None)
                self.reported_round = r
                self._cv.notify_all()
                continue
            records = [got[p] for p in self.ordered(set(got))]
            missing = sorted(expected - set(got))
            if missing:
                self._event("no report", *missing, round=r)
            self.on_round_reported(r, records)
            for p in got:
                self.members[p].reported.add(r)
            self.pending_reports.pop(r, None)
            self.abandoned.pop(r, None)
            self.closed_at.pop(r, None)
            self.reported_round = r
            if not self.uploads:
                self.round_opened_at = self.clock()
            self._cv.notify_all()

    def wait_run_finished(
        self, wait_seconds: float | None = None, cancelled: threading.Event | None = None
    ) -> bool:
        """Held by peers after their last report so that nobody stops serving experts early."""
        with self._cv:
            ok = self._cv.wait_for(
                lambda: (
                    self.finished
                    or self.failure is not None
                    or (cancelled is not None and cancelled.is_set())
                ),
                timeout=self._limit(wait_seconds),
            )
            if self.failure is not None:
                raise Refused("ABORTED", f"the run failed: {self.failure}")
            return ok

    @property
    def finished(self) -> bool:
        return self.reported_round >= self.cfg.rounds

    # ------------------------------------------------------------------ time passes

    def tick(self) -> None:
        """Notice silent members and passed deadlines (called periodically)."""
        with self._cv:
            now = self.clock()
            final = set(self.pending_reports.get(self.cfg.rounds, {}))
            for m in self.members.values():
                if m.peer_id in final or self.cfg.rounds in m.reported:
                    continue  # done: it stops heartbeating while it waits for the others
                if m.alive and now - m.last_seen > self.cfg.peer_timeout:
                    m.alive = False
                    self._event("silent", m.peer_id, seconds=round(now - m.last_seen, 1))
                    self._cv.notify_all()
            before = (self.closed_round, self.reported_round)
            self._maybe_close()
            self._maybe_write()
            if (self.closed_round, self.reported_round) != before:
                self._save()
            quorum_lost = now - self.round_opened_at > 2 * self.cfg.round_timeout
            if quorum_lost and not self.finished and self.failure is None:
                self.fail(
                    f"round {self.open_round}: no quorum of {self.cfg.min_peers} peers within "
                    f"{2 * self.cfg.round_timeout:.0f} s (live: {self.alive()})"
                )

    def fail(self, reason: str) -> None:
        with self._cv:
            self.failure = reason
            self._cv.notify_all()

    # ------------------------------------------------------------------ reporting

    def _event(self, kind: str, *peers: str, **info: Any) -> None:
        if len(self.events) == self.events.maxlen:
            self.events_dropped += 1
        self.events.append(
            {"event": kind, "peers": list(peers), "open_round": self.open_round, **info}
        )

    def _save(self) -> None:
        if self.persist:
            self.persist.save_state(self)

    def membership_summary(self) -> dict[str, Any]:
        def due(m: Member) -> set[int]:  # rounds it was sampled for and that are written
            return {
                r for r in range(1, self.reported_round + 1) if takes_part(self.cfg, m.index, r)
            }

        return {
            m.peer_id: {
                "address": m.address,
                "joins": m.joins,
                "alive": m.alive,
                "rounds_reported": len(m.reported),
                "rounds_missed": sorted(due(m) - m.reported),
            }
            for m in sorted(self.members.values(), key=lambda m: m.index)
        }

    def dropped_peers(self) -> list[str]:
        """Members that missed a round they were sampled for."""
        return sorted(p for p, s in self.membership_summary().items() if s["rounds_missed"])


def check_tensor_values(name: str, array: np.ndarray, max_norm: float) -> None:
    """Every float tensor that arrives must be finite and within the run's norm bound."""
    if array.dtype.kind != "f":
        return
    norm = float(np.linalg.norm(array.astype(np.float64, copy=False).ravel()))
    if not math.isfinite(norm):
        raise Refused("INVALID_ARGUMENT", f"tensor {clip(name)} has NaN or infinite values")
    if max_norm and norm > max_norm:
        raise Refused(
            "INVALID_ARGUMENT",
            f"tensor {clip(name)} has L2 norm {norm:.3g}, above the bound {max_norm:g}",
        )


__all__ = ["ClosedRound", "Member", "Refused", "RoundBook", "Term", "serve_orders"]
