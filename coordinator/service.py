"""The Coordinator gRPC service: authenticates callers, translates RPCs into RoundBook calls,
and counts the bytes of every message it handles.

The peers count their side in the channel (common/accounting.CountingInterceptor). Here counting
stays explicit, at each handler, because its rules depend on what the handler decides, which a
server interceptor sees only as a status: a call is counted once it is accepted (a refused
GetRoundResult or a second report is not), a Join counts under the start round the handler
chooses, an upload counts what arrived even when it is refused part-way, and a metrics report and
its ack go into the round's record only once the book has taken the report."""

from __future__ import annotations

import hmac
import logging
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import grpc

from fedmoe.common.accounting import PHASES
from fedmoe.common.auth import SESSION_METADATA, TOKEN_METADATA, acting_as
from fedmoe.common.config import ALGORITHM_NAMES, upload_prefixes, wire_dtype
from fedmoe.common.grpc_status import status_of
from fedmoe.common.logsafe import clip, clip_text
from fedmoe.common.proto import pb, rpc
from fedmoe.common.refusal import Refused
from fedmoe.common.tensors import (
    TensorAssembler,
    TensorSpec,
    WireError,
    chunk_tensors,
    numpy_to_wire,
)
from fedmoe.common.tls import peer_identity
from fedmoe.coordinator.membership import Member
from fedmoe.coordinator.rounds import RoundBook

log = logging.getLogger("fedmoe.coordinator")


# Concurrent calls one member may have open per method. An honest peer has at most one (two
# while a retry overlaps a call the network lost); more is a member trying to hold threads.
CALLS_PER_MEMBER = {"Heartbeat": 4}
DEFAULT_CALLS_PER_MEMBER = 2
DECODERS = 4  # uploads decoded at once
# Round results streamed at once. When a round closes, ~N held GetRoundResult calls wake
# together; all of them streaming at once kept ~N threads runnable under the GIL and queued every
# heartbeat behind them. With a few at a time a heartbeat waits behind only these few; the price
# is a slower delivery (1,000 peers, quiet 2 cores: heartbeat p99 0.15-0.96 s instead of 1.9 s,
# round close 2.4-2.8 s instead of 1.4 s; README "Scale"). A sender that cannot get a slot in
# SENDER_WAIT_SECONDS (slots held by readers that stopped reading) sends without one, so stalled
# readers can slow the delivery but never stop it.
SENDERS = 8
SENDER_WAIT_SECONDS = 2.0
# Heartbeats the coordinator asks for, per second, whatever N: each costs ~0.5 ms of its one
# Python core, so at 1,000 peers beating every peer_timeout / 5 (500/s) they took ~40% of it
# (bench/scale.py). Never rarer than twice per peer timeout, so liveness stays detectable.
MAX_HEARTBEATS_PER_SECOND = 200
# GetStatus calls served at once, all callers together: a status caller is no member, so there
# is no identity to cap per caller; a handful is plenty for people polling a run.
STATUS_CALLS = 4
NOT_FINISHED = "other peers did not finish the last round"
INVALID_TOKEN = "invalid join token for this run"


def heartbeat_ms(cfg: pb.RunConfig) -> int:
    """How often peers heartbeat: five times per peer timeout (at most every 200 ms), spread
    out at large N to about MAX_HEARTBEATS_PER_SECOND in total, never rarer than twice per
    peer timeout."""
    base = max(200, int(cfg.peer_timeout * 1000 / 5))
    spread = int(1000 * cfg.peers / MAX_HEARTBEATS_PER_SECOND)
    return max(200, min(max(base, spread), int(cfg.peer_timeout * 1000 / 2)))


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    log.warning("refused %s: %s: %s", clip(context.peer()), code.name, clip(message, 200))
    context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort raises


def _refuse(context: grpc.ServicerContext, refusal: Refused) -> NoReturn:
    _abort(context, status_of(refusal.reason), str(refusal))


def _metadata(context: grpc.ServicerContext, key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode(errors="replace")
    return ""


def _certificate_index(context: grpc.ServicerContext, name: str | None) -> int:
    """K of a certificate named peer-K (an auto peer under mutual TLS joins as K)."""
    digits = name[5:] if name and name.startswith("peer-") else ""
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 6):
        _abort(
            context,
            grpc.StatusCode.PERMISSION_DENIED,
            f"certificate {clip(name)} names no peer index (peer-K): it may not join as a peer",
        )
    return int(digits)


