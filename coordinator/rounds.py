"""Round state on the coordinator: uploads, closing, aggregation, plans; it composes the
membership (coordinator/membership.py) and the report ledger (coordinator/ledger.py) under one
lock, so that every rule below sees one consistent state.

Pure logic: no gRPC here. The service (coordinator/service.py) turns calls into these methods
and their refusals (`Refused`, common/refusal.py) into gRPC statuses; the main loop calls
`tick()` so that deadlines and silent peers are noticed even when no request arrives.

Rules (DESIGN.md §1.4, issues "reliability", "scale", "hostile networks"):
- The run starts when all N peers have joined (or, after the round deadline, with a quorum).
- With partial participation only the round's sampled members (common/config.participants)
  upload and report; the others sit the round out.
- A round closes when every live sampled member has uploaded, or at its deadline (`round_timeout`
  after it opened) if at least `min_peers` have. Members silent for `peer_timeout` are left out;
  late uploads are refused and the peer catches up from the latest aggregate.
- A round's metrics are written once every participant has reported or is gone.
- Every state change worth keeping is handed to `persist` (the checkpoint) before it is acked:
  joins as journal lines, everything else as a whole `snapshot()`.
"""

from __future__ import annotations

import base64
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedmoe.common.config import coordinated, takes_part, upload_prefixes
from fedmoe.common.logsafe import clip
from fedmoe.common.model_schema import model_schema
from fedmoe.common.proto import pb
from fedmoe.common.refusal import Reason, Refused
from fedmoe.coordinator.ledger import Due, ReportLedger
from fedmoe.coordinator.membership import MAX_EVENTS, EventLog, Member, Membership
from fedmoe.coordinator.progress import RunProgress
from fedmoe.coordinator.strategies import PeerUpdate, RoundOutcome, Strategy, Term

# Upper bounds of a peer's training rows per built-in data set (all the set's rows; CIFAR-10's
# full training set). A claimed sample count above it is a lie that would buy FedAvg weight.
MAX_TRAIN_SAMPLES = {
    "digits": 1797,
    "synthetic": 2000,
    "cifar10": 50_000,
    "cifar100": 50_000,
    "fashion-mnist": 60_000,
    "svhn": 73_257,
}
# `fedmoe status` names at most this many alive and missing peers each (counts are exact).
MAX_STATUS_IDS = 32


TICKET_BYTES = 16  # as secrets.token_urlsafe(16): 22 URL-safe characters


def serve_orders(outcome: RoundOutcome) -> dict[str, dict[str, list[int]]]:
    """source peer -> requester -> experts it must serve (the other side of every plan)."""
    orders: dict[str, dict[str, set[int]]] = {}
    for requester, rows in outcome.plans.items():
        for terms in rows.values():
            for t in terms:
                if t.peer_id != requester:
                    orders.setdefault(t.peer_id, {}).setdefault(requester, set()).add(t.expert)
    return {s: {r: sorted(e) for r, e in reqs.items()} for s, reqs in orders.items()}


def new_tickets(orders: dict[str, dict[str, list[int]]]) -> dict[tuple[str, str], str]:
    """One fresh random ticket (128 bits) per (source, requester) pair of the round, drawn
    from the OS in one read rather than one `secrets.token_urlsafe` call per pair: a round
    close at 1,000 peers makes thousands, under the book's lock."""
    pairs = [(source, requester) for source, reqs in orders.items() for requester in reqs]
    raw = secrets.token_bytes(TICKET_BYTES * len(pairs))
    return {
        pair: base64.urlsafe_b64encode(raw[i * TICKET_BYTES : (i + 1) * TICKET_BYTES])
        .rstrip(b"=")
        .decode()
        for i, pair in enumerate(pairs)
    }


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

    def to_dict(self) -> dict[str, Any]:
        """Everything but the aggregate (arrays are saved apart, see coordinator/checkpoint.py)."""
        return {
            "participants": self.participants,
            "sync": self.outcome.sync,
            "plans": {
                peer: {
                    str(m): [[t.peer_id, t.expert, t.weight] for t in terms]
                    for m, terms in rows.items()
                }
                for peer, rows in self.outcome.plans.items()
            },
            "tickets": [[s, q, t] for (s, q), t in self.tickets.items()],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], shared: dict[str, np.ndarray], now: float) -> ClosedRound:
        outcome = RoundOutcome(
            shared=shared,
            sync=d["sync"],
            plans={
                peer: {
                    int(m): [Term(p, int(n), float(w)) for p, n, w in terms]
                    for m, terms in rows.items()
                }
                for peer, rows in d["plans"].items()
            },
        )
        tickets = {(s, q): t for s, q, t in d["tickets"]}
        return cls(outcome, d["participants"], tickets, now)


