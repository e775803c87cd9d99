"""Heartbeats answered by a process of their own (`fedmoe coordinator --liveness-listen`).

Why: at 1,000 peers on 2 cores a heartbeat that reaches the coordinator around a round close
waits ~0.5 s (p99, bench/scale.py) although its handler is lock-free and the coordinator's
event loop lags < 15 ms: it queues behind the close's 1,000 uploads and result streams inside
gRPC in the same process. A second server in the same process does not help (it shares
grpc.aio's poller, or the GIL); a process of its own answers in a few ms.

The liveness process serves `Liveness.Heartbeat` (same request, reply, session and refusals
as `Coordinator.Heartbeat`) from a mirror of what a reply needs, which the coordinator pushes
(`LivenessProcess`, a thread of the coordinator) whenever its round book changes, at most every
PUBLISH_SECONDS, as JSON lines on the child's stdin:
  {"sessions": {digest: peer_id}, "gone": [digest], "open_round": n, "finished": b,
   "left": [peer_id], "reported": {round: {source: [requester]}}, "drop": [round]}
(only what changed; sessions by digest, never the secrets). Every FLUSH_SECONDS the child
answers on stdout with who beat, who was told the run is over and the calls' bytes per round:
  {"seen": [peer_id], "told": [peer_id], "bytes": {round: [received, sent]}}
The coordinator notes these as its own Heartbeat would (`RoundBook.heartbeat`, the run's
`told_finished`, the coordinator-class byte counts), so liveness, the end-of-run linger and
the accounting do not depend on which port a heartbeat used.

The child exits when its stdin closes (the coordinator stopped or died). Peers fall back to
`Coordinator.Heartbeat` whenever the liveness port fails them (peer/coordinator_client.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

import grpc

from fedmoe.common.auth import SESSION_METADATA, acting_as, session_owner
from fedmoe.common.grpc_options import SERVER_OPTIONS
from fedmoe.common.grpc_status import status_of
from fedmoe.common.logsafe import clip
from fedmoe.common.proto import pb, rpc
from fedmoe.common.refusal import Reason, Refused
from fedmoe.common.tls import TlsFiles, add_port

log = logging.getLogger("fedmoe.liveness")

# How stale the child's mirror may be: heartbeats come every >= 200 ms (every 5 s at 1,000
# peers), and an update costs the coordinator ~2 ms of its GIL at 1,000 peers.
PUBLISH_SECONDS = 0.1
FLUSH_SECONDS = 0.05  # how late the coordinator learns of a heartbeat (peer timeout: seconds)
MAX_REQUEST_BYTES = 1024  # a HeartbeatRequest is a peer id and a round
MAX_METADATA_BYTES = 8192
REFUSALS_LOG_SECONDS = 10.0  # refusals are logged as a count this often, not one line each


# ---------------------------------------------------------------- the child's mirror


@dataclass
class LivenessView:
    """What a heartbeat reply needs, as the coordinator last published it."""

    rounds: int
    port: int = 0  # where it listens: replies say so, as the Coordinator's do
    sessions: dict[str, str] = field(default_factory=dict)  # digest of a session -> peer_id
    open_round: int = 1
    finished: bool = False
    left: list[str] = field(default_factory=list)
    reported: dict[int, dict[str, list[str]]] = field(default_factory=dict)

    def apply(self, update: dict[str, Any]) -> None:
        self.sessions.update(update.get("sessions", {}))
        for digest in update.get("gone", ()):
            self.sessions.pop(digest, None)
        if "open_round" in update:
            self.open_round = int(update["open_round"])
        if "finished" in update:
            self.finished = bool(update["finished"])
        if "left" in update:
            self.left = list(update["left"])
        for r, by_source in update.get("reported", {}).items():
            rows = self.reported.setdefault(int(r), {})
            for source, requesters in by_source.items():
                if requesters:
                    rows[source] = list(requesters)
                else:
                    rows.pop(source, None)
        for r in update.get("drop", ()):
            self.reported.pop(int(r), None)

    def answer(self, session: str, request: pb.HeartbeatRequest) -> tuple[str, pb.HeartbeatReply]:
        """(peer_id, reply), or Refused with the Coordinator's Heartbeat's reason and message."""
        peer_id = session_owner(self.sessions, session)
        acting_as(peer_id, request.peer_id)
        if request.round > self.rounds + 1:
            raise Refused(Reason.BAD_REQUEST, f"round {request.round} is past the run's end")
        reply = pb.HeartbeatReply(
            open_round=self.open_round,
            run_finished=self.finished,
            liveness_port=self.port,
            reported=self.reported.get(request.round, {}).get(peer_id, []),
            # A heartbeat revives its sender (the coordinator notes it on the next flush), so
            # the sender is never among those left, as in the Coordinator's own reply.
            left=[p for p in self.left if p != peer_id],
        )
        return peer_id, reply


# ---------------------------------------------------------------- the child process


class _Pending:
    """What the child has not told the coordinator yet (touched on the child's loop only)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.told: set[str] = set()
        self.bytes: dict[int, list[int]] = {}

    def take(self) -> dict[str, Any] | None:
        if not (self.seen or self.told or self.bytes):
            return None
        out = {"seen": sorted(self.seen), "told": sorted(self.told), "bytes": self.bytes}
        self.seen, self.told, self.bytes = set(), set(), {}
        return out


class LivenessServicer(rpc.LivenessServicer):
    def __init__(self, view: LivenessView, pending: _Pending) -> None:
        self.view = view
        self.pending = pending
        self.answered = 0
        self.refused = 0
        self.last_refusal = ""

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatReply:
        session = ""
        for key, value in context.invocation_metadata() or ():
            if key == SESSION_METADATA:
                session = value if isinstance(value, str) else ""
                break
        try:
            peer_id, reply = self.view.answer(session, request)
        except Refused as e:
            code = status_of(e.reason)
            self.refused += 1
            self.last_refusal = f"{clip(context.peer(), 80)}: {code.name}: {clip(str(e), 120)}"
            await context.abort(code, str(e))
            raise AssertionError("unreachable") from None  # abort raises
        self.answered += 1
        self.pending.seen.add(peer_id)
        if reply.run_finished:
            self.pending.told.add(peer_id)
        # Counted as Coordinator.Heartbeat is (CountingServerInterceptor): under the round the
        # request names, request and reply, refused calls not at all.
        counts = self.pending.bytes.setdefault(int(request.round), [0, 0])
        counts[0] += request.ByteSize()
        counts[1] += reply.ByteSize()
        return reply


def _server_options(max_request: int) -> list[tuple[str, Any]]:
    bounded = {"grpc.max_receive_message_length", "grpc.max_metadata_size"}
    options = [(k, v) for k, v in SERVER_OPTIONS if k not in bounded]
    return options + [
        ("grpc.max_receive_message_length", max_request),
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
    ]


def _tls_from(setup: dict[str, Any]) -> TlsFiles | None:
    tls = setup.get("tls")
    if not tls:
        return None
    return TlsFiles(**{k: base64.b64decode(tls[k]) for k in ("ca", "cert", "key")})


def _say(stdout: IO[str], message: dict[str, Any]) -> bool:
    """One JSON line to the coordinator; False once it is gone."""
    try:
        stdout.write(json.dumps(message) + "\n")
        stdout.flush()
    except (BrokenPipeError, OSError):
        return False
    return True


async def _serve(setup: dict[str, Any], stdin: IO[str], stdout: IO[str]) -> None:
    view = LivenessView(rounds=int(setup["rounds"]))
    pending = _Pending()
    servicer = LivenessServicer(view, pending)
    server = grpc.aio.server(
        options=_server_options(MAX_REQUEST_BYTES),
        maximum_concurrent_rpcs=int(setup["max_calls"]),
    )
    rpc.add_LivenessServicer_to_server(servicer, server)
    try:
        port = add_port(server, setup["listen"], _tls_from(setup))
    except RuntimeError as e:
        _say(stdout, {"error": str(e)})
        return
    await server.start()
    view.port = port
    _say(stdout, {"port": port})

    loop = asyncio.get_running_loop()
    closed = asyncio.Event()

    def read() -> None:  # a thread: blocking reads of the coordinator's updates
        for line in stdin:
            try:
                update = json.loads(line)
            except ValueError:
                continue
            loop.call_soon_threadsafe(view.apply, update)
        loop.call_soon_threadsafe(closed.set)  # EOF: the coordinator is gone

    threading.Thread(target=read, name="updates", daemon=True).start()
    refusals_logged, logged_at = 0, time.monotonic()
    while not closed.is_set():
        try:
            await asyncio.wait_for(closed.wait(), FLUSH_SECONDS)
        except asyncio.TimeoutError:
            pass
        out = pending.take()
        if out is not None and not _say(stdout, out):
            break
        now = time.monotonic()
        first = refusals_logged == 0
        if servicer.refused > refusals_logged and (
            first or now - logged_at >= REFUSALS_LOG_SECONDS
        ):
            log.warning(
                "refused %d heartbeat(s) in %.0f s; last: %s",
                servicer.refused - refusals_logged,
                now - logged_at,
                servicer.last_refusal,
            )
            refusals_logged, logged_at = servicer.refused, now
    await server.stop(1.0)
    out = pending.take()  # the calls answered since the last flush, and during the stop
    if out is not None:
        _say(stdout, out)
    log.info("answered %d heartbeat(s), refused %d", servicer.answered, servicer.refused)


def child_main() -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # Stopped by its stdin closing, never by a signal meant for the coordinator's process
    # group (Ctrl-C, a supervisor's SIGTERM): the coordinator stops first and closes it, so
    # the last heartbeats' news reaches it.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    setup = json.loads(sys.stdin.readline() or "{}")
    if "listen" not in setup:
        return 2
    asyncio.run(_serve(setup, sys.stdin, sys.stdout))
    return 0


# ---------------------------------------------------------------- the coordinator's side


class BookMirror:
    """What the liveness process must know of a round book, as updates: each `update()` is
    what changed since the last one (the first: everything). No process, no gRPC: tested
    against the Coordinator's own Heartbeat (tests/test_liveness.py)."""

    def __init__(self, book: Any) -> None:  # RoundBook (not imported: light for the child)
        self.book = book
        self._sent: dict[str, Any] = {"sessions": {}, "reported": {}}
        # Per closed round: each source's requesters, sorted as `reported_to` returns them
        # (built once per round, not on every update).
        self._sorted: dict[int, tuple[Any, dict[str, list[str]]]] = {}
        # Per closed round: (closed, done set, rows) of the last snapshot, so that a round
        # whose done set has not changed costs its done set (`done_with`, O(N)) and one set
        # comparison, not rebuilding and diffing every source's rows (O(N P) of Python; at
        # 1,000 peers most updates change at most one round, or only sessions).
        self._rows: dict[int, tuple[Any, set[str], dict[str, list[str]]]] = {}

    def _requesters(self, round_: int, closed: Any) -> dict[str, list[str]]:
        cached = self._sorted.get(round_)
        if cached is None or cached[0] is not closed:
            orders = closed.orders
            cached = (closed, {s: sorted(reqs) for s, reqs in list(orders.items())})
            self._sorted = {r: c for r, c in self._sorted.items() if r in self.book.closed}
            self._sorted[round_] = cached
        return cached[1]

    def snapshot(self) -> dict[str, Any]:
        """The book's state as the child mirrors it, read without the book's lock (the same
        lock-free reads the Coordinator's Heartbeat makes)."""
        book = self.book
        # Blocking: at a tick the lock is held when the publisher is woken, and the view it
        # would get without waiting is the one from before the tick.
        left = book.left()
        reported: dict[str, dict[str, list[str]]] = {}
        rows_now: dict[int, tuple[Any, set[str], dict[str, list[str]]]] = {}
        for r, closed in list(book.closed.items()):
            done = book.done_with(r)
            last = self._rows.get(r)
            if last is not None and last[0] is closed and last[1] == done:
                rows = last[2]  # the same object: update() skips it without comparing
            else:
                rows = {
                    source: hit
                    for source, requesters in self._requesters(r, closed).items()
                    if (hit := [q for q in requesters if q in done])
                }
            rows_now[r] = (closed, done, rows)
            reported[str(r)] = rows
        self._rows = rows_now
        return {
            "sessions": book.membership.session_digests(),
            "open_round": int(book.open_round),
            "finished": bool(book.finished),
            "left": list(left) if left is not None else None,
            "reported": reported,
        }

    def update(self) -> dict[str, Any]:
        now = self.snapshot()
        sent = self._sent
        update: dict[str, Any] = {}
        old_sessions: dict[str, str] = sent["sessions"]
        if now["sessions"] != old_sessions:  # C-level: most updates change no session
            added = {d: p for d, p in now["sessions"].items() if old_sessions.get(d) != p}
            gone = [d for d in old_sessions if d not in now["sessions"]]
            if added:
                update["sessions"] = added
            if gone:
                update["gone"] = gone
        for key in ("open_round", "finished", "left"):
            if now[key] is not None and sent.get(key) != now[key]:
                update[key] = now[key]
        old_rep: dict[str, dict[str, list[str]]] = sent["reported"]
        changed: dict[str, dict[str, list[str]]] = {}
        for r, rows in now["reported"].items():
            before = old_rep.get(r, {})
            if rows is before:  # the round's done set has not changed (snapshot)
                continue
            delta = {s: v for s, v in rows.items() if before.get(s) != v}
            delta.update({s: [] for s in before if s not in rows})
            if delta:
                changed[r] = delta
        if changed:
            update["reported"] = changed
        drop = [r for r in old_rep if r not in now["reported"]]
        if drop:
            update["drop"] = drop
        left = now["left"] if now["left"] is not None else sent.get("left")
        self._sent = {**now, "left": left}
        return update


class LivenessProcess:
    """Starts the liveness process, keeps its mirror of `book` current and notes what it
    reports back. `port` is where it listens; 0 once it is gone (new joins are then told to
    heartbeat the coordinator)."""

    def __init__(
        self,
        book: Any,  # RoundBook (not imported: this module is the child's too)
        counter: Any,  # ByteCounter
        told_finished: set[str],
        listen: str,
        tls: TlsFiles | None,
        max_calls: int,
        start_timeout: float = 60.0,
    ) -> None:
        self.book = book
        self.counter = counter
        self.told_finished = told_finished
        self.mirror = BookMirror(book)
        self._dirty = threading.Event()
        self._stopping = threading.Event()
        self.proc = subprocess.Popen(
            # -P: the working directory is not put on sys.path (nothing there can shadow us)
            [sys.executable, "-P", "-m", "fedmoe.coordinator.liveness"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        setup: dict[str, Any] = {
            "listen": listen,
            "rounds": int(book.cfg.rounds),
            "max_calls": max_calls,
            "tls": None
            if tls is None
            else {k: base64.b64encode(getattr(tls, k)).decode() for k in ("ca", "cert", "key")},
        }
        first = self._exchange(json.dumps(setup), start_timeout)
        if "port" not in first:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(str(first.get("error", "the liveness process did not start")))
        self.port = int(first["port"])
        self._lock = threading.Lock()  # one writer at a time on the child's stdin
        book.listeners.append(self._dirty.set)
        book.watchers.append(self._dirty.set)
        self._revive: set[str] = set()  # heartbeats that need the book's lock (a revival)
        # Daemons: a coordinator that exits on an error path never waits for them (the child
        # then sees its stdin close and exits too).
        self._publisher = threading.Thread(
            target=self._publish_loop, name="liveness-out", daemon=True
        )
        self._reader = threading.Thread(target=self._read_loop, name="liveness-in", daemon=True)
        self._publish()  # the mirror is whole before the port is handed to anyone
        self._publisher.start()
        self._reader.start()
        book.liveness_port = self.port  # later joins and heartbeat replies name it

    def _exchange(self, line: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return {}  # it died at start-up (its stderr says why)
        answer: list[str] = []
        reading = threading.Thread(
            target=lambda: answer.append(self.proc.stdout.readline()),  # type: ignore[union-attr]
            daemon=True,
        )
        reading.start()
        reading.join(timeout)
        try:
            return dict(json.loads(answer[0])) if answer and answer[0] else {}
        except ValueError:
            return {}

    def _publish(self) -> bool:
        assert self.proc.stdin is not None
        # One lock around computing and writing: two publishers (the thread and flush())
        # writing in the other order would leave the child on the older state for good.
        with self._lock:
            update = self.mirror.update()
            if not update:
                return True
            try:
                self.proc.stdin.write(json.dumps(update) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                return False
        return True

    def _publish_loop(self) -> None:
        while not self._stopping.is_set():
            # A change, or once a second regardless (a member left out by the clock alone).
            self._dirty.wait(1.0)
            self._dirty.clear()
            if self._stopping.is_set():
                return
            try:
                if not self._publish():
                    return  # the child is gone (the reader says so)
            except Exception:  # a bug here must not freeze the mirror: log, retry next change
                log.exception("liveness mirror update failed")
            self._stopping.wait(PUBLISH_SECONDS)

    # -- child -> coordinator

    def _read_loop(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                news = json.loads(line)
                self._note(news)
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                log.warning("liveness process sent a bad line (%s): %s", e, clip(line, 120))
        code = self.proc.wait()
        if not self._stopping.is_set():
            self.port = 0
            self.book.liveness_port = 0
            log.error(
                "the liveness process exited (code %s): peers heartbeat the coordinator", code
            )

    def _note(self, news: dict[str, Any]) -> None:
        members = self.book.members
        # A live member's heartbeat is one attribute write; a revival needs the book's lock,
        # which a round close holds for a while: retried with the next news instead of making
        # every other heartbeat wait behind it.
        self._revive.update(news.get("seen", ()))
        for peer_id in list(self._revive):
            member = members.get(peer_id)
            if member is None or self.book.heartbeat(member, block=False):
                self._revive.discard(peer_id)
        self.told_finished.update(p for p in news.get("told", ()) if p in members)
        for r, (received, sent) in news.get("bytes", {}).items():
            self.counter.add(int(r), "coordinator", "received", int(received))
            self.counter.add(int(r), "coordinator", "sent", int(sent))

    def flush(self) -> None:
        """Publish now (the end of the run: `finished` must reach the child at once)."""
        self._publish()

    def stop(self, timeout: float = 10.0) -> None:
        """Close the child's stdin (it stops serving and exits) and collect what it still had
        to say; kill it if it does not go."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._dirty.set()
        self._publisher.join(timeout)
        assert self.proc.stdin is not None
        if self._lock.acquire(timeout=timeout):
            try:
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            finally:
                self._lock.release()
        else:  # a write is stuck: the child stopped reading
            self.proc.kill()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout)


if __name__ == "__main__":
    sys.exit(child_main())
