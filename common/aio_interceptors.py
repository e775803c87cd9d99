"""The server interceptors of a grpc.aio server (the coordinator's, coordinator/aio_server.py):
twins of CountingServerInterceptor (common/accounting.py), TokenGate (common/reflection.py)
and RefusalInterceptor (common/telemetry.py), with the same rules.

A grpc.aio interceptor gets its handler with an `await` and wraps coroutines and async
generators instead of functions and generators; what each counts, lets through or notes is
its sync twin's, so that a run's byte counts do not depend on the server the coordinator runs.
The peers' servers stay sync."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.protobuf.message import Message

from fedmoe.common.accounting import CountingServerInterceptor, message_round
from fedmoe.common.reflection import DENIED, TokenGate
from fedmoe.common.telemetry import RefusalInterceptor

_MAKERS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def _rewrap(handler: grpc.RpcMethodHandler, kind: str, behavior: Callable[..., Any]) -> Any:
    return _MAKERS[kind](
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _kind(handler: grpc.RpcMethodHandler) -> str | None:
    for kind in _MAKERS:
        if getattr(handler, kind) is not None:
            return kind
    return None


class AioCountingServerInterceptor(grpc.aio.ServerInterceptor):
    """CountingServerInterceptor's rules on an aio server: unary replies count request and
    reply once the handler returns (a refused call is not counted); response streams count the
    request and each message as it goes out from the first one on, or the request alone when
    the stream ends empty; request streams count each message as it comes in, from the one that
    names the round on, and the reply when sent. Handlers are coroutines or async generators
    (no context.write: a message written that way would not be counted)."""

    def __init__(self, counting: CountingServerInterceptor) -> None:
        self.prefix = counting.prefix
        self.klass = counting.klass
        self.counter_of = counting.counter_of
        self._count = counting._count

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not str(details.method).startswith(self.prefix):  # type: ignore[attr-defined]
            return handler
        kind = _kind(handler)
        wrap = {
            "unary_unary": self._unary_unary,
            "unary_stream": self._unary_stream,
            "stream_unary": self._stream_unary,
        }.get(kind or "")
        if wrap is None:
            return handler  # no bidirectional streams in this protocol
        return _rewrap(handler, kind or "", wrap(getattr(handler, kind or "")))

    def _unary_unary(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def counted(request: Message, context: grpc.aio.ServicerContext) -> Any:
            reply = await behavior(request, context)
            counter = self.counter_of(request)
            round_ = message_round(request, reply)
            if counter is not None and round_ is not None:
                self._count(counter, round_, "received", request)
                self._count(counter, round_, "sent", reply)
            return reply

        return counted

    def _unary_stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def counted(
            request: Message, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            counter = self.counter_of(request)
            round_ = message_round(request)
            if counter is None or round_ is None:
                async for message in behavior(request, context):
                    yield message
                return
            started = False
            async for message in behavior(request, context):
                if not started:
                    self._count(counter, round_, "received", request)
                    started = True
                self._count(counter, round_, "sent", message)
                yield message
            if not started:
                self._count(counter, round_, "received", request)

        return counted

    def _stream_unary(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def counted(
            requests: AsyncIterator[Message], context: grpc.aio.ServicerContext
        ) -> Any:
            named: list[tuple[Any, int]] = []  # (counter, round) once a message names it

            async def incoming() -> AsyncIterator[Message]:
                async for message in requests:
                    round_ = message_round(message)
                    if not named and round_ is not None:
                        counter = self.counter_of(message)
                        if counter is not None:
                            named.append((counter, round_))
                    if named:
                        self._count(*named[0], "received", message)
                    yield message

            reply = await behavior(incoming(), context)
            if named:
                self._count(*named[0], "sent", reply)
            return reply

        return counted


async def _deny(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
) -> AsyncIterator[Any]:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)
    yield  # unreachable: abort raises; the yield makes this a response stream


_DENY = grpc.stream_stream_rpc_method_handler(_deny)


class AioTokenGate(grpc.aio.ServerInterceptor):
    """TokenGate on an aio server: a reflection call without the join token is refused
    UNAUTHENTICATED before its request stream is read; every other method passes untouched."""

    def __init__(self, gate: TokenGate) -> None:
        self.gate = gate

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = str(details.method)  # type: ignore[attr-defined]
        metadata = details.invocation_metadata  # type: ignore[attr-defined]
        if method.startswith(self.gate.prefixes) and not self.gate._presented(metadata):
            return _DENY
        return await continuation(details)


class AioRefusalInterceptor(grpc.aio.ServerInterceptor):
    """RefusalInterceptor on an aio server: tells `on_refusal(reason, request)` about every call
    of the watched services that ends with a refusal's status code."""

    def __init__(self, watcher: RefusalInterceptor) -> None:
        self.watcher = watcher

    @property
    def prefixes(self) -> tuple[str, ...]:
        return self.watcher.prefixes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not str(details.method).startswith(self.prefixes):  # type: ignore[attr-defined]
            return handler
        kind = _kind(handler)
        if kind is None:
            return handler
        streaming_in = kind.startswith("stream_")
        wrap = self._stream if kind.endswith("_stream") else self._unary
        return _rewrap(handler, kind, wrap(getattr(handler, kind), streaming_in))

    def _unary(self, behavior: Callable[..., Any], streaming_in: bool) -> Callable[..., Any]:
        async def watched(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behavior(request, context)
            finally:
                self.watcher._note(context, None if streaming_in else request)

        return watched

    def _stream(self, behavior: Callable[..., Any], streaming_in: bool) -> Callable[..., Any]:
        async def watched(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                responses = behavior(request, context)
                if inspect.isasyncgen(responses):
                    async for message in responses:
                        yield message
                else:  # a coroutine that writes with context.write
                    await responses
            finally:
                self.watcher._note(context, None if streaming_in else request)

        return watched


def aio_interceptors(sync: Iterable[grpc.ServerInterceptor]) -> list[grpc.aio.ServerInterceptor]:
    """The aio twins of the coordinator's sync server interceptors, in the same order."""
    twins: list[grpc.aio.ServerInterceptor] = []
    for interceptor in sync:
        if isinstance(interceptor, CountingServerInterceptor):
            twins.append(AioCountingServerInterceptor(interceptor))
        elif isinstance(interceptor, TokenGate):
            twins.append(AioTokenGate(interceptor))
        elif isinstance(interceptor, RefusalInterceptor):
            twins.append(AioRefusalInterceptor(interceptor))
        else:
            raise TypeError(f"no aio twin for {type(interceptor).__name__}")
    return twins
