"""The coordinator's liveness process (coordinator/liveness.py, `--liveness-listen`).

- Its mirror answers every heartbeat as the Coordinator's own Heartbeat would, in every state
  of a round book (joins, a round closed with serve orders, reports, a member left out, a
  restart), and refuses what the Coordinator refuses (pure logic, no process).
- Real processes: a whole run with heartbeats on the liveness port, counted exactly as peers
  count them; the liveness process killed mid-run (peers fall back, the run completes); the
  coordinator killed (the liveness process does not outlive it); attacks on its port.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedmoe.common.auth import SESSION_METADATA
from fedmoe.common.grpc_options import CHANNEL_OPTIONS
from fedmoe.common.grpc_status import status_of
from fedmoe.common.proto import pb, rpc
from fedmoe.common.refusal import Refused
from fedmoe.coordinator.liveness import BookMirror, LivenessView
from fedmoe.coordinator.service import CoordinatorService
from tests.cluster import FEDMOE, Cluster, rss_mb
from tests.test_hostile_coordinator import TOKEN, Member
from tests.test_rounds import make_book, record, upload

# ---------------------------------------------------------------- the mirror (no process)


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Context:
    """Just enough of a ServicerContext for CoordinatorService.Heartbeat."""

    def __init__(self, session: str) -> None:
        self.session = session

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((SESSION_METADATA, self.session),)

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise _Aborted(code, message)


def coordinator_says(service: CoordinatorService, session: str, peer: str, round_: int) -> Any:
    try:
        return service.Heartbeat(pb.HeartbeatRequest(peer_id=peer, round=round_), _Context(session))
    except _Aborted as e:
        return e.code


def liveness_says(view: LivenessView, session: str, peer: str, round_: int) -> Any:
    try:
        return view.answer(session, pb.HeartbeatRequest(peer_id=peer, round=round_))[1]
    except Refused as e:
        return status_of(e.reason)


def test_the_mirror_answers_as_the_coordinator_in_every_state() -> None:
    book, clock, _ = make_book(peers=3, min_peers=2)
    service = CoordinatorService(book, "token")
    mirror = BookMirror(book)
    view = LivenessView(rounds=book.cfg.rounds)
    members = [book.join(k, f"h{k}:1") for k in range(3)]
    sessions = [m.session for m in members]  # the old ones stay in the check: refused later
    nonempty = 0

    def check(state: str) -> None:
        nonlocal nonempty
        view.apply(mirror.update())
        for m in list(book.members.values()):
            for s in {*sessions, m.session}:
                for r in (1, 2, 3, book.cfg.rounds + 2):
                    want = coordinator_says(service, s, m.peer_id, r)
                    got = liveness_says(view, s, m.peer_id, r)
                    assert got == want, (state, m.peer_id, r)
                    nonempty += isinstance(got, pb.HeartbeatReply) and len(got.reported) > 0

    check("joined")
    for m in members:
        book.submit(m, 1, 10, upload(book))
    assert book.closed, "round 1 should have closed with serve orders"
    check("round 1 closed")
    book.report(members[0], 1, record(1, "peer-0"))
    check("peer-0 reported round 1")
    book.report(members[1], 1, record(1, "peer-1"))
    check("peer-1 reported round 1")
    clock.now += 11  # peer-2 silent past --peer-timeout: left out
    book.heartbeat(members[0])
    book.heartbeat(members[1])
    book.tick()
    assert book.left() == ["peer-2"]
    check("peer-2 left out")
    book.join(2, "h2:2", members[2].secret)  # peer-2 restarted: a new session, the old one void
    check("peer-2 rejoined")
    assert nonempty > 0, "no reply named a reported requester: the check proved nothing"
    assert mirror.update() == {}  # nothing changed since: nothing to send


def test_every_change_a_heartbeat_reply_shows_wakes_the_mirror() -> None:
    """The mirror is pushed on the book's listeners and watchers; a report changes
    `reported_to` without waking any waiter, so it must reach the watchers."""
    book, clock, _ = make_book(peers=2)
    woken: list[str] = []
    book.listeners.append(lambda: woken.append("listener"))
    book.watchers.append(lambda: woken.append("watcher"))
    a, b = book.join(0, "h0:1"), book.join(1, "h1:1")
    assert woken, "a join must wake the mirror (a new session)"
    for m in (a, b):
        book.submit(m, 1, 10, upload(book))
    woken.clear()
    book.report(a, 1, record(1, "peer-0"))
    assert "watcher" in woken
    woken.clear()
    clock.now += 11  # both silent past --peer-timeout
    book.tick()
    assert woken, "members left out by the clock must wake the mirror"


def test_the_liveness_view_refuses_what_the_coordinator_refuses() -> None:
    book, _, _ = make_book(peers=2)
    a, b = book.join(0, "h0:1"), book.join(1, "h1:1")
    view = LivenessView(rounds=book.cfg.rounds)
    view.apply(BookMirror(book).update())

    def code(session: str, peer: str, round_: int = 1) -> grpc.StatusCode | None:
        try:
            view.answer(session, pb.HeartbeatRequest(peer_id=peer, round=round_))
        except Refused as e:
            return status_of(e.reason)
        return None

    assert code(a.session, "peer-0") is None
    assert code("", "peer-0") == grpc.StatusCode.UNAUTHENTICATED
    assert code("forged", "peer-0") == grpc.StatusCode.UNAUTHENTICATED
    assert code(a.session + "x" * 200, "peer-0") == grpc.StatusCode.UNAUTHENTICATED
    assert code(a.session, "peer-1") == grpc.StatusCode.PERMISSION_DENIED  # a's session as b
    assert code(b.session, "peer-1", book.cfg.rounds + 2) == grpc.StatusCode.INVALID_ARGUMENT
    assert all(a.session not in d for d in view.sessions)  # digests only, never the secrets


# ---------------------------------------------------------------- real processes

FAST = [
    *("--dataset", "synthetic", "--sync-every", "1", "--peer-timeout", "2"),
    *("--embed-dim", "16", "--expert-hidden", "8", "--experts", "4", "--min-peers", "2"),
]
LIVENESS = ["--liveness-listen", "127.0.0.1:0"]
SERVED = re.compile(r"process of their own \(pid (\d+)\) on port (\d+)")
ANSWERED = re.compile(r"answered (\d+) heartbeat\(s\)")


@pytest.fixture
def cluster_factory(tmp_path: Path):
    made: list[Cluster] = []

    def make(peers: int, rounds: int) -> Cluster:
        c = Cluster(tmp_path, peers, ["--rounds", str(rounds), *FAST])
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


def liveness_of(c: Cluster) -> tuple[int, int]:
    c.wait_for_log("coordinator", "FEDMOE_LISTENING")
    found = SERVED.search(c.log_text("coordinator"))
    assert found, c.logs()
    return int(found.group(1)), int(found.group(2))


def wait_for_round(c: Cluster, round_: int, timeout: float = 240) -> None:
    """Until metrics.jsonl holds `round_` (the run directory is the outside view of progress)."""
    path = c.out / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (path.exists() and any(r["round"] >= round_ for r in c.records())):
        assert time.monotonic() < deadline, c.logs()
        assert c.procs["coordinator"].poll() is None, c.logs()
        time.sleep(0.05)


def gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        try:  # a zombie still has /proc/PID: its state says it is dead
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, IndexError):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_run_heartbeats_the_liveness_process_and_counts_it_as_coordinator_traffic(
    cluster_factory,
) -> None:
    c = cluster_factory(3, 4)
    c.start_coordinator(extra=LIVENESS)
    for k in range(3):
        c.start_peer(k)
    assert c.wait("coordinator", timeout=300) == 0, c.logs()
    for k in range(3):
        assert c.wait(f"peer-{k}") == 0, c.logs()
    s = c.summary()
    assert s["status"] == "completed" and s["rounds_completed"] == 4
    answered = ANSWERED.search(c.log_text("coordinator"))
    assert answered and int(answered.group(1)) > 0, c.logs()  # heartbeats went there
    # Each message once, the same at both ends: what the peers counted as sent to the
    # coordinator is what the coordinator (with its liveness process) counted as received.
    both = s["bytes_by_direction"]
    view = s["coordinator_view"]
    assert view["bytes_received"] == both["coordinator_sent"]
    assert view["bytes_sent"] == both["coordinator_received"]


def test_the_liveness_process_killed_mid_run_peers_fall_back(cluster_factory) -> None:
    c = cluster_factory(3, 6)
    c.start_coordinator(extra=LIVENESS)
    pid, _ = liveness_of(c)
    for k in range(3):
        c.start_peer(k)
    wait_for_round(c, 1)
    os.kill(pid, signal.SIGKILL)
    assert c.wait("coordinator", timeout=300) == 0, c.logs()
    for k in range(3):
        assert c.wait(f"peer-{k}") == 0, c.logs()
    s = c.summary()
    assert s["status"] == "completed" and s["rounds_completed"] == 6
    assert s["dropped_peers"] == [], s["membership"]  # nobody was taken for dead
    assert "the liveness process exited" in c.log_text("coordinator")


def test_the_liveness_process_does_not_outlive_its_coordinator(cluster_factory) -> None:
    c = cluster_factory(2, 50)
    coordinator = c.start_coordinator(extra=LIVENESS)
    pid, _ = liveness_of(c)
    coordinator.kill()
    coordinator.wait(timeout=30)
    assert gone(pid, timeout=20), "the liveness process outlived its coordinator"


def test_attacks_on_the_liveness_port_are_refused_cheaply(cluster_factory) -> None:
    c = cluster_factory(2, 50)
    c.start_coordinator(extra=LIVENESS)
    pid, port = liveness_of(c)
    address = f"127.0.0.1:{port}"
    ch = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    stub = rpc.LivenessStub(ch)

    def code_of(request: pb.HeartbeatRequest, session: str | None = None) -> grpc.StatusCode:
        md = () if session is None else ((SESSION_METADATA, session),)
        try:
            stub.Heartbeat(request, metadata=md, timeout=10)
        except grpc.RpcError as e:
            return e.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK

    hello = pb.HeartbeatRequest(peer_id="peer-0", round=1)
    assert code_of(hello) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(hello, "s" * 100_00) in (
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
    )
    big = pb.HeartbeatRequest(peer_id="p" * 4096, round=1)
    assert code_of(big, "forged") == grpc.StatusCode.RESOURCE_EXHAUSTED  # past 1 KB: not read
    # Only heartbeats are served there: not the Coordinator's methods.
    join = rpc.CoordinatorStub(ch)
    with pytest.raises(grpc.RpcError) as e:
        join.Join(pb.JoinRequest(index=0, advertise="127.0.0.1:9"), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED

    before = rss_mb(pid)
    codes: list[grpc.StatusCode] = []

    def flood() -> None:
        own = rpc.LivenessStub(grpc.insecure_channel(address, options=CHANNEL_OPTIONS))
        for i in range(250):
            try:
                own.Heartbeat(hello, metadata=((SESSION_METADATA, f"x{i}"),), timeout=20)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())

    threads = [threading.Thread(target=flood) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes and set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
    assert rss_mb(pid) - before < 50  # nothing kept per refused call
    # Refusals are logged as counts (the first at once, then every 10 s), not one line each,
    # and never echo the caller's strings.
    c.wait_for_log("coordinator", "fedmoe.liveness WARNING refused")
    log = c.log_text("coordinator")
    assert log.count("refused") < 20, log[-2000:]
    assert "s" * 200 not in log and "p" * 200 not in log
    ch.close()


def test_heartbeats_on_the_liveness_port_keep_a_member_alive(tmp_path: Path) -> None:
    """Member a beats only on the liveness port, b only on the coordinator, c never: c is left
    out after --peer-timeout (2 s) and a never is, so the coordinator noted a's heartbeats."""
    c = Cluster(tmp_path, 3, ["--rounds", "5", *FAST], token=TOKEN)
    try:
        c.start_coordinator(extra=LIVENESS)
        _, port = liveness_of(c)
        a, b, silent = (Member(c.address, k) for k in range(3))
        for m in (a, b, silent):
            m.join()
        assert a.reply is not None and a.reply.liveness_port == port
        via_liveness = rpc.LivenessStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        ping = pb.HeartbeatRequest(peer_id="", round=1)
        # The mirror takes up to ~50 ms to learn a fresh session (a peer would send such a
        # beat to the coordinator instead): wait until the liveness process knows a's.
        deadline = time.monotonic() + 10
        while True:
            try:
                via_liveness.Heartbeat(ping, metadata=a.md, timeout=5)
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
                assert time.monotonic() < deadline, "the mirror never learnt a's session"
                time.sleep(0.02)
        # The coordinator's own replies name the liveness port too (a peer that joined before
        # it started, or rejoined a restarted coordinator, learns it there).
        assert b.stub.Heartbeat(ping, metadata=b.md, timeout=5).liveness_port == port
        left_at: float | None = None
        deadline = time.monotonic() + 60
        while left_at is None or time.monotonic() < left_at + 3:
            assert time.monotonic() < deadline, c.logs()
            via_liveness.Heartbeat(ping, metadata=a.md, timeout=5)
            left = set(b.stub.Heartbeat(ping, metadata=b.md, timeout=5).left)
            assert "peer-0" not in left, left
            if left_at is None and "peer-2" in left:
                left_at = time.monotonic()
            time.sleep(0.3)  # the heartbeat cadence, not a synchronisation
    finally:
        c.stop()