class _Waiting:
    """Lets a blocked call end as soon as its caller cancels it (or its deadline passes).

    gRPC runs the callback when the call ends for any reason; only a call still blocked in the
    book needs waking, so finished calls do not wake every other waiter (at 1,000 peers that
    would be a million wake-ups per round)."""

    def __init__(self, context: grpc.ServicerContext, book: RoundBook) -> None:
        self.cancelled = threading.Event()
        self.seconds = context.time_remaining()
        self.blocked = True

        def ended() -> None:
            self.cancelled.set()
            if self.blocked:
                book.wake()  # the waiter re-checks its condition and sees the cancellation

        context.add_callback(ended)


def _check_report(request: pb.MetricsReport, cfg: pb.RunConfig) -> str | None:
    """What is wrong with a metrics report, if anything: every figure is finite and in range."""
    for name in ("accuracy", "global_accuracy"):
        value = getattr(request, name)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            return f"{name} must be a number in [0, 1]"
    if request.HasField("val_accuracy"):
        if not cfg.val_fraction:
            return "val_accuracy sent, but the run has no validation split (val_fraction 0)"
        if not (math.isfinite(request.val_accuracy) and 0.0 <= request.val_accuracy <= 1.0):
            return "val_accuracy must be a number in [0, 1]"
    for name in ("loss", "seconds", "train_seconds", "exchange_seconds"):
        value = getattr(request, name)
        if not (math.isfinite(value) and 0.0 <= value < 1e9):
            return f"{name} must be a finite non-negative number"
    for name, value in request.phase_seconds.items():
        if name not in PHASES:
            return f"unknown phase {clip_text(name)!r} in phase_seconds"
        if not (math.isfinite(value) and 0.0 <= value < 1e9):
            return f"phase_seconds[{name}] must be a finite non-negative number"
    # Phases are disjoint parts of the round (peer/runner.PhaseTimer): they fit in its seconds.
    if sum(request.phase_seconds.values()) > request.seconds * (1 + 1e-6) + 1e-3:
        return "phase_seconds add up to more than the round's seconds"
    if request.experts_fetched > cfg.peers * cfg.num_experts:
        return "experts_fetched exceeds the pool"
    counts = [request.wire_sent, request.wire_received]
    counts += [getattr(request.bytes, f) for f in ("coordinator_sent", "coordinator_received")]
    counts += [request.bytes.p2p_sent, request.bytes.p2p_received, request.num_samples]
    if any(c >= 1 << 50 for c in counts):
        return "byte or sample counts are implausibly large"
    if len(request.wire_interfaces) > 256:
        return "wire_interfaces is too long"
    return None


