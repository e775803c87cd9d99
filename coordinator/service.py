"""The Coordinator gRPC service: authenticates callers, translates RPCs into RoundBook calls,
and counts the bytes of every message it handles."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from typing import Any, NoReturn

import grpc

from common.accounting import ByteCounter
from common.auth import SESSION_METADATA, TOKEN_METADATA
from common.config import ALGORITHM_NAMES, upload_prefixes
from common.proto import pb, rpc
from common.tensors import TensorAssembler, TensorSpec, WireError, chunk_tensors, numpy_to_wire
from coordinator.rounds import Member, Refused, RoundBook, serve_orders

log = logging.getLogger("fedmoe.coordinator")


def _abort(context: grpc.ServicerContext, code: str, message: str) -> NoReturn:
    log.warning("refused %s: %s: %s", context.peer(), code, message)
    context.abort(getattr(grpc.StatusCode, code), message)
    raise AssertionError("unreachable")  # context.abort raises


def _metadata(context: grpc.ServicerContext, key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return ""


class CoordinatorService(rpc.CoordinatorServicer):
    def __init__(self, book: RoundBook, counter: ByteCounter, token: str) -> None:
        self.book = book
        self.cfg = book.cfg
        self.counter = counter  # the coordinator's own view, per round, for cross-checks
        self.token = token

    def _member(self, context: grpc.ServicerContext, peer_id: str) -> Member:
        """The caller's membership, from its session secret; it may act only as itself."""
        try:
            member = self.book.authenticate(_metadata(context, SESSION_METADATA))
        except Refused as e:
            _abort(context, e.code, str(e))
        if peer_id and peer_id != member.peer_id:
            _abort(context, "PERMISSION_DENIED", f"session of {member.peer_id} used as {peer_id}")
        return member

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        if not hmac.compare_digest(_metadata(context, TOKEN_METADATA), self.token):
            _abort(context, "UNAUTHENTICATED", "invalid join token for this run")
        try:
            member = self.book.join(request.index, request.advertise)
        except Refused as e:
            _abort(context, e.code, str(e))
        log.info("%s joined from %s (%s)", member.peer_id, request.advertise, context.peer())
        start = self.book.open_round if self.book.uploads else self.book.reported_round + 1
        reply = pb.JoinReply(
            peer_id=member.peer_id,
            config=self.cfg,
            start_round=start,
            session=member.session,
            heartbeat_ms=max(200, int(self.cfg.peer_timeout * 1000 / 5)),
        )
        self.counter.message(start, "coordinator", "received", request)
        self.counter.message(start, "coordinator", "sent", reply)
        return reply

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        member = self._member(context, request.peer_id)
        self.book.heartbeat(member)
        reply = pb.HeartbeatReply(
            open_round=self.book.open_round,
            alive=self.book.alive(),
            run_finished=self.book.finished,
            reported=self.book.reported(request.round),
        )
        self.counter.message(request.round, "coordinator", "received", request)
        self.counter.message(request.round, "coordinator", "sent", reply)
        return reply

    def SubmitUpdate(
        self, request_iterator: Iterator[pb.UpdatePart], context: grpc.ServicerContext
    ) -> pb.UpdateAck:
        parts = iter(request_iterator)
        first = next(parts, None)
        if first is None or not first.HasField("header"):
            _abort(context, "INVALID_ARGUMENT", "an update stream must start with its header")
        header = first.header
        member = self._member(context, header.peer_id)
        sizes = first.ByteSize()
        tensors: dict = {}
        try:
            self.book.check_round(header.round)
            # Names, shapes and dtype are checked per chunk, before any buffer is allocated.
            prefixes = upload_prefixes(self.cfg, header.round)
            expected = {
                n: TensorSpec(shape, frozenset({pb.FLOAT32}))
                for n, shape in self.book.schema.items()
                if prefixes and n.startswith(prefixes)
            }
            assembler = TensorAssembler(expected=expected, require_all=False)
            for part in parts:
                if not part.HasField("chunk"):
                    raise WireError("a second header inside one update stream")
                sizes += part.ByteSize()
                assembler.add(part.chunk)
            tensors = {n: t.to_numpy() for n, t in assembler.finish().items()}
            self.book.submit(member, header.round, header.num_samples, tensors)
        except WireError as e:
            _abort(context, "INVALID_ARGUMENT", f"update from {member.peer_id}: {e}")
        except Refused as e:
            _abort(context, e.code, str(e))
        finally:  # what arrived was carried by the network, accepted or not
            self.counter.add(header.round, "coordinator", "received", sizes)
        ack = pb.UpdateAck(round=header.round, tensors=len(tensors))
        self.counter.message(header.round, "coordinator", "sent", ack)
        return ack

    def GetRoundResult(
        self, request: pb.RoundRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.RoundResultPart]:
        member = self._member(context, request.peer_id)
        try:
            closed, version = self.book.wait_outcome(member, request.round)
        except Refused as e:
            _abort(context, e.code, str(e))
        self.counter.message(request.round, "coordinator", "received", request)
        me = member.peer_id
        rows = closed.outcome.plans.get(me, {})
        sources = sorted({t.peer_id for terms in rows.values() for t in terms} - {me})
        orders = serve_orders(closed.outcome).get(me, {})
        plan = pb.Plan(
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
        yield from self._stream(request.round, plan, closed.outcome.shared)

    def GetLatestModel(
        self, request: pb.LatestRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.RoundResultPart]:
        self._member(context, request.peer_id)
        round_, version, shared = self.book.latest()
        self.counter.message(request.round, "coordinator", "received", request)
        yield from self._stream(
            request.round, pb.Plan(round=round_, embedding_version=version), shared
        )

    def _stream(
        self, count_round: int, plan: pb.Plan, shared: dict[str, Any]
    ) -> Iterator[pb.RoundResultPart]:
        first = pb.RoundResultPart(plan=plan)
        self.counter.message(count_round, "coordinator", "sent", first)
        yield first
        wire = (numpy_to_wire(n, a) for n, a in sorted(shared.items()))
        for chunk in chunk_tensors(wire, self.cfg.chunk_bytes):
            part = pb.RoundResultPart(chunk=chunk)
            self.counter.message(count_round, "coordinator", "sent", part)
            yield part

    def ReportMetrics(
        self, request: pb.MetricsReport, context: grpc.ServicerContext
    ) -> pb.MetricsAck:
        member = self._member(context, request.peer_id)
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
            "loss": request.loss,
            "num_samples": request.num_samples,
            "experts_fetched": request.experts_fetched,
            "seconds": round(request.seconds, 4),
            "train_seconds": round(request.train_seconds, 4),
            "exchange_seconds": round(request.exchange_seconds, 4),
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
        try:
            self.book.report(member, request.round, record)
            self.counter.message(request.round, "coordinator", "received", request)
            self.counter.message(request.round, "coordinator", "sent", ack)
            if last and not self.book.wait_run_finished():
                _abort(context, "DEADLINE_EXCEEDED", "other peers did not finish the last round")
        except Refused as e:
            _abort(context, e.code, str(e))
        return ack
