"""The peer's side of the Coordinator service, over one long-lived channel; counts every message."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from common.accounting import ByteCounter
from common.grpc_options import CHANNEL_OPTIONS
from common.proto import pb, rpc
from common.tensors import TensorAssembler, WireTensor, chunk_tensors


class CoordinatorClient:
    def __init__(
        self, address: str, counter: ByteCounter, chunk_bytes: int, timeout: float
    ) -> None:
        self.address = address
        self.counter = counter
        self.chunk_bytes = chunk_bytes
        self.timeout = timeout
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = rpc.CoordinatorStub(self.channel)

    def join(self, index: int, advertise: str, connect_timeout: float) -> pb.JoinReply:
        request = pb.JoinRequest(index=index, advertise=advertise)
        # wait_for_ready: the coordinator may still be starting; gRPC waits for the connection.
        reply = self.stub.Join(request, timeout=connect_timeout, wait_for_ready=True)
        self.counter.message(1, "coordinator", "sent", request)
        self.counter.message(1, "coordinator", "received", reply)
        return reply

    def submit(
        self, peer_id: str, round_: int, num_samples: int, tensors: list[WireTensor]
    ) -> pb.UpdateAck:
        def parts() -> Iterator[pb.UpdatePart]:
            header = pb.UpdatePart(
                header=pb.UpdateHeader(peer_id=peer_id, round=round_, num_samples=num_samples)
            )
            self.counter.message(round_, "coordinator", "sent", header)
            yield header
            for chunk in chunk_tensors(tensors, self.chunk_bytes):
                part = pb.UpdatePart(chunk=chunk)
                self.counter.message(round_, "coordinator", "sent", part)
                yield part

        ack = self.stub.SubmitUpdate(parts(), timeout=self.timeout)
        self.counter.message(round_, "coordinator", "received", ack)
        return ack

    def round_result(self, peer_id: str, round_: int) -> tuple[pb.Plan, dict[str, WireTensor]]:
        """Waits (server-side) until the round closes; returns the plan and the aggregate."""
        request = pb.RoundRequest(peer_id=peer_id, round=round_)
        self.counter.message(round_, "coordinator", "sent", request)
        plan: pb.Plan | None = None
        assembler = TensorAssembler()
        for part in self.stub.GetRoundResult(request, timeout=self.timeout):
            self.counter.message(round_, "coordinator", "received", part)
            if part.HasField("plan"):
                if plan is not None:
                    raise ValueError("coordinator sent two plans in one round result")
                plan = part.plan
            else:
                assembler.add(part.chunk)
        if plan is None or plan.round != round_:
            raise ValueError(f"coordinator sent no plan for round {round_}")
        return plan, assembler.finish()

    def report(self, report: pb.MetricsReport) -> pb.MetricsAck:
        # Not counted here: the coordinator adds the report and its ack to this round's record.
        ack: pb.MetricsAck = self.stub.ReportMetrics(report, timeout=self.timeout)
        return ack

    def close(self) -> None:
        self.channel.close()
