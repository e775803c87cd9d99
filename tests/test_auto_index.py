"""`fedmoe peer --index auto`: the coordinator assigns indices at join (issue #8, one `peer`
service scaled to N). The assignment as pure logic, then real processes: three auto peers fill
a run, a fourth is refused, a killed one comes back under its old index, and under mutual TLS
the certificate decides."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import grpc
import pytest
import torch

from fedmoe.common.auth import TOKEN_METADATA
from fedmoe.common.grpc_options import CHANNEL_OPTIONS
from fedmoe.common.proto import pb, rpc
from fedmoe.common.tls import channel, load_tls
from fedmoe.coordinator.rounds import Refused
from fedmoe.peer.advertise import auto_advertise_port, own_address
from fedmoe.peer.checkpoint import AssignedIndex
from fedmoe.peer.main import assigned_index, check_device, device_for
from tests.cluster import FEDMOE, Cluster
from tests.test_rounds import make_book

RUN = [
    *("--dataset", "synthetic", "--seed", "3", "--sync-every", "1"),
    *("--peer-timeout", "3", "--round-timeout", "60", "--min-peers", "2"),
    *("--embed-dim", "16", "--expert-hidden", "8", "--experts", "4"),
]
TOKEN = "auto-index-token-0123456789abcdef"

# ------------------------------------------------------------------ the assignment (pure logic)


def test_auto_gets_the_lowest_index_no_member_holds() -> None:
    book, _, _ = make_book(peers=4)
    book.join(1, "h1:1")  # an explicit peer
    got = [book.join(0, f"a{k}:1", any_index=True).index for k in range(3)]
    assert got == [0, 2, 3]
    with pytest.raises(Refused, match="the run is full: all 4 peer indices are held") as info:
        book.join(0, "late:1", any_index=True)
    assert "silent" not in str(info.value)  # all live: nothing to restart


def test_a_silent_members_index_is_not_given_to_an_auto_peer() -> None:
    book, clock, _ = make_book(peers=3)
    a = book.join(0, "a:1", any_index=True)
    book.join(0, "b:1", any_index=True)
    clock.now += 11  # a and b silent past peer_timeout
    book.tick()
    assert book.join(0, "c:1", any_index=True).index == 2  # free, not a's index 0
    # Full: a's index stays a's; the refusal says which are silent and how to bring them back.
    with pytest.raises(Refused, match=r"silent: 0, 1 \(restart that peer with its --state-dir"):
        book.join(0, "d:1", any_index=True)
    # A wrong secret naming index 0 proves nothing.
    with pytest.raises(Refused, match="the run is full"):
        book.join(0, "d:1", "guessed-" + a.secret[8:], any_index=True)
    # a's own restart (its index and secret from its state dir) rejoins as a.
    back = book.join(0, "a:2", a.secret, any_index=True)
    assert (back.index, back.joins, back.secret) == (0, 2, a.secret)


def test_a_restarted_auto_peer_rejoins_as_itself_even_while_live() -> None:
    book, _, _ = make_book(peers=3)
    a = book.join(0, "a:1", any_index=True)
    b = book.join(0, "b:1", any_index=True)
    assert (a.index, b.index) == (0, 1)
    again = book.join(1, "b:2", b.secret, any_index=True)  # b killed and restarted at once
    assert (again.index, again.joins) == (1, 2)
    # A secret of another run (unknown here) joins as a new member on a free index.
    stale = book.join(1, "s:1", "secret-of-another-run", any_index=True)
    assert stale.index == 2 and stale.secret != "secret-of-another-run"


def test_assigned_ids_and_saved_indices_are_checked(tmp_path: Path) -> None:
    assert assigned_index("peer-2", 3) == 2
    for bad in ("peer-3", "peer-x", "peer--1", "coordinator", "peer-" + "9" * 50):
        with pytest.raises(SystemExit, match="the coordinator assigned"):
            assigned_index(bad, 3)
    saved = AssignedIndex(tmp_path)
    assert saved.load() is None
    saved.save(7)
    assert (
        AssignedIndex(tmp_path).load() == 7
        and (tmp_path / "assigned-index").stat().st_mode & 0o77 == 0
    )
    (tmp_path / "assigned-index").write_text("../../etc\n")
    with pytest.raises(SystemExit, match="not a peer index: remove it"):
        saved.load()


def test_advertise_auto_spelling_and_address() -> None:
    assert auto_advertise_port("peer0:50052") is None
    assert auto_advertise_port("auto") == 0 and auto_advertise_port("auto:50052") == 50052
    for bad in ("auto:", "auto:0", "auto:70000", "auto:x"):
        with pytest.raises(SystemExit, match="use auto"):
            auto_advertise_port(bad)
    # Towards a loopback coordinator the route's source is loopback (no packet is sent).
    assert own_address("127.0.0.1:9", 50052) == "127.0.0.1:50052"


# ------------------------------------------------------------------ real processes


def test_auto_peers_fill_the_run_and_a_restart_keeps_its_index(tmp_path: Path) -> None:
    # --min-peers 3: round 3 waits for the killed peer to come back (deterministic order).
    c = Cluster(tmp_path, 3, ["--rounds", "4", *RUN, "--min-peers", "3"])
    c.start_coordinator()
    try:
        for k in range(3):
            faults = "kill_after_round=2" if k == 0 else None
            c.start_auto_peer(f"auto-{k}", faults=faults, extra=["--advertise", "auto"])
        for k in range(3):
            c.wait_for_log(f"auto-{k}", "joined as peer-")
        held = {k: AssignedIndex(c.state / f"auto-{k}").load() for k in range(3)}
        assert sorted(held.values()) == [0, 1, 2]  # type: ignore[type-var]
        for k in range(3):
            assert f"joined as peer-{held[k]}," in c.log_text(f"auto-{k}")
        # --advertise auto: this host's address towards the (loopback) coordinator.
        assert "advertising 127.0.0.1:" in c.log_text("auto-1")

        # A fourth auto peer: every index is held (auto-0's too, killed or not).
        late = c.start_auto_peer("auto-late")
        assert late.wait(timeout=120) != 0
        assert "the run is full: all 3 peer indices are held" in c.log_text("auto-late")
        assert not (c.state / "auto-late" / "assigned-index").exists()

        assert c.wait("auto-0") == -signal.SIGKILL
        c.start_auto_peer("auto-0")  # same --state-dir: the same member, the same index
        assert c.wait("coordinator") == 0, c.logs()
        for k in range(3):
            assert c.wait(f"auto-{k}") == 0, c.logs()
    finally:
        c.stop()
    assert f"joined as peer-{held[0]}," in (tmp_path / "auto-0.2.log").read_text()
    s = c.summary()
    assert s["status"] == "completed" and s["rounds_completed"] == 4
    rejoined = [e for e in s["events"] if e["event"] == "rejoined"]
    assert [e["peers"] for e in rejoined] == [[f"peer-{held[0]}"]] and rejoined[0]["proven"]
    assert {r["peer"] for r in c.records()} == {"peer-0", "peer-1", "peer-2"}
    mine = sorted(r["round"] for r in c.records() if r["peer"] == f"peer-{held[0]}")
    assert mine[:2] == [1, 2] and mine[-1] == 4


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ca")
    proc = subprocess.run(
        [*FEDMOE, "certs", str(d), "--peers", "2"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return d


def test_under_mutual_tls_the_certificate_decides_the_index(certs: Path, tmp_path: Path) -> None:
    c = Cluster(tmp_path, 2, ["--rounds", "2", *RUN], token=TOKEN)
    c.start_coordinator(extra=["--tls", "--certs", str(certs)])
    meta = ((TOKEN_METADATA, TOKEN),)
    request = pb.JoinRequest(index=0, advertise="localhost:1", any_index=True)
    try:

        def join(cert: str) -> pb.JoinReply:
            stub = rpc.CoordinatorStub(
                channel(f"localhost:{c.port}", load_tls(certs, cert), CHANNEL_OPTIONS)
            )
            reply: pb.JoinReply = stub.Join(request, timeout=60, wait_for_ready=True, metadata=meta)
            return reply

        assert join("peer-1").peer_id == "peer-1"  # not 0, the lowest free index
        with pytest.raises(grpc.RpcError) as info:
            join("coordinator")
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "names no peer index" in (info.value.details() or "")
    finally:
        c.stop()
    # The peer command resolves auto from --cert-name, and asks for it under --tls.
    proc = subprocess.run(
        [*FEDMOE, "peer", "--coordinator", "localhost:1", "--index", "auto", "--tls"]
        + ["--certs", str(certs)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "give --cert-name peer-K" in proc.stderr


def test_cuda_auto_spreads_peers_over_the_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    assert device_for("cpu", 5) == "cpu" and device_for("cuda:1", 5) == "cuda:1"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [device_for("cuda:auto", k) for k in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU is available"):
        check_device("cuda:auto")
