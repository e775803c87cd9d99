"""Application-byte accounting: serialized message sizes per round, class and direction.

Classes (DESIGN.md §2): "coordinator" for peer <-> coordinator messages, "p2p" for peer <-> peer.
The size counted is the protobuf serialized size of each gRPC message, as both ends see it.

Time is accounted per round too: PHASES names the phases of a peer's round (peer/runner.py), in
the order they run; MetricsReport.phase_seconds carries the seconds of each.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import grpc
from google.protobuf.message import Message

from fedmoe.common.proto import pb

CLASSES = ("coordinator", "p2p")
DIRECTIONS = ("sent", "received")
# train: local epochs. upload: expert snapshot published, embedding (+ gate) sent.
# wait_for_plan: the round's plan and aggregate (mostly waiting for the round to close).
# fetch: planned experts streamed in from other peers. merge: Eq. 11 and the aggregate loaded.
# evaluate: local and global test sets. serve_wait: until every planned fetch from us is done.
# checkpoint: the model saved to --state-dir. report: the round's counts taken and the report
# built (the report's own sending cannot be timed inside it).
PHASES = (
    "train",
    "upload",
    "wait_for_plan",
    "fetch",
    "merge",
    "evaluate",
    "serve_wait",
    "checkpoint",
    "report",
)


class ByteCounter:
    """Thread-safe counters keyed by (round, class, direction)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[int, str, str], int] = defaultdict(int)

    def add(self, round_: int, klass: str, direction: str, nbytes: int) -> None:
        if klass not in CLASSES or direction not in DIRECTIONS:
            raise ValueError(f"unknown traffic class/direction {klass}/{direction}")
        with self._lock:
            self._counts[(round_, klass, direction)] += nbytes

    def message(self, round_: int, klass: str, direction: str, msg: Message | bytes) -> None:
        """Count one message: its serialized size, or its length when it arrives serialized
        (ExpertClient takes chunks as bytes: ByteSize() would re-encode every 1 MiB chunk)."""
        self.add(round_, klass, direction, message_size(msg))

    def carry(self, from_round: int, to_round: int) -> None:
        """Move a round's counts into a later one (a round the peer skipped is never reported)."""
        with self._lock:
            for key in [k for k in self._counts if k[0] == from_round]:
                self._counts[(to_round, key[1], key[2])] += self._counts.pop(key)

    def round_counts(self, round_: int) -> dict[str, int]:
        """{'coordinator_sent': .., 'coordinator_received': .., 'p2p_sent': .., 'p2p_received': ..}"""
        with self._lock:
            return {
                f"{k}_{d}": self._counts.get((round_, k, d), 0) for k in CLASSES for d in DIRECTIONS
            }

    def totals(self) -> dict[str, int]:
        out = {f"{k}_{d}": 0 for k in CLASSES for d in DIRECTIONS}
        with self._lock:
            for (_, k, d), n in self._counts.items():
                out[f"{k}_{d}"] += n
        return out


def bytes_moved(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """What the network carried, each message once, from per-peer counts (records' `bytes`).

    A coordinator message has one peer end: it is in that peer's coordinator_sent or _received.
    A p2p message has two: one peer's p2p_sent is another's p2p_received, so only what the peers
    sent is added (the received side is the cross-check: equal when no peer was lost mid-round)."""
    out = {"coordinator": 0, "p2p": 0}
    for c in counts:
        out["coordinator"] += c["coordinator_sent"] + c["coordinator_received"]
        out["p2p"] += c["p2p_sent"]
    return out


# ---------------------------------------------------------------- counting in the channel


def message_round(message: Message, reply: Message | None = None) -> int | None:
    """The round a peer counts a message of a call under: the round the request names.

    JoinRequest names none: a join counts under the round the reply says the peer starts at.
    UpdatePart: the round of the stream's header (None for its chunks: the header's round holds).
    HeartbeatRequest, RoundRequest, LatestRequest (its count round), ExpertRequest: `.round`."""
    if isinstance(message, pb.JoinRequest):
        return None if reply is None else int(reply.start_round)  # type: ignore[attr-defined]
    if isinstance(message, pb.UpdatePart):
        return int(message.header.round) if message.HasField("header") else None
    if isinstance(message, pb.StatusRequest):
        return None  # `fedmoe status` is not run traffic: no round counts it
    return int(message.round)  # type: ignore[attr-defined]


class _CountedStream:
    """A response stream that counts each message as the caller takes it; everything else
    (cancel, code, ...) is the underlying call's."""

    def __init__(self, call: Any, count: Callable[[Message], None]) -> None:
        self._call = call
        self._count = count

    def __iter__(self) -> _CountedStream:
        return self

    def __next__(self) -> Message:
        message: Message = next(self._call)
        self._count(message)
        return message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class CountingInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
):
    """Counts, on a peer's client channel, the serialized size of every message of every call,
    in one class ("coordinator" or "p2p"), under the round of the call (`message_round`).

    The same rules as the counts the peer used to take by hand at each call site:
    - unary calls (Join, Heartbeat) count request and reply once the reply is there (a failed
      call is not counted);
    - streams count each message as it goes out or comes in, so a stream that fails part-way,
      and each retry of it, counts what moved;
    - `skip` names methods counted elsewhere: ReportMetrics, whose report and ack the
      coordinator adds to the round's record (the report cannot hold its own size).
    The serving side counts with CountingServerInterceptor, by the same rules."""

    def __init__(self, counter: ByteCounter, klass: str, skip: frozenset[str] = frozenset()):
        if klass not in CLASSES:
            raise ValueError(f"unknown traffic class {klass}")
        self.counter = counter
        self.klass = klass
        self.skip = skip

    def _skipped(self, details: grpc.ClientCallDetails) -> bool:
        return str(details.method).rsplit("/", 1)[-1] in self.skip

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        if self._skipped(details):
            return outcome
        try:
            reply = outcome.result()
        except Exception:  # the caller sees the error; a failed call is not counted
            return outcome
        round_ = message_round(request, reply)
        if round_ is not None:
            self.counter.message(round_, self.klass, "sent", request)
            self.counter.message(round_, self.klass, "received", reply)
        return outcome

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        call = continuation(details, request)
        round_ = message_round(request)
        if self._skipped(details) or round_ is None:
            return call
        self.counter.message(round_, self.klass, "sent", request)
        return _CountedStream(
            call, lambda m: self.counter.message(round_, self.klass, "received", m)
        )

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        if self._skipped(details):
            return continuation(details, requests)
        rounds: list[int] = []  # the header's round, once it has gone out

        def counted() -> Iterator[Message]:
            for message in requests:
                round_ = message_round(message)
                if round_ is not None and not rounds:
                    rounds.append(round_)
                if not rounds:
                    raise ValueError("a counted request stream must name its round first")
                self.counter.message(rounds[0], self.klass, "sent", message)
                yield message

        outcome = continuation(details, counted())
        try:
            reply = outcome.result()
        except Exception:
            return outcome
        if rounds:
            self.counter.message(rounds[0], self.klass, "received", reply)
        return outcome


