"""The peer's side of the Coordinator service, over one long-lived channel; every message is
counted by the channel's CountingInterceptor (common/accounting.py) under the round it names.

Every call after Join carries the session secret as metadata. While the coordinator is
unreachable (e.g. restarting from its checkpoint) calls are retried by kind (common/retry.py):
Join and ReportMetrics by gRPC's retry policy (common/grpc_options.SERVICE_CONFIG) and waiting
for the channel; the streams by `retry_stream`; Heartbeat not at all (the next one is its retry).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import grpc

from fedmoe.common.accounting import ByteCounter, CountingInterceptor
from fedmoe.common.auth import SESSION_METADATA, TOKEN_METADATA
from fedmoe.common.grpc_options import CHANNEL_OPTIONS
from fedmoe.common.netaddr import split_host_port
from fedmoe.common.proto import pb, rpc
from fedmoe.common.retry import coordinator_stream, retry_stream
from fedmoe.common.tensors import TensorAssembler, TensorSpec, WireTensor, chunk_tensors
from fedmoe.common.tls import TlsFiles, channel

# Consecutive failed heartbeats to the liveness process after which a peer heartbeats the
# coordinator, trying the liveness port again once every LIVENESS_RETRY_EVERY beats; each
# failed one is sent to the coordinator at once. A liveness call gets a quarter of the
# heartbeat's deadline (0.25-2 s), so a stalled port cannot make a live peer look silent.
LIVENESS_TRIES = 3
LIVENESS_RETRY_EVERY = 10
LIVENESS_TIMEOUT = (0.25, 2.0)


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
        self.tls = tls
        self.channel = channel(address, tls, CHANNEL_OPTIONS)
        # ReportMetrics is not counted here: the coordinator adds the report and its ack to the
        # round's record (the report cannot carry its own size).
        counting = CountingInterceptor(counter, "coordinator", skip=frozenset({"ReportMetrics"}))
        self._counting = counting
        self.stub = rpc.CoordinatorStub(grpc.intercept_channel(self.channel, counting))
        # The coordinator's liveness process (JoinReply.liveness_port), when it has one.
        self._liveness: tuple[int, grpc.Channel, rpc.LivenessStub] | None = None
        self._liveness_failures = 0
        self._beats = 0
        self.peer_id = ""
        self._metadata: tuple[tuple[str, str], ...] = ()
        # Proof of identity for rejoining under our index (from --state-dir, or our last join).
        self.member_secret = ""

    def join(
        self,
        index: int,
        advertise: str,
        token: str,
        connect_timeout: float,
        any_index: bool = False,
    ) -> pb.JoinReply:
        """Join as peer `index`; with `any_index`, as the index the coordinator assigns (then
        `index` and the member secret name the member a restarted auto peer was)."""
        request = pb.JoinRequest(
            index=index, advertise=advertise, member_secret=self.member_secret, any_index=any_index
        )
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
        self._use_liveness(reply.liveness_port)
        return reply  # counted under reply.start_round

    def _use_liveness(self, port: int) -> None:
        """Heartbeat the liveness process on `port` of the coordinator's host (0: none)."""
        current = self._liveness[0] if self._liveness is not None else 0
        if current == port:
            return
        self._liveness_failures = 0
        if self._liveness is not None:
            self._liveness[1].close()
            self._liveness = None
        if not port:
            return
        try:
            host, _ = split_host_port(self.address)
        except ValueError:
            return  # e.g. a resolver URI: heartbeats go to the coordinator
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        ch = channel(address, self.tls, CHANNEL_OPTIONS)
        stub = rpc.LivenessStub(grpc.intercept_channel(ch, self._counting))
        self._liveness = (port, ch, stub)

    def heartbeat(self, round_: int, timeout: float) -> pb.HeartbeatReply:
        # Never retried (not in SERVICE_CONFIG): the next heartbeat is the retry, and the caller
        # must see UNAVAILABLE at once to notice a coordinator that is gone.
        request = pb.HeartbeatRequest(peer_id=self.peer_id, round=round_)
        self._beats += 1
        trying = self._liveness_failures < LIVENESS_TRIES
        if self._liveness is not None and (trying or self._beats % LIVENESS_RETRY_EVERY == 0):
            low, high = LIVENESS_TIMEOUT
            try:
                reply: pb.HeartbeatReply = self._liveness[2].Heartbeat(
                    request, timeout=max(low, min(high, timeout / 4)), metadata=self._metadata
                )
                self._liveness_failures = 0
                return reply
            except grpc.RpcError:
                # Gone, slow, or its mirror not yet current (a fresh session): the coordinator
                # itself is the authority, so this beat goes there.
                self._liveness_failures += 1
        reply = self.stub.Heartbeat(request, timeout=timeout, metadata=self._metadata)
        # The coordinator says where heartbeats go now (a liveness process started or gone,
        # or a restarted coordinator's new one).
        self._use_liveness(reply.liveness_port)
        return reply

    def submit(self, round_: int, num_samples: int, tensors: list[WireTensor]) -> pb.UpdateAck:
        def parts() -> Iterator[pb.UpdatePart]:
            # The header goes first: its round is the one every part and the ack count under.
            yield pb.UpdatePart(
                header=pb.UpdateHeader(peer_id=self.peer_id, round=round_, num_samples=num_samples)
            )
            for chunk in chunk_tensors(tensors, self.chunk_bytes):
                yield pb.UpdatePart(chunk=chunk)

        def call() -> pb.UpdateAck:
            return self.stub.SubmitUpdate(parts(), timeout=self.timeout, metadata=self._metadata)

        return retry_stream(call, f"round {round_} upload", coordinator_stream(self.timeout))

    def _result_stream(
        self,
        stream: Callable[..., Iterator[pb.RoundResultPart]],
        request: pb.RoundRequest | pb.LatestRequest,
        count_round: int,
        expected: Mapping[str, TensorSpec] | None,
    ) -> tuple[pb.Plan, dict[str, WireTensor]]:
        def call() -> tuple[pb.Plan, dict[str, WireTensor]]:
            # Counted under request.round (the count round for GetLatestModel).
            plan: pb.Plan | None = None
            assembler = TensorAssembler(expected=expected, require_all=False)
            for part in stream(request, timeout=self.timeout, metadata=self._metadata):
                if part.HasField("plan"):
                    if plan is not None:
                        raise ValueError("coordinator sent two plans in one result")
                    plan = part.plan
                else:
                    assembler.add(part.chunk)
            if plan is None:
                raise ValueError("coordinator sent no plan")
            return plan, assembler.finish()

        return retry_stream(call, f"round {count_round} result", coordinator_stream(self.timeout))

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
        # Retried by gRPC (SERVICE_CONFIG); wait_for_ready rides out a restarting coordinator.
        ack: pb.MetricsAck = self.stub.ReportMetrics(
            report, timeout=self.timeout, metadata=self._metadata, wait_for_ready=True
        )
        return ack

    def close(self) -> None:
        if self._liveness is not None:
            self._liveness[1].close()
        self.channel.close()


def is_status(error: BaseException, *codes: grpc.StatusCode) -> bool:
    return isinstance(error, grpc.RpcError) and error.code() in codes  # type: ignore[attr-defined]
