"""The peer's side of the Coordinator service, over one long-lived channel; counts every message.

Every call after Join carries the session secret as metadata and is retried with backoff while
the coordinator is unreachable (e.g. restarting from its checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import grpc

from common.accounting import ByteCounter
from common.auth import SESSION_METADATA, TOKEN_METADATA
from common.grpc_options import CHANNEL_OPTIONS
from common.proto import pb, rpc
from common.retry import with_retries
from common.tensors import TensorAssembler, TensorSpec, WireTensor, chunk_tensors
from common.tls import TlsFiles, channel


class CoordinatorClient:
    def __init__(
        self,
        address: str,
        counter: ByteCounter,
        chunk_bytes: int,
        timeout: float,
        tls: TlsFiles | None = None,
    ) -> None:
        self.address = address
        self.counter = counter
        self.chunk_bytes = chunk_bytes
        self.timeout = timeout
        self.channel = channel(address, tls, CHANNEL_OPTIONS)
        self.stub = rpc.CoordinatorStub(self.channel)
        self.peer_id = ""
        self._metadata: tuple[tuple[str, str], ...] = ()
        # Proof of identity for rejoining under our index (from --state-dir, or our last join).
        self.member_secret = ""

    def join(self, index: int, advertise: str, token: str, connect_timeout: float) -> pb.JoinReply:
        request = pb.JoinRequest(index=index, advertise=advertise, member_secret=self.member_secret)
        # wait_for_ready: the coordinator may still be starting; gRPC waits for the connection.
        reply: pb.JoinReply = self.stub.Join(
            request,
            timeout=connect_timeout,
            wait_for_ready=True,
            metadata=((TOKEN_METADATA, token),),
        )
        self.peer_id = reply.peer_id
        self._metadata = ((SESSION_METADATA, reply.session),)
        if reply.member_secret:
            self.member_secret = reply.member_secret  # kept in memory for a rejoin
        self.counter.message(reply.start_round, "coordinator", "sent", request)
        self.counter.message(reply.start_round, "coordinator", "received", reply)
        return reply

    def heartbeat(self, round_: int, timeout: float) -> pb.HeartbeatReply:
        request = pb.HeartbeatRequest(peer_id=self.peer_id, round=round_)
        reply: pb.HeartbeatReply = self.stub.Heartbeat(
            request, timeout=timeout, metadata=self._metadata
        )
        self.counter.message(round_, "coordinator", "sent", request)
        self.counter.message(round_, "coordinator", "received", reply)
        return reply

    def submit(self, round_: int, num_samples: int, tensors: list[WireTensor]) -> pb.UpdateAck:
        def parts() -> Iterator[pb.UpdatePart]:
            header = pb.UpdatePart(
                header=pb.UpdateHeader(peer_id=self.peer_id, round=round_, num_samples=num_samples)
            )
            self.counter.message(round_, "coordinator", "sent", header)
            yield header
            for chunk in chunk_tensors(tensors, self.chunk_bytes):
                part = pb.UpdatePart(chunk=chunk)
                self.counter.message(round_, "coordinator", "sent", part)
                yield part

        def call() -> pb.UpdateAck:
            return self.stub.SubmitUpdate(parts(), timeout=self.timeout, metadata=self._metadata)

        ack = with_retries(call, f"round {round_} upload", self.timeout)
        self.counter.message(round_, "coordinator", "received", ack)
        return ack

    def _result_stream(
        self,
        stream: Callable[..., Iterator[pb.RoundResultPart]],
        request: pb.RoundRequest | pb.LatestRequest,
        count_round: int,
        expected: Mapping[str, TensorSpec] | None,
    ) -> tuple[pb.Plan, dict[str, WireTensor]]:
        def call() -> tuple[pb.Plan, dict[str, WireTensor]]:
            self.counter.message(count_round, "coordinator", "sent", request)
            plan: pb.Plan | None = None
            assembler = TensorAssembler(expected=expected, require_all=False)
            for part in stream(request, timeout=self.timeout, metadata=self._metadata):
                self.counter.message(count_round, "coordinator", "received", part)
                if part.HasField("plan"):
                    if plan is not None:
                        raise ValueError("coordinator sent two plans in one result")
                    plan = part.plan
                else:
                    assembler.add(part.chunk)
            if plan is None:
                raise ValueError("coordinator sent no plan")
            return plan, assembler.finish()

        return with_retries(call, f"round {count_round} result", self.timeout)

    def round_result(
        self, round_: int, expected: Mapping[str, TensorSpec] | None = None
    ) -> tuple[pb.Plan, dict[str, WireTensor]]:
        """Waits (server-side) until the round closes; returns the plan and the aggregate."""
        request = pb.RoundRequest(peer_id=self.peer_id, round=round_)
        plan, tensors = self._result_stream(self.stub.GetRoundResult, request, round_, expected)
        if plan.round != round_:
            raise ValueError(f"coordinator sent the plan of round {plan.round}, not {round_}")
        return plan, tensors

    def latest(
        self,
        count_round: int,
        expected: Mapping[str, TensorSpec] | None = None,
        after_round: int = 0,
    ) -> tuple[pb.Plan, dict[str, WireTensor]]:
        """The last closed round's aggregate; with `after_round`, the coordinator first waits
        (within this call's deadline) until that round is closed."""
        request = pb.LatestRequest(peer_id=self.peer_id, round=count_round, after_round=after_round)
        return self._result_stream(self.stub.GetLatestModel, request, count_round, expected)

    def report(self, report: pb.MetricsReport) -> pb.MetricsAck:
        # Not counted here: the coordinator adds the report and its ack to this round's record.
        def call() -> pb.MetricsAck:
            return self.stub.ReportMetrics(report, timeout=self.timeout, metadata=self._metadata)

        return with_retries(call, f"round {report.round} report", self.timeout)

    def close(self) -> None:
        self.channel.close()


def is_status(error: BaseException, *codes: grpc.StatusCode) -> bool:
    return isinstance(error, grpc.RpcError) and error.code() in codes  # type: ignore[attr-defined]