# ---------------------------------------------------------------- counting in the server


def message_size(message: Message | bytes) -> int:
    """A message's serialized size; pre-serialized messages (ExpertExchange's chunks) are bytes."""
    return len(message) if isinstance(message, bytes) else message.ByteSize()


class CountingServerInterceptor(grpc.ServerInterceptor):
    """Counts, on a server, the serialized size of every message of the calls of one service, in
    one class, under the round of the call (`message_round`), into the counter that
    `counter_of(request)` names (the coordinator has one; a peer host has one per hosted peer,
    chosen by the request's source_id; None: a call nobody counts, e.g. one for no peer here).

    The rules mirror CountingInterceptor's:
    - unary replies count request and reply once the handler returns (a refused call is not);
    - response streams count the request and each message as it goes out, from the first one
      on, or the request alone when the stream ends empty; a call refused before it streams
      anything (authentication, a bad round) is not counted;
    - request streams (uploads) count each message as it comes in, from the one that names the
      round on: what arrived was carried by the network, accepted or not; the reply when sent.
    Other services on the same server (health) pass through."""

    def __init__(
        self,
        service: str,
        klass: str,
        counter_of: Callable[[Message], ByteCounter | None],
    ) -> None:
        if klass not in CLASSES:
            raise ValueError(f"unknown traffic class {klass}")
        self.prefix = f"/{service}/"
        self.klass = klass
        self.counter_of = counter_of

    def _count(self, counter: ByteCounter, round_: int, direction: str, m: Any) -> None:
        counter.add(round_, self.klass, direction, message_size(m))

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or not str(details.method).startswith(self.prefix):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary_unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._stream_unary(handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # no bidirectional streams in this protocol

    def _unary_unary(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def counted(request: Message, context: grpc.ServicerContext) -> Any:
            reply = behavior(request, context)
            counter = self.counter_of(request)
            round_ = message_round(request, reply)
            if counter is not None and round_ is not None:
                self._count(counter, round_, "received", request)
                self._count(counter, round_, "sent", reply)
            return reply

        return counted

    def _unary_stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def counted(request: Message, context: grpc.ServicerContext) -> Iterator[Any]:
            counter = self.counter_of(request)
            round_ = message_round(request)
            if counter is None or round_ is None:
                yield from behavior(request, context)
                return
            started = False
            for message in behavior(request, context):
                if not started:
                    self._count(counter, round_, "received", request)
                    started = True
                self._count(counter, round_, "sent", message)
                yield message
            if not started:
                self._count(counter, round_, "received", request)

        return counted

    def _stream_unary(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def counted(requests: Iterator[Message], context: grpc.ServicerContext) -> Any:
            named: list[tuple[ByteCounter, int]] = []  # (counter, round) once a message names it

            def incoming() -> Iterator[Message]:
                for message in requests:
                    round_ = message_round(message)
                    if not named and round_ is not None:
                        counter = self.counter_of(message)
                        if counter is not None:
                            named.append((counter, round_))
                    if named:
                        self._count(*named[0], "received", message)
                    yield message

            reply = behavior(incoming(), context)
            if named:
                self._count(*named[0], "sent", reply)
            return reply

        return counted