class _Condition(threading.Condition):
    """The book's condition; every notify_all also calls the listeners, so that waiters outside
    the book's threads (the asyncio service, coordinator/aio_service.py) learn of a change."""

    def __init__(self, listeners: list[Callable[[], None]]) -> None:
        super().__init__()
        self._listeners = listeners

    def notify_all(self) -> None:
        super().notify_all()
        for listener in self._listeners:
            listener()


class Persistence(Protocol):
    def save_update(self, round_: int, update: PeerUpdate) -> None: ...
    def drop_updates(self, round_: int) -> None: ...
    def save_state(self, book: RoundBook) -> None: ...
    def save_member(self, member: Member) -> None: ...


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
        self.uploads = coordinated(cfg)  # local: rounds end with the reports alone
        # Called (under the lock) on every change a waiter could be waiting for.
        self.listeners: list[Callable[[], None]] = []
        self._cv = _Condition(self.listeners)
        # Where joins are told to heartbeat (coordinator/liveness.py); 0: the Coordinator.
        self.liveness_port = 0
        # Called (under the lock; cheap, never taking it) on changes that heartbeat replies show
        # but no waiter waits for: a report (`reported_to`). The liveness mirror listens here.
        self.watchers: list[Callable[[], None]] = []
        # alive() and left(), as every heartbeat returns them: O(N) to build, so built once and
        # dropped on every change of membership or liveness (join, revival) and at every tick.
        self._views: dict[tuple[Any, ...], Any] = {}
        self._last_left: list[str] | None = None  # left() while the lock is taken (see there)
        self.log = EventLog()
        self.membership = Membership(cfg, clock, self.log)
        self.ledger = ReportLedger(cfg.rounds, cfg.round_timeout)
        # round state
        self.updates: dict[str, PeerUpdate] = {}  # uploads of the open round
        self.closed: dict[int, ClosedRound] = {}  # the last two closed rounds
        self.participants: dict[int, list[str]] = {}
        self.closed_at: dict[int, float] = {}  # kept until the round is written
        self.closed_round = 0  # last round whose uploads were aggregated
        self.embedding_version = 0
        self.round_opened_at = clock()
        self.tensors_received: set[str] = set()
        self.round_timings: list[dict[str, Any]] = []  # aggregate + plan time per closed round
        self.max_samples = MAX_TRAIN_SAMPLES.get(cfg.dataset)  # None: not known here
        self.failure: str | None = None
        self.schema = model_schema(cfg)
        self.progress = RunProgress(clock())  # totals for `fedmoe status`

    # ------------------------------------------------------------------ views of the parts

    @property
    def members(self) -> dict[str, Member]:
        return self.membership.members

    @property
    def events(self) -> Any:
        return self.log.events

    @property
    def events_dropped(self) -> int:
        return self.log.dropped

    @property
    def reported_round(self) -> int:
        return self.ledger.reported_round

    @property
    def pending_reports(self) -> dict[int, dict[str, dict[str, Any]]]:
        return self.ledger.pending

    @property
    def advertise_allow(self) -> tuple:
        return self.membership.advertise_allow

    @advertise_allow.setter
    def advertise_allow(self, networks: tuple) -> None:
        self.membership.advertise_allow = networks

    @property
    def open_round(self) -> int:
        return self.closed_round + 1

    @property
    def finished(self) -> bool:
        return self.ledger.finished

    # ------------------------------------------------------------------ membership

    def join(
        self, index: int, address: str, member_secret: str = "", any_index: bool = False
    ) -> Member:
        """Admit peer `index` (see Membership.admit); `Member.secret` holds its member secret.

        With `any_index` the index is assigned (Membership.assign; `index` is a hint), in the
        same lock as the admission, so that two auto peers never get the same one."""
        with self._cv:
            if any_index:
                index = self.membership.assign(index, member_secret)
            member, old = self.membership.admit(index, address, member_secret, self.open_round)
            if old is not None:  # rounds it took part in but can no longer finish
                for r, peers in self.participants.items():
                    if r > self.reported_round and member.peer_id in peers:
                        if r not in member.reported:
                            self.ledger.abandon(r, member.peer_id)
            self.updates.pop(member.peer_id, None)
            if self.persist:
                self.persist.save_member(member)
            self._views.clear()
            self._cv.notify_all()
            return member

    def authenticate(self, session: str) -> Member:
        # Dict reads only (atomic under the GIL), so no lock: every call authenticates, and none
        # should queue behind a round close, which holds the lock for the whole aggregate.
        return self.membership.authenticate(session)

    def wake(self) -> None:
        """Wake every waiter so that it re-checks its condition (a call was cancelled)."""
        with self._cv:
            self._cv.notify_all()

    def heartbeat(self, member: Member, block: bool = True) -> bool:
        """Note a heartbeat. Without `block`, False (nothing done) when it needs the lock (a
        silent member revived) and another thread holds it."""
        if member.alive:  # the common case: one attribute write, no lock
            member.last_seen = self.clock()
            return True
        if not self._cv.acquire(blocking=block):
            return False
        try:
            if self.membership.seen(member, self.open_round):
                self._views.clear()
                self._cv.notify_all()
        finally:
            self._cv.release()
        return True

    def reported(self, round_: int) -> list[str]:
        """Members that have reported `round_` (or never will): their fetches for it are over.
        O(N): for the end of the run; heartbeats ask `reported_to`, which is O(requesters)."""
        with self._cv:
            return sorted(p for p in self.members if self._done_with(p, round_))

    def _done_with(self, peer_id: str, round_: int) -> bool:
        member = self.members.get(peer_id)
        return (member is not None and round_ in member.reported) or self.ledger.is_done(
            round_, peer_id
        )

    def done_with(self, round_: int) -> set[str]:
        """Every member `_done_with` round_, at once: O(N), lock-free (C-level copies of dicts
        and sets other threads may be changing). For the liveness mirror, which needs
        `reported_to` of every source: one set, then membership tests."""
        done = set(self.ledger.pending.get(round_, ())) | set(self.ledger.abandoned.get(round_, ()))
        done.update(p for p, m in list(self.members.items()) if round_ in m.reported)
        return done

    def reported_to(self, source: str, round_: int) -> list[str]:
        """Of the members `source` serves in `round_`, those done with it (see `reported`).

        Every heartbeat asks this, so it looks only at the source's requesters (at most P x M),
        lock-free: dict and set membership tests are atomic under the GIL."""
        closed = self.closed.get(round_)
        requesters = closed.orders.get(source, {}) if closed else {}
        return [p for p in sorted(requesters) if self._done_with(p, round_)]

    def left(self, block: bool = True) -> list[str] | None:
        """Members no longer alive (silent past peer_timeout); usually none. Without `block`,
        when the view must be built and another thread holds the lock: the last one built
        (a tick or a change old; None before the first), not a wait behind a round close."""
        view = self._views.get(("left",))  # lock-free when built, like alive()
        if view is None:
            # Built by the first caller after a change, not by every waiter.
            if not self._cv.acquire(blocking=block):
                return self._last_left
            try:
                view = self._views.get(("left",))
                if view is None:
                    view = self._views[("left",)] = sorted(
                        p for p, m in self.members.items() if not m.alive
                    )
                    self._last_left = view
            finally:
                self._cv.release()
        return view

    def alive(self) -> list[str]:
        view = self._views.get(("alive",))  # lock-free when built
        if view is None:
            with self._cv:
                view = self._views.get(("alive",))
                if view is None:
                    view = self._views[("alive",)] = self.membership.alive()
        return view

    def ordered(self, peer_ids: Iterable[str]) -> list[str]:
        return self.membership.ordered(peer_ids)

    def sampled(self, round_: int) -> set[str]:
        return self.membership.sampled(round_)

    # ------------------------------------------------------------------ uploads

    def check_round(self, round_: int) -> None:
        if not 1 <= round_ <= self.cfg.rounds:
            raise Refused(Reason.BAD_REQUEST, f"round {round_} is outside 1..{self.cfg.rounds}")

    def submit(
        self, member: Member, round_: int, num_samples: int, tensors: dict[str, np.ndarray]
    ) -> None:
        self.check_round(round_)
        if not self.uploads:
            raise Refused(Reason.WRONG_TIME, "this algorithm uploads nothing")
        # May be empty: a frozen embedding's fedmoe-da round between syncs uploads no tensor.
        expected = upload_prefixes(self.cfg, round_)
        self._check_samples(num_samples)
        for name, array in tensors.items():
            if not name.startswith(expected):
                raise Refused(
                    Reason.BAD_REQUEST, f"tensor {clip(name)} is not uploaded in round {round_}"
                )
            check_tensor_values(name, array, self.cfg.max_tensor_norm)
        if not takes_part(self.cfg, member.index, round_):
            raise Refused(Reason.WRONG_TIME, f"you are not sampled for round {round_}")
        with self._cv:
            if member.num_samples and num_samples != member.num_samples:
                raise Refused(
                    Reason.BAD_REQUEST,
                    f"num_samples {num_samples} differs from the {member.num_samples} declared by "
                    "your first upload",
                )
            if round_ <= self.closed_round and member.peer_id in self.participants.get(round_, []):
                return  # a retry whose first ack was lost: the upload is already in the round
            if round_ <= self.closed_round:
                raise Refused(
                    Reason.WRONG_TIME,
                    f"round {round_} is already closed (open round: {self.open_round}); catch up",
                )
            if round_ != self.open_round:
                raise Refused(
                    Reason.WRONG_TIME,
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

    def _check_samples(self, num_samples: int) -> None:
        """A sample count buys FedAvg weight: it must be positive and within the data set."""
        if num_samples <= 0:
            raise Refused(Reason.BAD_REQUEST, "num_samples must be positive")
        if self.max_samples is not None and num_samples > self.max_samples:
            raise Refused(
                Reason.BAD_REQUEST,
                f"num_samples {num_samples} exceeds the {self.max_samples} training samples of "
                f"{self.cfg.dataset}",
            )
        if num_samples >= 1 << 40:
            raise Refused(Reason.BAD_REQUEST, "num_samples is implausibly large")

    def _check_schema(self, round_: int, tensors: dict[str, np.ndarray]) -> None:
        """An upload must hold exactly the parameters this round shares, with the model's shapes."""
        prefixes = upload_prefixes(self.cfg, round_)
        expected = {n: s for n, s in self.schema.items() if n.startswith(prefixes)}
        extra = sorted(set(tensors) - set(expected))
        if extra:
            raise Refused(
                Reason.BAD_REQUEST, f"upload has tensors the model lacks: {clip(extra[:3])}"
            )
        for name, array in tensors.items():
            if tuple(array.shape) != expected[name]:
                raise Refused(
                    Reason.BAD_REQUEST,
                    f"tensor {name!r} has shape {list(array.shape)}, the model has "
                    f"{list(expected[name])}",
                )
        lacking = sorted(set(expected) - set(tensors))
        if lacking:
            raise Refused(Reason.BAD_REQUEST, f"upload lacks tensors of the model: {lacking[:3]}")

    def _maybe_close(self) -> None:
        """Close the open round once every live participant has uploaded (or at its deadline
        with a quorum). Runs on every upload, under the lock: O(1) until the upload count
        reaches the live participants' count, so a round of N uploads costs O(N), not O(N^2)."""
        if not self.uploads or self.closed_round >= self.cfg.rounds or self.failure:
            return
        submitted = len(self.updates)
        if submitted < self.cfg.min_peers:
            return
        r = self.open_round
        deadline = self.clock() - self.round_opened_at >= self.cfg.round_timeout
        if deadline or self._everyone_submitted(r, submitted):
            self._close(r)

    def _everyone_submitted(self, r: int, submitted: int) -> bool:
        if not self.membership.all_joined(r):
            return False
        key = ("live sampled", r)
        live = self._views.get(key)
        if live is None:  # rebuilt after a change of membership or liveness (see _views)
            live = self._views[key] = frozenset(
                p for p in self.membership.sampled(r) if self.members[p].alive
            )
        return submitted >= len(live) and live <= self.updates.keys()

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
        tickets = new_tickets(orders)
        late = sorted((set(self.membership.alive()) & self.sampled(round_)) - set(peers))
        if late:
            self._event("left out", *late, round=round_)
        self.closed[round_] = ClosedRound(outcome, peers, tickets, self.clock(), orders)
        self.closed.pop(round_ - 2, None)  # every participant has moved past it by now
        self.participants[round_] = peers
        self.closed_at[round_] = self.clock()
        if any(n.startswith("embedding.") for n in outcome.shared):
            self.embedding_version = round_
        # In this order for the lock-free readers (outcome_now, latest_now): the outcome and
        # the version are in place before closed_round advances, and the uploads are dropped
        # only after it, so a reader never sees the round open without this member's upload.
        self.closed_round = round_
        self.updates = {}
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
        self._check_outcome_round(round_)
        limit = self._limit(wait_seconds)
        with self._cv:
            ok = self._cv.wait_for(
                lambda: (
                    self._outcome_ready(member, round_)
                    or (cancelled is not None and cancelled.is_set())
                ),
                timeout=limit,
            )
            if cancelled is not None and cancelled.is_set():
                raise Refused(Reason.CANCELLED, "the call was cancelled")
            if not ok and self.failure is None:
                raise Refused(Reason.TIMED_OUT, f"round {round_} did not close in {limit:.0f} s")
            return self._outcome(member, round_)

    def outcome_now(self, member: Member, round_: int) -> tuple[ClosedRound, int] | None:
        """`wait_outcome` without waiting and without the lock: its result or refusal, None
        while the round is not closed. Plain reads suffice: `_close` stores the outcome and the
        embedding version before it advances `closed_round` (and drops the uploads after), and
        a failure is one attribute."""
        self._check_outcome_round(round_)
        if not self._outcome_ready(member, round_):
            return None
        return self._outcome(member, round_)

    def _check_outcome_round(self, round_: int) -> None:
        self.check_round(round_)
        if round_ > self.open_round:
            raise Refused(Reason.WRONG_TIME, f"round {round_} has not opened yet")

    def _outcome_ready(self, member: Member, round_: int) -> bool:
        return (
            self.closed_round >= round_
            or self.failure is not None
            or (round_ == self.open_round and member.peer_id not in self.updates)
        )

    def _outcome(self, member: Member, round_: int) -> tuple[ClosedRound, int]:
        """What a result wait that has ended gets (its condition holds, or a failure)."""
        if self.failure is not None:
            raise Refused(Reason.RUN_FAILED, f"the run failed: {self.failure}")
        if self.closed_round < round_:
            raise Refused(Reason.NOTHING_THERE, f"no upload from you for round {round_}: resubmit")
        closed = self.closed.get(round_)
        if closed is None or member.peer_id not in closed.participants:
            raise Refused(
                Reason.WRONG_TIME,
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
            raise Refused(Reason.BAD_REQUEST, f"round {after_round} is past the run's end")
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
                    raise Refused(Reason.RUN_FAILED, f"the run failed: {self.failure}")
                if self.closed_round < after_round:
                    raise Refused(Reason.TIMED_OUT, f"round {after_round} did not close in time")
            closed = self.closed.get(self.closed_round)
            shared = closed.outcome.shared if closed else {}
            return self.closed_round, self.embedding_version, shared

    def latest_now(self, after_round: int = 0) -> tuple[int, int, dict[str, np.ndarray]] | None:
        """`latest` without waiting and without the lock: its result or refusal, None while
        `after_round` is not closed (plain reads, in `_close`'s order; see `outcome_now`)."""
        if after_round > self.cfg.rounds:
            raise Refused(Reason.BAD_REQUEST, f"round {after_round} is past the run's end")
        if self.failure is not None and after_round:
            raise Refused(Reason.RUN_FAILED, f"the run failed: {self.failure}")
        for _ in range(3):  # a close between the reads: read again (closes are seconds apart)
            round_ = self.closed_round
            if round_ < after_round:
                return None
            version, closed = self.embedding_version, self.closed.get(round_)
            if version <= round_ and self.closed_round == round_:
                break
        shared = closed.outcome.shared if closed else {}
        return round_, version, shared

    # ------------------------------------------------------------------ metrics

    def report(self, member: Member, round_: int, record: dict[str, Any]) -> None:
        self.check_round(round_)
        with self._cv:
            member.last_seen = self.clock()
            if round_ <= self.reported_round or member.peer_id in self.ledger.pending.get(
                round_, {}
            ):
                return  # a retried report: already counted once
            if self.uploads and round_ > self.closed_round:
                raise Refused(Reason.WRONG_TIME, f"round {round_} is not closed yet")
            if self.uploads and member.peer_id not in self.participants.get(round_, ()):
                raise Refused(Reason.WRONG_TIME, f"you did not take part in round {round_}")
            if not self.uploads and not takes_part(self.cfg, member.index, round_):
                raise Refused(Reason.WRONG_TIME, f"you are not sampled for round {round_}")
            self.ledger.add(round_, member.peer_id, record)
            for watcher in self.watchers:
                watcher()
            self._maybe_write()
            self._save()

    def _due(self, r: int) -> Due | None:
        """Who must report round r, and since when it is reportable (None: not yet)."""
        if self.uploads:
            if r > self.closed_round:
                return None
            since = self.closed_at.get(r, self.round_opened_at)
            return Due(self._expected(r), since)
        # local: no uploads; every sampled member trains, once everyone has joined
        started = len(self.members) >= self.cfg.peers
        return Due(frozenset(self.sampled(r)), self.round_opened_at, started)

    def _expected(self, r: int) -> frozenset[str]:
        """Round r's participants as a set, built once per round (every report asks)."""
        key = ("expected", r)
        expected = self._views.get(key)
        if expected is None:
            expected = self._views[key] = frozenset(self.participants[r])
        return expected

    def _written(self, r: int, peers: list[str], records: list[dict[str, Any]]) -> None:
        self.on_round_reported(r, records)
        self.progress.add(records, self.clock())
        for p in peers:
            self.members[p].reported.add(r)
        if not self.uploads:
            self.round_opened_at = self.clock()

    def _maybe_write(self) -> None:
        """Write rounds in order, each once every participant has reported or is gone."""
        if self.failure:
            return
        written = self.ledger.flush(
            self._due,
            lambda p: self.members[p].alive,
            self.ordered,
            self._written,
            lambda kind, peers, **info: self._event(kind, *peers, **info),
            self.clock(),
        )
        for r in written:
            self.closed_at.pop(r, None)
        if written:
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
                raise Refused(Reason.RUN_FAILED, f"the run failed: {self.failure}")
            return ok

    def run_finished_now(self) -> bool | None:
        """`wait_run_finished` without waiting: True once finished, None until then; a failed
        run is refused. Plain reads, no lock."""
        if self.failure is not None:
            raise Refused(Reason.RUN_FAILED, f"the run failed: {self.failure}")
        return True if self.finished else None

    # ------------------------------------------------------------------ time passes

    def tick(self) -> None:
        """Notice silent members and passed deadlines (called periodically)."""
        with self._cv:
            self._views.clear()
            now = self.clock()
            final = set(self.ledger.pending.get(self.cfg.rounds, {}))
            if self.membership.mark_silent(final, self.open_round):
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
                    f"{2 * self.cfg.round_timeout:.0f} s (live: {len(self.membership.alive())})"
                )

    def fail(self, reason: str) -> None:
        with self._cv:
            self.failure = reason
            self._cv.notify_all()

    # ------------------------------------------------------------------ state

    def _event(self, kind: str, *peers: str, **info: Any) -> None:
        self.log.add(kind, peers, self.open_round, **info)

    def _save(self) -> None:
        if self.persist:
            self.persist.save_state(self)

    def snapshot(self) -> dict[str, Any]:
        """Everything needed to resume, as JSON-able values; the closed rounds' aggregates are
        in `closed_shared()` (arrays, saved apart)."""
        with self._cv:
            return {
                "closed_round": self.closed_round,
                "embedding_version": self.embedding_version,
                "members": self.membership.snapshot(),
                "participants": {str(r): p for r, p in self.participants.items()},
                **self.ledger.snapshot(),
                "closed": {str(r): c.to_dict() for r, c in self.closed.items()},
                "tensors_received": sorted(self.tensors_received),
                "events": list(self.log.events),
                "events_dropped": self.log.dropped,
            }

    def closed_shared(self) -> dict[int, dict[str, np.ndarray]]:
        with self._cv:
            return {r: c.outcome.shared for r, c in self.closed.items()}

    def restore(
        self,
        state: dict[str, Any],
        shared: dict[int, dict[str, np.ndarray]],
        updates: dict[str, PeerUpdate],
        joined_since: list[dict[str, Any]] | None = None,
    ) -> None:
        """Load a `snapshot()` (plus the joins journaled after it and the open round's saved
        uploads) into this fresh book (same config)."""
        with self._cv:
            now = self.clock()
            self.closed_round = state["closed_round"]
            self.embedding_version = state["embedding_version"]
            self.membership.restore([*state["members"], *(joined_since or [])])
            self.participants = {int(r): p for r, p in state["participants"].items()}
            self.ledger.restore(state)
            self.closed = {
                int(r): ClosedRound.from_dict(c, shared[int(r)], now)
                for r, c in state["closed"].items()
            }
            self.tensors_received = set(state["tensors_received"])
            self.log.restore({"events": state["events"], "dropped": state.get("events_dropped", 0)})
            self.updates = dict(updates)
            self.round_opened_at = now
            self._event("coordinator restarted")

    def membership_summary(self) -> dict[str, Any]:
        with self._cv:
            return self.membership.summary(self.reported_round)

    def status(self) -> dict[str, Any]:
        """Where the run stands, for `fedmoe status`: O(N) at most, id lists bounded."""
        with self._cv:
            alive = self.membership.alive()
            alive_set = set(alive)
            missing = [f"peer-{k}" for k in range(self.cfg.peers) if f"peer-{k}" not in alive_set]
            p = self.progress
            return {
                "reported_round": self.reported_round,
                # `local` closes no rounds: its open round is the next one to report
                "open_round": min(
                    self.open_round if self.uploads else self.reported_round + 1, self.cfg.rounds
                ),
                "finished": self.finished,
                "failure": self.failure or "",
                "alive_count": len(alive),
                "missing_count": len(missing),
                "alive": self.ordered(alive)[:MAX_STATUS_IDS],
                "missing": missing[:MAX_STATUS_IDS],
                "coordinator_bytes": p.coordinator_bytes,
                "p2p_bytes": p.p2p_bytes,
                "last_accuracy": p.last_accuracy,
                "last_global_accuracy": p.last_global_accuracy,
                "mean_round_seconds": p.mean_round_seconds(),
                "eta_seconds": None
                if self.finished
                else p.eta_seconds(self.cfg.rounds - self.reported_round),
                "elapsed_seconds": max(0.0, self.clock() - p.started),
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
        raise Refused(Reason.BAD_REQUEST, f"tensor {clip(name)} has NaN or infinite values")
    if max_norm and norm > max_norm:
        raise Refused(
            Reason.BAD_REQUEST,
            f"tensor {clip(name)} has L2 norm {norm:.3g}, above the bound {max_norm:g}",
        )


__all__ = [
    "MAX_EVENTS",
    "ClosedRound",
    "Member",
    "Reason",
    "Refused",
    "RoundBook",
    "Term",
    "serve_orders",
]
