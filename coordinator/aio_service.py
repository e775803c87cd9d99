"""The Coordinator service on a grpc.aio server: one event loop instead of a thread per call.

With a pool thread per call, every peer's held GetRoundResult was a thread; at a round close
~N of them woke together, fought for the GIL, and every heartbeat queued behind them (1,000
peers: heartbeat p99 0.15-0.96 s on a quiet 2-core machine, ~1,060 threads; bench/scale.py).
Here a held call is a coroutine:

- lock-free reads run on the loop: authentication, heartbeats, and the result waits, which
  re-check the book's non-blocking `*_now` views whenever the book says it changed (its
  listeners, called under its lock from any thread, wake the loop with call_soon_threadsafe);
- anything that takes the book's lock, or is heavy Python work, runs on a few BOOK_THREADS:
  joins, the last part of an upload (decode + `book.submit`, whose last one closes the round),
  reports (whose last one writes the round), status, encoding a round's aggregate;
- waits are bounded by the call's deadline and the protocol's bound, and end when gRPC
  cancels the call's task (the caller cancelled or went away): nothing is left behind.

The rules, limits and refusals are CoordinatorService's (coordinator/service.py): the handlers
that need no waiting run it as is, on a book thread, with a copy of the call's context
(_CallView), and every refusal keeps its status code and message."""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, NoReturn, TypeVar

import grpc

from fedmoe.common.auth import SESSION_METADATA, TOKEN_METADATA, acting_as
from fedmoe.common.grpc_status import status_of
from fedmoe.common.logsafe import clip
from fedmoe.common.proto import pb, rpc
from fedmoe.common.refusal import Reason, Refused
from fedmoe.common.tensors import TensorAssembler, WireError
from fedmoe.coordinator.membership import Member
from fedmoe.coordinator.rounds import RoundBook
from fedmoe.coordinator.service import (
    CALLS_PER_MEMBER,
    DEFAULT_CALLS_PER_MEMBER,
    INVALID_TOKEN,
    NOT_FINISHED,
    SENDER_WAIT_SECONDS,
    STATUS_CALLS,
    CoordinatorService,
    _check_report,
    _metadata,
)

log = logging.getLogger("fedmoe.coordinator")
T = TypeVar("T")

# Threads for the calls into the book that take its lock: they queue on that one lock anyway,
# so a few are enough; more would only compete with the loop for the GIL.
BOOK_THREADS = 4
# Result streams written at once. At a round close every held wait ends together; a bound
# keeps the loop's other calls from queueing behind ~N writes at once. Each write waits a turn
# of a busy loop, so the bound sets the pace: at 1,000 peers on 2 cores (bench/scale.py),
# 16 slots delivered the results in 1.2-2.2 s (event-loop lag p99 ~17 ms), 128 in 1.1-1.3 s
# (~35 ms), and no bound in 0.5-0.7 s (60-70 ms). A stream that cannot get a slot in
# SENDER_WAIT_SECONDS (slots held by readers that stopped reading) goes on without one, so
# stalled readers can slow the delivery but never stop it.
DELIVERIES = 128
# A waiting call re-checks at least this often even without a wake-up from the book: a bound on
# what a missed wake-up could cost (one cheap lock-free check per held call per second).
RECHECK_SECONDS = 1.0


class _Aborted(Exception):
    """A refusal of CoordinatorService run on a book thread; the loop answers it."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


class _CallView:
    """What a CoordinatorService handler reads of its context, copied on the loop so that the
    handler can run on a book thread (the aio context belongs to the loop)."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._metadata = tuple(context.invocation_metadata() or ())
        self._peer = context.peer()
        self._auth = context.auth_context()
        self._remaining = context.time_remaining()

    def invocation_metadata(self) -> tuple[Any, ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, Any]:
        return self._auth

    def time_remaining(self) -> float | None:
        return self._remaining

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise _Aborted(code, details)


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str
) -> NoReturn:
    log.warning("refused %s: %s: %s", clip(context.peer()), code.name, clip(message, 200))
    await context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort raises


async def _refuse(context: grpc.aio.ServicerContext, refusal: Refused) -> NoReturn:
    await _abort(context, status_of(refusal.reason), str(refusal))