def test_fedmoe_local_liveness_under_mutual_tls(tmp_path: Path) -> None:
    """`fedmoe local --liveness --tls`: the liveness port takes the coordinator's certificate
    and the peers' client certificates, and the heartbeats go there."""
    certs, out = tmp_path / "certs", tmp_path / "run"
    subprocess.run([*FEDMOE, "certs", str(certs), "--peers", "2"], check=True, timeout=120)
    done = subprocess.run(
        [*FEDMOE, "local", "--peers", "2", "--rounds", "3", *FAST[:6], "--liveness", "--tls"]
        + ["--certs", str(certs), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = (out / "coordinator.log").read_text()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + log[-2000:]
    answered = ANSWERED.search(log)
    assert answered and int(answered.group(1)) > 0 and "refused 0" in log, log[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["coordinator_view"]["bytes_received"] == s["bytes_by_direction"]["coordinator_sent"]


def test_a_bad_liveness_address_is_refused_before_anything_starts(tmp_path: Path) -> None:
    done = subprocess.run(
        [*FEDMOE, "coordinator", "--listen", "127.0.0.1:0", "--liveness-listen", "nonsense"]
        + ["--peers", "2", "--dataset", "synthetic", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "--liveness-listen: 'nonsense' is not HOST:PORT" in done.stderr, done.stderr[-2000:]
    assert "FEDMOE_LISTENING" not in done.stdout
