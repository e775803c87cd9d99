"""One retry policy per kind of call: gRPC's own retry policy for the unary calls that name one
(common/grpc_options.SERVICE_CONFIG), common/retry.retry_stream for every stream."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from fedmoe.common.grpc_options import CHANNEL_OPTIONS, SERVER_OPTIONS
from fedmoe.common.proto import pb, rpc
from fedmoe.common.retry import FETCH_RETRY, StreamRetry, coordinator_stream, retry_stream


class _Error(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._code.name


def _failing(errors: list[BaseException], result: str = "done"):
    calls = []

    def call() -> str:
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return result

    return call, calls


def test_stream_retry_rides_out_transient_statuses() -> None:
    call, calls = _failing([_Error(grpc.StatusCode.UNAVAILABLE), _Error(grpc.StatusCode.UNKNOWN)])
    policy = StreamRetry(give_up_after=10, first_delay=0.01)
    assert retry_stream(call, "test", policy) == "done" and len(calls) == 3


def test_stream_retry_raises_other_statuses_at_once() -> None:
    call, calls = _failing([_Error(grpc.StatusCode.PERMISSION_DENIED)])
    with pytest.raises(grpc.RpcError):
        retry_stream(call, "test", coordinator_stream(10))
    assert len(calls) == 1
    call, calls = _failing([ValueError("bad plan")])
    with pytest.raises(ValueError):
        retry_stream(call, "test", coordinator_stream(10))
    assert len(calls) == 1


def test_stream_retry_gives_up_after_its_time() -> None:
    call, calls = _failing([_Error(grpc.StatusCode.UNAVAILABLE)] * 100)
    with pytest.raises(grpc.RpcError):
        retry_stream(call, "test", StreamRetry(give_up_after=0.3, first_delay=0.05))
    assert 2 <= len(calls) < 10


def test_fetch_retry_tries_any_failure_once_more() -> None:
    call, calls = _failing([ValueError("bad chunk"), ValueError("bad chunk")])
    with pytest.raises(ValueError):
        retry_stream(call, "test", FETCH_RETRY)
    assert len(calls) == FETCH_RETRY.attempts == 2
    call, calls = _failing([_Error(grpc.StatusCode.UNAVAILABLE)])
    assert retry_stream(call, "test", FETCH_RETRY) == "done" and len(calls) == 2


class _Flaky(rpc.CoordinatorServicer):
    """Refuses the first calls of each method with UNAVAILABLE."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, int] = {}

    def _count(self, method: str, context: grpc.ServicerContext) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.calls[method] <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")

    def ReportMetrics(self, request, context):  # noqa: N802
        self._count("ReportMetrics", context)
        return pb.MetricsAck(round=request.round)

    def Heartbeat(self, request, context):  # noqa: N802
        self._count("Heartbeat", context)
        return pb.HeartbeatReply(open_round=request.round)


@pytest.fixture
def flaky():
    service = _Flaky(failures=2)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=SERVER_OPTIONS)
    rpc.add_CoordinatorServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    yield service, rpc.CoordinatorStub(channel)
    channel.close()
    server.stop(None)


def test_report_is_retried_by_the_service_config(flaky) -> None:
    service, stub = flaky
    ack = stub.ReportMetrics(pb.MetricsReport(peer_id="peer-0", round=3), timeout=30)
    assert ack.round == 3 and service.calls["ReportMetrics"] == 3


def test_heartbeat_is_not_retried(flaky) -> None:
    service, stub = flaky
    with pytest.raises(grpc.RpcError) as e:
        stub.Heartbeat(pb.HeartbeatRequest(peer_id="peer-0", round=1), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert service.calls["Heartbeat"] == 1