class AioCoordinatorService(rpc.CoordinatorServicer):
    """The coordinator's calls as coroutines; `attach` it to the serving loop before serving."""

    def __init__(self, book: RoundBook, token: str, tls: bool = False) -> None:
        self.inner = CoordinatorService(book, token, tls=tls)
        self.book = book
        self.cfg = book.cfg
        self.token = token
        self.told_finished = self.inner.told_finished  # read by the main loop at the end
        self._pool = ThreadPoolExecutor(BOOK_THREADS, thread_name_prefix="book")
        # Touched only on the loop: no lock.
        self._calls: dict[tuple[str, str], int] = {}
        self._status_calls = 0
        self._encoding: tuple[dict[str, Any], asyncio.Future[list[pb.RoundResultPart]]] | None
        self._encoding = None
        self._changed = asyncio.Event()  # set (and replaced) on every change of the book
        self._delivering = asyncio.Semaphore(DELIVERIES)
        self._bump_pending = False

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve on `loop`: the book's changes, from any thread, wake the waiting calls there."""

        def changed() -> None:  # under the book's lock, on any thread
            if self._bump_pending:  # a wake-up is on its way; it runs after this change
                return
            self._bump_pending = True
            try:
                loop.call_soon_threadsafe(self._bump)
            except RuntimeError:  # the loop is closed: the server is gone
                pass

        self.book.listeners.append(changed)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _bump(self) -> None:
        self._bump_pending = False  # before the waiters re-check: a later change bumps again
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on a book thread: it may wait for the lock behind a round close."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    async def _threaded(
        self, handler: Callable[[Any, Any], T], request: Any, context: grpc.aio.ServicerContext
    ) -> T:
        """A CoordinatorService handler that does not wait, run on a book thread."""
        try:
            return await self._run(handler, request, _CallView(context))
        except _Aborted as a:  # CoordinatorService logged it
            await context.abort(a.code, a.details)
            raise AssertionError("unreachable") from a

    async def _until(self, limit: float, check: Callable[[], T | None]) -> T | None:
        """check() (a book's non-blocking `*_now`), re-run on every change of the book until it
        gives a value or `limit` seconds have passed (None). Its refusals are raised; the
        call's cancellation cancels this wait."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            changed = self._changed  # taken before the check: a later change sets it
            value = check()
            if value is not None:
                return value
            left = deadline - loop.time()
            if left <= 0:
                return None
            try:
                await asyncio.wait_for(changed.wait(), min(left, RECHECK_SECONDS))
            except asyncio.TimeoutError:
                pass

    def _limit(self, context: grpc.aio.ServicerContext) -> float:
        return self.book._limit(context.time_remaining())

    async def _member(self, context: grpc.aio.ServicerContext, peer_id: str) -> Member:
        """The caller's membership, from its session secret (lock-free); it may act only as
        itself. Read from metadata before anything of a request stream."""
        try:
            member = self.book.authenticate(_metadata(context, SESSION_METADATA))
            acting_as(member.peer_id, peer_id)
        except Refused as e:
            await _refuse(context, e)
        return member

    @asynccontextmanager
    async def _slot(
        self, context: grpc.aio.ServicerContext, member: Member, method: str
    ) -> AsyncIterator[None]:
        """Bound the calls one member may hold open at once (RESOURCE_EXHAUSTED beyond)."""
        key = (member.peer_id, method)
        limit = CALLS_PER_MEMBER.get(method, DEFAULT_CALLS_PER_MEMBER)
        if self._calls.get(key, 0) >= limit:
            await _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{member.peer_id} already has {limit} {method} call(s) open",
            )
        self._calls[key] = self._calls.get(key, 0) + 1
        try:
            yield
        finally:
            self._calls[key] -= 1
            if not self._calls[key]:
                del self._calls[key]

    @asynccontextmanager
    async def _delivery(self) -> AsyncIterator[None]:
        """One of the DELIVERIES slots, or none after SENDER_WAIT_SECONDS."""
        try:
            await asyncio.wait_for(self._delivering.acquire(), SENDER_WAIT_SECONDS)
            held = True
        except asyncio.TimeoutError:
            held = False
        try:
            yield
        finally:
            if held:
                self._delivering.release()

    async def _shared_parts(self, shared: dict[str, Any]) -> list[pb.RoundResultPart]:
        """The aggregate's chunks, encoded once per round on a book thread, however many calls
        ask at once (they all wake at the round close)."""
        cached = self.inner._shared_parts
        if cached is not None and cached[0] is shared:
            return cached[1]
        if self._encoding is None or self._encoding[0] is not shared:
            job = asyncio.ensure_future(self._run(self.inner.shared_parts, shared))
            self._encoding = (shared, job)
        return await asyncio.shield(self._encoding[1])  # a cancelled caller leaves it running

    # ------------------------------------------------------------------ calls

    async def Join(
        self, request: pb.JoinRequest, context: grpc.aio.ServicerContext
    ) -> pb.JoinReply:
        return await self._threaded(self.inner.Join, request, context)

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatReply:
        member = await self._member(context, request.peer_id)
        if request.round > self.cfg.rounds + 1:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"round {request.round} is past the run's end",
            )
        # Lock-free for a live member and a built view; when either needs the lock while a
        # round close holds it, the wait is a book thread's, not the loop's.
        if not self.book.heartbeat(member, block=False):
            return await self._threaded(self.inner.Heartbeat, request, context)
        left = self.book.left(block=False)
        if left is None:
            left = await self._run(self.book.left)
        if self.book.finished:
            self.told_finished.add(member.peer_id)
        return pb.HeartbeatReply(
            open_round=self.book.open_round,
            run_finished=self.book.finished,
            reported=self.book.reported_to(member.peer_id, request.round),
            left=left,
            liveness_port=self.book.liveness_port,
        )

    async def SubmitUpdate(
        self, request_iterator: AsyncIterator[pb.UpdatePart], context: grpc.aio.ServicerContext
    ) -> pb.UpdateAck:
        member = await self._member(context, "")  # before reading a byte of the stream
        async with self._slot(context, member, "SubmitUpdate"):
            return await self._submit(member, request_iterator, context)

    async def _submit(
        self,
        member: Member,
        request_iterator: AsyncIterator[pb.UpdatePart],
        context: grpc.aio.ServicerContext,
    ) -> pb.UpdateAck:
        parts = request_iterator.__aiter__()
        first = await anext(parts, None)
        if first is None or not first.HasField("header"):
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "an update stream must start with its header",
            )
        header = first.header
        try:
            acting_as(member.peer_id, header.peer_id)
        except Refused as e:
            await _refuse(context, e)
        tensors: dict = {}
        try:
            self.book.check_round(header.round)
            # Names, shapes and dtype are checked per chunk, before any buffer is allocated.
            assembler = TensorAssembler(
                expected=self.inner.upload_specs(header.round), require_all=False
            )
            async for part in parts:
                if not part.HasField("chunk"):
                    raise WireError("a second header inside one update stream")
                assembler.add(part.chunk)  # one chunk, bounded in size: a short step
            # The values' checks and the book (the last upload closes the round and runs the
            # aggregate) on a book thread, off the loop.
            tensors = await self._run(self._finish_upload, member, header, assembler)
        except WireError as e:
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"update from {member.peer_id}: {e}"
            )
        except Refused as e:
            await _refuse(context, e)
        return pb.UpdateAck(round=header.round, tensors=len(tensors))

    def _finish_upload(
        self, member: Member, header: pb.UpdateHeader, assembler: TensorAssembler
    ) -> dict:
        tensors = {n: t.to_numpy() for n, t in assembler.finish().items()}
        self.book.submit(member, header.round, header.num_samples, tensors)
        return tensors

    async def GetRoundResult(
        self, request: pb.RoundRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RoundResultPart]:
        member = await self._member(context, request.peer_id)
        async with self._slot(context, member, "GetRoundResult"):
            limit = self._limit(context)
            try:
                got = await self._until(limit, lambda: self.book.outcome_now(member, request.round))
                if got is None:
                    raise Refused(
                        Reason.TIMED_OUT, f"round {request.round} did not close in {limit:.0f} s"
                    )
            except Refused as e:
                await _refuse(context, e)
            closed, version = got
            plan = self.inner.result_plan(member, request, closed, version)
            parts = await self._shared_parts(closed.outcome.shared)
            async with self._delivery():
                yield pb.RoundResultPart(plan=plan)
                for part in parts:
                    yield part

    async def GetLatestModel(
        self, request: pb.LatestRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RoundResultPart]:
        member = await self._member(context, request.peer_id)
        async with self._slot(context, member, "GetLatestModel"):
            try:
                got = await self._until(
                    self._limit(context), lambda: self.book.latest_now(request.after_round)
                )
                if got is None:
                    raise Refused(
                        Reason.TIMED_OUT, f"round {request.after_round} did not close in time"
                    )
            except Refused as e:
                await _refuse(context, e)
            round_, version, shared = got
            parts = await self._shared_parts(shared)
            async with self._delivery():
                yield pb.RoundResultPart(plan=pb.Plan(round=round_, embedding_version=version))
                for part in parts:
                    yield part

    async def ReportMetrics(
        self, request: pb.MetricsReport, context: grpc.aio.ServicerContext
    ) -> pb.MetricsAck:
        member = await self._member(context, request.peer_id)
        problem = _check_report(request, self.cfg)
        if problem:
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"metrics report refused: {problem}"
            )
        async with self._slot(context, member, "ReportMetrics"):
            ack, record = self.inner.report_record(member, request)
            try:
                # A book thread: the last report of a round writes its records.
                await self._run(self.book.report, member, request.round, record)
                # Held after the last round so that nobody stops serving experts early.
                if ack.run_finished:
                    finished = await self._until(self._limit(context), self.book.run_finished_now)
                    if not finished:
                        await _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, NOT_FINISHED)
            except Refused as e:
                await _refuse(context, e)
            return ack

    async def GetStatus(
        self, request: pb.StatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatusReply:
        """See CoordinatorService.GetStatus: the token first, then a small global cap."""
        given = _metadata(context, TOKEN_METADATA).encode()
        if not hmac.compare_digest(given, self.token.encode()):
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, INVALID_TOKEN)
        if self._status_calls >= STATUS_CALLS:
            await _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{STATUS_CALLS} status calls are already being served; try again",
            )
        self._status_calls += 1
        try:
            return await self._run(self.inner.status_reply)
        finally:
            self._status_calls -= 1
