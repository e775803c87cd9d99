"""The Coordinator gRPC service: translates RPCs into RoundBook calls and counts their bytes."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, NoReturn

import grpc

from common.accounting import ByteCounter
from common.config import ALGORITHM_NAMES
from common.proto import pb, rpc
from common.tensors import TensorAssembler, WireError, chunk_tensors, numpy_to_wire
from coordinator.rounds import Refused, RoundBook, serve_orders

log = logging.getLogger("fedmoe.coordinator")


def _abort(context: grpc.ServicerContext, code: str, message: str) -> NoReturn:
    log.warning("refused: %s: %s", code, message)
    context.abort(getattr(grpc.StatusCode, code), message)
    raise AssertionError("unreachable")  # context.abort raises


class CoordinatorService(rpc.CoordinatorServicer):
    def __init__(self, book: RoundBook, counter: ByteCounter) -> None:
        self.book = book
        self.cfg = book.cfg
        self.counter = counter  # the coordinator's own view, per round, for cross-checks

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        try:
            member = self.book.join(request.index, request.advertise)
        except Refused as e:
            _abort(context, e.code, str(e))
        log.info("%s joined from %s (%s)", member.peer_id, request.advertise, context.peer())
        reply = pb.JoinReply(peer_id=member.peer_id, config=self.cfg, start_round=1)
        self.counter.message(1, "coordinator", "received", request)
        self.counter.message(1, "coordinator", "sent", reply)
        return reply

    def SubmitUpdate(
        self, request_iterator: Iterator[pb.UpdatePart], context: grpc.ServicerContext
    ) -> pb.UpdateAck:
        parts = iter(request_iterator)
        first = next(parts, None)
        if first is None or not first.HasField("header"):
            _abort(context, "INVALID_ARGUMENT", "an update stream must start with its header")
        header = first.header
        sizes = first.ByteSize()
        assembler = TensorAssembler()
        try:
            self.book.check_round(header.round)
            for part in parts:
                if not part.HasField("chunk"):
                    raise WireError("a second header inside one update stream")
                sizes += part.ByteSize()
                assembler.add(part.chunk)
            tensors = {n: t.to_numpy() for n, t in assembler.finish().items()}
            self.book.submit(header.peer_id, header.round, header.num_samples, tensors)
        except WireError as e:
            _abort(context, "INVALID_ARGUMENT", f"update from {header.peer_id!r}: {e}")
        except Refused as e:
            _abort(context, e.code, str(e))
        ack = pb.UpdateAck(round=header.round, tensors=len(tensors))
        self.counter.add(header.round, "coordinator", "received", sizes)
        self.counter.message(header.round, "coordinator", "sent", ack)
        return ack

    def GetRoundResult(
        self, request: pb.RoundRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.RoundResultPart]:
        try:
            outcome, version = self.book.wait_outcome(request.peer_id, request.round)
        except Refused as e:
            _abort(context, e.code, str(e))
        self.counter.message(request.round, "coordinator", "received", request)
        members = {m.peer_id: m for m in self.book.ordered_members()}
        rows = outcome.plans.get(request.peer_id, {})
        sources = sorted({t.peer_id for terms in rows.values() for t in terms} - {request.peer_id})
        orders = serve_orders(outcome).get(request.peer_id, {})
        plan = pb.Plan(
            round=request.round,
            embedding_version=version,
            sync=outcome.sync,
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
            sources=[pb.PeerAddress(peer_id=p, address=members[p].address) for p in sources],
            serves=[pb.ServeOrder(peer_id=r, experts=e) for r, e in sorted(orders.items())],
        )
        first = pb.RoundResultPart(plan=plan)
        self.counter.message(request.round, "coordinator", "sent", first)
        yield first
        wire = (numpy_to_wire(n, a) for n, a in sorted(outcome.shared.items()))
        for chunk in chunk_tensors(wire, self.cfg.chunk_bytes):
            part = pb.RoundResultPart(chunk=chunk)
            self.counter.message(request.round, "coordinator", "sent", part)
            yield part

    def ReportMetrics(
        self, request: pb.MetricsReport, context: grpc.ServicerContext
    ) -> pb.MetricsAck:
        last = request.round == self.cfg.rounds
        ack = pb.MetricsAck(round=request.round, run_finished=last)
        # The report and its ack belong to this round's traffic too; the peer cannot count its
        # own report inside itself, so the coordinator adds both sizes here.
        b = request.bytes
        record: dict[str, Any] = {
            "round": request.round,
            "peer": request.peer_id,
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
        }
        try:
            self.book.report(request.peer_id, request.round, record)
            self.counter.message(request.round, "coordinator", "received", request)
            self.counter.message(request.round, "coordinator", "sent", ack)
            if last and not self.book.wait_run_finished(request.peer_id):
                _abort(context, "DEADLINE_EXCEEDED", "other peers did not finish the last round")
        except Refused as e:
            _abort(context, e.code, str(e))
        return ack
