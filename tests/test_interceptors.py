"""The peer's byte counts are taken in the channel (common/accounting.CountingInterceptor): each
message's serialized size, in its class, under the round of its call."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from fedmoe.common.accounting import (
    ByteCounter,
    CountingInterceptor,
    CountingServerInterceptor,
    bytes_moved,
    message_round,
    message_size,
)
from fedmoe.common.grpc_options import CHANNEL_OPTIONS, SERVER_OPTIONS
from fedmoe.common.proto import pb, rpc

JOIN_REPLY = pb.JoinReply(peer_id="peer-0", start_round=4, session="s" * 32)
PLAN = pb.RoundResultPart(plan=pb.Plan(round=2, sync=True))
CHUNK = pb.RoundResultPart(chunk=pb.TensorChunk(name="embedding.w", data=b"x" * 1000))


class _Fake(rpc.CoordinatorServicer):
    def Join(self, request, context):  # noqa: N802
        return JOIN_REPLY

    def Heartbeat(self, request, context):  # noqa: N802
        if request.round == 99:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "past the end")
        return pb.HeartbeatReply(open_round=request.round, reported=["peer-1"])

    def SubmitUpdate(self, request_iterator, context):  # noqa: N802
        parts = list(request_iterator)
        return pb.UpdateAck(round=parts[0].header.round, tensors=len(parts) - 1)

    def GetRoundResult(self, request, context):  # noqa: N802
        yield PLAN
        yield CHUNK

    def ReportMetrics(self, request, context):  # noqa: N802
        return pb.MetricsAck(round=request.round)


@pytest.fixture
def stub_and_counter():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=SERVER_OPTIONS)
    rpc.add_CoordinatorServicer_to_server(_Fake(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    counter = ByteCounter()
    counting = CountingInterceptor(counter, "coordinator", skip=frozenset({"ReportMetrics"}))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    yield rpc.CoordinatorStub(grpc.intercept_channel(channel, counting)), counter
    channel.close()
    server.stop(None)


def _counts(sent: int = 0, received: int = 0) -> dict[str, int]:
    return {
        "coordinator_sent": sent,
        "coordinator_received": received,
        "p2p_sent": 0,
        "p2p_received": 0,
    }


def test_unary_calls_count_under_the_round_they_name(stub_and_counter) -> None:
    stub, counter = stub_and_counter
    join = pb.JoinRequest(index=0, advertise="127.0.0.1:1")
    assert stub.Join(join, timeout=10) == JOIN_REPLY
    assert counter.round_counts(4) == _counts(join.ByteSize(), JOIN_REPLY.ByteSize())
    beat = pb.HeartbeatRequest(peer_id="peer-0", round=3)
    reply = stub.Heartbeat(beat, timeout=10)
    assert counter.round_counts(3) == _counts(beat.ByteSize(), reply.ByteSize())
    with pytest.raises(grpc.RpcError):  # a refused call is not counted
        stub.Heartbeat(pb.HeartbeatRequest(peer_id="peer-0", round=99), timeout=10)
    assert counter.round_counts(99) == _counts()
    # The report and its ack are the coordinator's to add to the record.
    stub.ReportMetrics(pb.MetricsReport(peer_id="peer-0", round=3), timeout=10)
    assert counter.round_counts(3) == _counts(beat.ByteSize(), reply.ByteSize())


def test_streams_count_every_message(stub_and_counter) -> None:
    stub, counter = stub_and_counter
    request = pb.RoundRequest(peer_id="peer-0", round=2)
    stream = stub.GetRoundResult(request, timeout=10)
    assert list(stream) == [PLAN, CHUNK]
    assert counter.round_counts(2) == _counts(
        request.ByteSize(), PLAN.ByteSize() + CHUNK.ByteSize()
    )
    parts = [pb.UpdatePart(header=pb.UpdateHeader(peer_id="peer-0", round=5, num_samples=7))]
    parts += [pb.UpdatePart(chunk=CHUNK.chunk)] * 3
    ack = stub.SubmitUpdate(iter(parts), timeout=10)
    assert ack.tensors == 3
    assert counter.round_counts(5) == _counts(sum(p.ByteSize() for p in parts), ack.ByteSize())


def test_message_round_table() -> None:
    assert message_round(pb.JoinRequest(index=1), pb.JoinReply(start_round=6)) == 6
    assert message_round(pb.UpdatePart(header=pb.UpdateHeader(round=3))) == 3
    assert message_round(pb.UpdatePart(chunk=pb.TensorChunk())) is None
    assert message_round(pb.LatestRequest(round=4, after_round=3)) == 4
    assert message_round(pb.ExpertRequest(round=8)) == 8
    with pytest.raises(ValueError):
        CountingInterceptor(ByteCounter(), "elsewhere")


# ---------------------------------------------------------------- the serving side


@pytest.fixture
def served_counter():
    """The same fake coordinator behind CountingServerInterceptor, called on a plain channel."""
    counter = ByteCounter()
    counting = CountingServerInterceptor("fedmoe.v1.Coordinator", "coordinator", lambda _: counter)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), options=SERVER_OPTIONS, interceptors=[counting]
    )
    rpc.add_CoordinatorServicer_to_server(_Fake(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    yield rpc.CoordinatorStub(channel), counter
    channel.close()
    server.stop(None)


def test_the_server_counts_what_the_client_counts(served_counter) -> None:
    stub, counter = served_counter
    join = pb.JoinRequest(index=0, advertise="127.0.0.1:1")
    stub.Join(join, timeout=10)
    assert counter.round_counts(4) == _counts(JOIN_REPLY.ByteSize(), join.ByteSize())
    beat = pb.HeartbeatRequest(peer_id="peer-0", round=3)
    reply = stub.Heartbeat(beat, timeout=10)
    with pytest.raises(grpc.RpcError):  # refused: not counted
        stub.Heartbeat(pb.HeartbeatRequest(peer_id="peer-0", round=99), timeout=10)
    assert counter.round_counts(99) == _counts()
    report = pb.MetricsReport(peer_id="peer-0", round=3, accuracy=0.5)
    ack = stub.ReportMetrics(report, timeout=10)  # the coordinator counts reports too
    assert counter.round_counts(3) == _counts(
        reply.ByteSize() + ack.ByteSize(), beat.ByteSize() + report.ByteSize()
    )
    request = pb.RoundRequest(peer_id="peer-0", round=2)
    assert list(stub.GetRoundResult(request, timeout=10)) == [PLAN, CHUNK]
    assert counter.round_counts(2) == _counts(
        PLAN.ByteSize() + CHUNK.ByteSize(), request.ByteSize()
    )
    parts = [pb.UpdatePart(header=pb.UpdateHeader(peer_id="peer-0", round=5, num_samples=7))]
    parts += [pb.UpdatePart(chunk=CHUNK.chunk)] * 3
    ack2 = stub.SubmitUpdate(iter(parts), timeout=10)
    assert counter.round_counts(5) == _counts(ack2.ByteSize(), sum(p.ByteSize() for p in parts))


def test_the_server_counts_pre_serialized_chunks_by_length() -> None:
    assert message_size(b"x" * 17) == 17
    assert message_size(PLAN) == PLAN.ByteSize()
    with pytest.raises(ValueError):
        CountingServerInterceptor("fedmoe.v1.Coordinator", "elsewhere", lambda _: None)


def test_bytes_moved_counts_each_message_once() -> None:
    # peer-0 sent 100 p2p bytes that peer-1 received, and each talked to the coordinator.
    counts = [
        {"coordinator_sent": 10, "coordinator_received": 20, "p2p_sent": 100, "p2p_received": 0},
        {"coordinator_sent": 5, "coordinator_received": 7, "p2p_sent": 0, "p2p_received": 100},
    ]
    assert bytes_moved(counts) == {"coordinator": 42, "p2p": 100}