class CoordinatorService(rpc.CoordinatorServicer):
    """The coordinator's calls. Their bytes are counted by the server's
    CountingServerInterceptor (coordinator/main.py), not here."""

    def __init__(self, book: RoundBook, token: str, tls: bool = False) -> None:
        self.book = book
        self.cfg = book.cfg
        self.token = token
        self.tls = tls  # under mutual TLS a certificate name is bound to the index it joins as
        self.told_finished: set[str] = set()  # members a heartbeat told that the run is over
        # Decoding uploads is Python work under the GIL: with 1,000 uploads decoding at once,
        # every heartbeat waited behind hundreds of runnable threads (p99 1.4 s). A few at a
        # time keep the queue for the GIL short; a slow sender holds no slot while it sends.
        self._decoding = threading.BoundedSemaphore(DECODERS)
        self._sending = threading.BoundedSemaphore(SENDERS)
        self._calls: dict[tuple[str, str], int] = {}
        # The aggregate's chunks, encoded once: every peer of a round fetches the same bytes.
        self._shared_parts: tuple[dict[str, Any], list[pb.RoundResultPart]] | None = None
        self._calls_lock = threading.Lock()
        self._status_calls = threading.BoundedSemaphore(STATUS_CALLS)

    def _member(self, context: grpc.ServicerContext, peer_id: str) -> Member:
        """The caller's membership, from its session secret; it may act only as itself.

        Read from metadata before anything of the request stream: a caller without a session
        is refused at once and holds no thread."""
        try:
            member = self.book.authenticate(_metadata(context, SESSION_METADATA))
            acting_as(member.peer_id, peer_id)
        except Refused as e:
            _refuse(context, e)
        return member

    @contextmanager
    def _blocking(self, context: grpc.ServicerContext) -> Iterator[_Waiting]:
        """Around a wait in the book: bounded by the call's deadline, ended by its cancellation,
        and a refusal answered with its status."""
        waiting = _Waiting(context, self.book)
        try:
            yield waiting
        except Refused as e:
            _refuse(context, e)
        finally:
            waiting.blocked = False

    @contextmanager
    def _sender(self) -> Iterator[None]:
        """One of the SENDERS slots for streaming a result, or none after SENDER_WAIT_SECONDS."""
        held = self._sending.acquire(timeout=SENDER_WAIT_SECONDS)
        try:
            yield
        finally:
            if held:
                self._sending.release()

    @contextmanager
    def _slot(self, context: grpc.ServicerContext, member: Member, method: str) -> Iterator[None]:
        """Bound the calls one member may hold open at once (RESOURCE_EXHAUSTED beyond)."""
        key = (member.peer_id, method)
        limit = CALLS_PER_MEMBER.get(method, DEFAULT_CALLS_PER_MEMBER)
        with self._calls_lock:
            if self._calls.get(key, 0) >= limit:
                busy = True
            else:
                busy = False
                self._calls[key] = self._calls.get(key, 0) + 1
        if busy:
            _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{member.peer_id} already has {limit} {method} call(s) open",
            )
        try:
            yield
        finally:
            with self._calls_lock:
                self._calls[key] -= 1
                if not self._calls[key]:
                    del self._calls[key]

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        if not hmac.compare_digest(
            _metadata(context, TOKEN_METADATA).encode(), self.token.encode()
        ):
            _abort(context, grpc.StatusCode.UNAUTHENTICATED, INVALID_TOKEN)
        index, any_index = request.index, request.any_index
        if self.tls:
            name = peer_identity(context.auth_context() or {})
            if any_index:  # the certificate is the identity: peer-K joins as K
                index, any_index = _certificate_index(context, name), False
            if name != f"peer-{index}":
                _abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"certificate {clip(name)} may not join as peer-{index}",
                )
        try:
            member = self.book.join(index, request.advertise, request.member_secret, any_index)
        except Refused as e:
            _refuse(context, e)
        log.info("%s joined from %s (%s)", member.peer_id, member.address, clip(context.peer()))
        start = self.book.open_round if self.book.uploads else self.book.reported_round + 1
        reply = pb.JoinReply(
            peer_id=member.peer_id,
            config=self.cfg,
            start_round=start,
            session=member.session,
            heartbeat_ms=heartbeat_ms(self.cfg),
            member_secret=member.secret,
            liveness_port=self.book.liveness_port,
        )
        return reply

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        member = self._member(context, request.peer_id)
        if request.round > self.cfg.rounds + 1:
            _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"round {request.round} is past the run's end",
            )
        self.book.heartbeat(member)
        if self.book.finished:
            self.told_finished.add(member.peer_id)
        reply = pb.HeartbeatReply(
            open_round=self.book.open_round,
            run_finished=self.book.finished,
            reported=self.book.reported_to(member.peer_id, request.round),
            left=self.book.left(),
            liveness_port=self.book.liveness_port,
        )
        return reply

    def SubmitUpdate(
        self, request_iterator: Iterator[pb.UpdatePart], context: grpc.ServicerContext
    ) -> pb.UpdateAck:
        member = self._member(context, "")  # before reading a byte of the stream
        with self._slot(context, member, "SubmitUpdate"):
            return self._submit(member, request_iterator, context)

    def _submit(
        self,
        member: Member,
        request_iterator: Iterator[pb.UpdatePart],
        context: grpc.ServicerContext,
    ) -> pb.UpdateAck:
        parts = iter(request_iterator)
        first = next(parts, None)
        if first is None or not first.HasField("header"):
            _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "an update stream must start with its header",
            )
        header = first.header
        try:
            acting_as(member.peer_id, header.peer_id)
        except Refused as e:
            _refuse(context, e)
        tensors: dict = {}
        try:
            self.book.check_round(header.round)
            # Names, shapes and dtype are checked per chunk, before any buffer is allocated.
            assembler = TensorAssembler(expected=self.upload_specs(header.round), require_all=False)
            for part in parts:  # waiting for the network here, outside the gate
                if not part.HasField("chunk"):
                    raise WireError("a second header inside one update stream")
                with self._decoding:
                    assembler.add(part.chunk)
            with self._decoding:
                tensors = {n: t.to_numpy() for n, t in assembler.finish().items()}
                self.book.submit(member, header.round, header.num_samples, tensors)
        except WireError as e:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"update from {member.peer_id}: {e}")
        except Refused as e:
            _refuse(context, e)
        ack = pb.UpdateAck(round=header.round, tensors=len(tensors))
        return ack

    def GetRoundResult(
        self, request: pb.RoundRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.RoundResultPart]:
        member = self._member(context, request.peer_id)
        with self._slot(context, member, "GetRoundResult"):
            with self._blocking(context) as w:
                closed, version = self.book.wait_outcome(
                    member, request.round, w.seconds, w.cancelled
                )
            with self._sender():
                yield from self._round_result(member, request, closed, version)

    def _round_result(
        self, member: Member, request: pb.RoundRequest, closed: Any, version: int
    ) -> Iterator[pb.RoundResultPart]:
        plan = self.result_plan(member, request, closed, version)
        yield from self._stream(plan, closed.outcome.shared)

    def result_plan(
        self, member: Member, request: pb.RoundRequest, closed: Any, version: int
    ) -> pb.Plan:
        """A participant's plan for a closed round: its rows, sources (with tickets), orders."""
        me = member.peer_id
        rows = closed.outcome.plans.get(me, {})
        sources = sorted({t.peer_id for terms in rows.values() for t in terms} - {me})
        orders = closed.orders.get(me, {})
        return pb.Plan(
            round=request.round,
            embedding_version=version,
            sync=closed.outcome.sync,
            rows=[
                pb.PlanRow(
                    expert=m,
                    terms=[
                        pb.PlanTerm(peer_id=t.peer_id, expert=t.expert, weight=t.weight)
                        for t in terms
                    ],
                )
                for m, terms in sorted(rows.items())
            ],
            sources=[
                pb.PeerAddress(
                    peer_id=p, address=self.book.members[p].address, ticket=closed.tickets[(p, me)]
                )
                for p in sources
            ],
            serves=[
                pb.ServeOrder(peer_id=r, experts=e, ticket=closed.tickets[(me, r)])
                for r, e in sorted(orders.items())
            ],
        )

    def GetLatestModel(
        self, request: pb.LatestRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.RoundResultPart]:
        member = self._member(context, request.peer_id)
        with self._slot(context, member, "GetLatestModel"):
            with self._blocking(context) as w:
                round_, version, shared = self.book.latest(
                    request.after_round, w.seconds, w.cancelled
                )
            with self._sender():
                yield from self._latest(request, round_, version, shared)

    def _latest(
        self, request: pb.LatestRequest, round_: int, version: int, shared: dict[str, Any]
    ) -> Iterator[pb.RoundResultPart]:
        yield from self._stream(pb.Plan(round=round_, embedding_version=version), shared)

    def _stream(self, plan: pb.Plan, shared: dict[str, Any]) -> Iterator[pb.RoundResultPart]:
        yield pb.RoundResultPart(plan=plan)
        yield from self.shared_parts(shared)

    def upload_specs(self, round_: int) -> dict[str, TensorSpec]:
        """What an upload for `round_` may hold: names, shapes and wire dtypes (both servers)."""
        prefixes = upload_prefixes(self.cfg, round_)
        return {
            n: TensorSpec(shape, frozenset({wire_dtype(self.cfg, n)}))
            for n, shape in self.book.schema.items()
            if prefixes and n.startswith(prefixes)
        }

    def shared_parts(self, shared: dict[str, Any]) -> list[pb.RoundResultPart]:
        """The aggregate's chunks, encoded on the first call for a round's aggregate."""
        cached = self._shared_parts
        if cached is None or cached[0] is not shared:  # a new round's aggregate
            wire = (numpy_to_wire(n, a, wire_dtype(self.cfg, n)) for n, a in sorted(shared.items()))
            parts = [pb.RoundResultPart(chunk=c) for c in chunk_tensors(wire, self.cfg.chunk_bytes)]
            self._shared_parts = cached = (shared, parts)  # a race only encodes it twice
        return cached[1]

    def ReportMetrics(
        self, request: pb.MetricsReport, context: grpc.ServicerContext
    ) -> pb.MetricsAck:
        member = self._member(context, request.peer_id)
        problem = _check_report(request, self.cfg)
        if problem:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"metrics report refused: {problem}")
        with self._slot(context, member, "ReportMetrics"):
            return self._report(member, request, context)

    def _report(
        self, member: Member, request: pb.MetricsReport, context: grpc.ServicerContext
    ) -> pb.MetricsAck:
        ack, record = self.report_record(member, request)
        try:
            self.book.report(member, request.round, record)
        except Refused as e:
            _refuse(context, e)
        if ack.run_finished:  # the last round
            with self._blocking(context) as w:
                finished = self.book.wait_run_finished(w.seconds, w.cancelled)
            if not finished:
                _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, NOT_FINISHED)
        return ack

    def report_record(
        self, member: Member, request: pb.MetricsReport
    ) -> tuple[pb.MetricsAck, dict[str, Any]]:
        """The ack of a (checked) report and the record it adds to its round."""
        last = request.round == self.cfg.rounds
        ack = pb.MetricsAck(round=request.round, run_finished=last)
        # The report and its ack belong to this round's traffic too; the peer cannot count its
        # own report inside itself, so the coordinator adds both sizes here.
        b = request.bytes
        record: dict[str, Any] = {
            "round": request.round,
            "peer": member.peer_id,
            "algorithm": ALGORITHM_NAMES[self.cfg.algorithm],
            "accuracy": request.accuracy,
            "global_accuracy": request.global_accuracy,
            "val_accuracy": request.val_accuracy if request.HasField("val_accuracy") else None,
            "loss": request.loss,
            "num_samples": request.num_samples,
            "experts_fetched": request.experts_fetched,
            "seconds": round(request.seconds, 4),
            # Wall clock (coordinator, Unix seconds) when the report arrived: time-to-accuracy
            # across runs (bench/scenario.py) needs when, not only how long.
            "reported_at": round(time.time(), 3),
            "train_seconds": round(request.train_seconds, 4),
            "exchange_seconds": round(request.exchange_seconds, 4),
            "phase_seconds": {
                name: round(request.phase_seconds[name], 4)
                for name in PHASES
                if name in request.phase_seconds
            },
            "bytes": {
                "coordinator_sent": b.coordinator_sent + request.ByteSize(),
                "coordinator_received": b.coordinator_received + ack.ByteSize(),
                "p2p_sent": b.p2p_sent,
                "p2p_received": b.p2p_received,
            },
            "wire": {
                "sent": request.wire_sent,
                "received": request.wire_received,
                "interfaces": request.wire_interfaces,
            }
            if request.wire_measured
            else None,
        }
        return ack, record

    # ------------------------------------------------------------------ `fedmoe status`

    def GetStatus(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        """Where the run stands. It reveals run state, so the join token comes first; then a
        small global cap, and one short read of the book (ids bounded, see RoundBook.status)."""
        given = _metadata(context, TOKEN_METADATA).encode()
        if not hmac.compare_digest(given, self.token.encode()):
            _abort(context, grpc.StatusCode.UNAUTHENTICATED, INVALID_TOKEN)
        if not self._status_calls.acquire(blocking=False):
            _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{STATUS_CALLS} status calls are already being served; try again",
            )
        try:
            return self.status_reply()
        finally:
            self._status_calls.release()

    def status_reply(self) -> pb.StatusReply:
        """One short read of the book (it takes the lock) and the reply built from it."""
        s = self.book.status()
        return pb.StatusReply(
            run_id=self.cfg.run_id,
            algorithm=ALGORITHM_NAMES[self.cfg.algorithm],
            rounds=self.cfg.rounds,
            peers=self.cfg.peers,
            failure=clip_text(s.pop("failure"), 200),
            **{k: v for k, v in s.items() if v is not None},  # None: an optional left unset
        )
