"""The coordinator's grpc.aio server (coordinator/aio_server.py) in process, over real gRPC:
a held GetRoundResult is woken by the round close, ended by its caller's cancellation or its
deadline without leaving anything behind, and counted by the aio counting interceptor as the
sync one counts; heartbeats are answered while another thread holds the book's lock."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from fedmoe.common.accounting import ByteCounter, CountingServerInterceptor
from fedmoe.common.auth import SESSION_METADATA, TOKEN_METADATA
from fedmoe.common.grpc_options import CHANNEL_OPTIONS
from fedmoe.common.proto import pb, rpc
from fedmoe.common.reflection import TokenGate
from fedmoe.coordinator.aio_server import AioServing
from fedmoe.coordinator.membership import Member
from fedmoe.coordinator.rounds import RoundBook
from tests.test_rounds import make_book, upload

TOKEN = "t" * 32


def until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll a condition of the server's state (the test's only way to see a call is held)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


class Served:
    def __init__(self) -> None:
        self.book, _, _ = make_book()
        self.counter = ByteCounter()
        counting = CountingServerInterceptor(
            "fedmoe.v1.Coordinator", "coordinator", lambda _: self.counter
        )
        self.serving = AioServing(
            self.book, TOKEN, "127.0.0.1:0", None, [TokenGate(TOKEN), counting], 64
        )
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{self.serving.port}", options=CHANNEL_OPTIONS
        )
        self.stub = rpc.CoordinatorStub(self.channel)
        self.members = [self.book.join(k, f"127.0.0.1:{9000 + k}") for k in range(3)]

    def held(self, member: Member, method: str = "GetRoundResult") -> bool:
        return (member.peer_id, method) in self.serving.service._calls

    def tasks(self) -> int:
        loop = self.serving._loop.loop
        return asyncio.run_coroutine_threadsafe(_count_tasks(), loop).result()

    def close(self) -> None:
        self.channel.close()
        self.serving.stop(grace=1)


async def _count_tasks() -> int:
    return len(asyncio.all_tasks())


def session(member: Member) -> list[tuple[str, str]]:
    return [(SESSION_METADATA, member.session)]


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served()
    yield s
    s.close()


def result(served: Served, member: Member, timeout: float = 60) -> grpc.Future:
    return served.stub.GetRoundResult(
        pb.RoundRequest(peer_id=member.peer_id, round=1), metadata=session(member), timeout=timeout
    )


def test_a_held_result_is_woken_by_the_round_close(served: Served) -> None:
    a, b, c = served.members
    served.book.submit(a, 1, 10, upload(served.book))
    parts: list[pb.RoundResultPart] = []
    call = result(served, a)
    reader = threading.Thread(target=lambda: parts.extend(call))
    reader.start()
    until(lambda: served.held(a), "the result call is held")
    assert not parts and served.book.closed_round == 0
    served.book.submit(b, 1, 10, upload(served.book))  # a book thread's change wakes the loop
    served.book.submit(c, 1, 10, upload(served.book))  # the last upload closes the round
    reader.join(30)
    assert not reader.is_alive()
    assert parts[0].plan.round == 1 and len(parts) > 1  # the plan, then the aggregate's chunks
    until(lambda: not served.held(a), "the slot is given back")
    # Counted by the aio twin of CountingServerInterceptor: the request and every part sent.
    request = pb.RoundRequest(peer_id=a.peer_id, round=1)
    counts = served.counter.round_counts(1)
    assert counts["coordinator_received"] == request.ByteSize()
    assert counts["coordinator_sent"] == sum(p.ByteSize() for p in parts)


def test_a_held_result_ends_with_its_callers_cancellation(served: Served) -> None:
    a = served.members[0]
    served.book.submit(a, 1, 10, upload(served.book))
    before = served.tasks()
    call = result(served, a)
    until(lambda: served.held(a), "the result call is held")
    assert served.tasks() > before
    call.cancel()
    until(lambda: not served.held(a), "the cancelled call gives its slot back")
    until(lambda: served.tasks() == before, "the cancelled call's task ends")
    assert served.book.listeners  # the book still wakes the loop: later waits work
    assert served.counter.totals()["coordinator_sent"] == 0  # nothing was streamed


def test_a_held_result_is_bounded_by_its_deadline(served: Served) -> None:
    a = served.members[0]
    served.book.submit(a, 1, 10, upload(served.book))
    before = served.tasks()
    with pytest.raises(grpc.RpcError) as e:
        list(result(served, a, timeout=0.5))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    until(lambda: not served.held(a), "the timed-out call gives its slot back")
    until(lambda: served.tasks() == before, "the timed-out call's task ends")


def test_calls_per_member_are_capped_on_the_loop(served: Served) -> None:
    a = served.members[0]
    served.book.submit(a, 1, 10, upload(served.book))
    calls = [result(served, a) for _ in range(2)]
    until(lambda: served.serving.service._calls.get((a.peer_id, "GetRoundResult")) == 2, "held")
    with pytest.raises(grpc.RpcError) as e:
        list(result(served, a, timeout=10))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "already has 2 GetRoundResult call(s) open" in (e.value.details() or "")
    for call in calls:
        call.cancel()


def test_heartbeats_are_answered_while_the_book_is_locked(served: Served) -> None:
    a = served.members[0]
    beat = pb.HeartbeatRequest(peer_id=a.peer_id, round=1)
    served.stub.Heartbeat(beat, metadata=session(a), timeout=10)  # builds the `left` view
    book: RoundBook = served.book
    with book._cv:  # as a round close holds it for its aggregate
        reply = served.stub.Heartbeat(beat, metadata=session(a), timeout=10)
        book._views.clear()  # as a tick does: the `left` view is the last one built
        again = served.stub.Heartbeat(beat, metadata=session(a), timeout=10)
    assert reply.open_round == 1 and not reply.run_finished
    assert list(again.left) == [] and again.open_round == 1


def test_refusals_keep_their_codes(served: Served) -> None:
    a = served.members[0]
    with pytest.raises(grpc.RpcError) as e:
        served.stub.Heartbeat(
            pb.HeartbeatRequest(peer_id=a.peer_id, round=1),
            metadata=[(SESSION_METADATA, "x" * 32)],
            timeout=10,
        )
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        served.stub.Join(
            pb.JoinRequest(index=0, advertise="127.0.0.1:1"),
            metadata=[(TOKEN_METADATA, "x" * 32)],
            timeout=10,
        )
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert e.value.details() == "invalid join token for this run"
    with pytest.raises(grpc.RpcError) as e:
        list(result(served, served.members[1]))  # no upload from peer-1
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no upload from you for round 1" in (e.value.details() or "")


def test_the_thread_pool_server_stays_selectable(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmoe.coordinator.main import SERVER_ENV, ThreadServing, server_kind

    monkeypatch.delenv(SERVER_ENV, raising=False)
    assert server_kind() == "aio"
    monkeypatch.setenv(SERVER_ENV, "threads")
    assert server_kind() == "threads"
    monkeypatch.setenv(SERVER_ENV, "fibers")
    with pytest.raises(SystemExit, match="must be one of"):
        server_kind()

    book, _, _ = make_book()
    a = book.join(0, "127.0.0.1:9000")
    counter = ByteCounter()
    counting = CountingServerInterceptor("fedmoe.v1.Coordinator", "coordinator", lambda _: counter)
    serving = ThreadServing(book, TOKEN, "127.0.0.1:0", None, [TokenGate(TOKEN), counting], 16)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{serving.port}", options=CHANNEL_OPTIONS) as ch:
            beat = pb.HeartbeatRequest(peer_id=a.peer_id, round=1)
            reply = rpc.CoordinatorStub(ch).Heartbeat(beat, metadata=session(a), timeout=10)
        assert reply.open_round == 1
        assert counter.round_counts(1)["coordinator_received"] == beat.ByteSize()
    finally:
        serving.stop(grace=1)


def test_the_loop_lag_summary() -> None:
    from fedmoe.coordinator.aio_server import LagProbe

    probe = LagProbe()
    assert probe.summary() == "event loop lag: no samples"
    probe.lags.extend([0.001] * 98 + [0.05, 0.2])
    assert probe.summary() == "event loop lag ms: p50 1.0 p99 200.0 max 200.0 (100 samples)"
