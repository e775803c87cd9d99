"""Bad input refused, only members admitted: a hostile client against real processes, and mTLS."""

from __future__ import annotations

import subprocess
import time
import zlib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedmoe.common.accounting import ByteCounter
from fedmoe.common.auth import SESSION_METADATA, TOKEN_METADATA
from fedmoe.common.grpc_options import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES, SERVER_OPTIONS
from fedmoe.common.proto import pb, rpc
from fedmoe.common.tensors import chunk_tensor, numpy_to_wire
from fedmoe.common.tls import add_port, channel, load_tls
from fedmoe.peer.expert_service import ExpertExchangeService, add_expert_exchange
from fedmoe.peer.expert_store import ExpertStore
from tests.cluster import FEDMOE, Cluster, free_port

TOKEN = "s3cret-token-for-this-run-0123456789"
RUN = [
    *("--rounds", "2", "--dataset", "synthetic", "--sync-every", "1"),
    *("--peer-timeout", "3", "--min-peers", "2", "--round-timeout", "60"),
    *("--embed-dim", "16", "--expert-hidden", "8", "--experts", "4"),
]


def upload(header: pb.UpdateHeader, chunks: list[pb.TensorChunk]) -> Iterator[pb.UpdatePart]:
    yield pb.UpdatePart(header=header)
    for c in chunks:
        yield pb.UpdatePart(chunk=c)


def refused(call, code: grpc.StatusCode, text: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details(), info.value.details()


def test_hostile_client_is_refused_and_the_run_goes_on(tmp_path: Path) -> None:
    c = Cluster(tmp_path, 3, RUN, token=TOKEN)
    c.start_coordinator()
    peer_port = free_port()
    c.start_peer(1, listen=f"127.0.0.1:{peer_port}")
    c.start_peer(2)
    try:
        ch = grpc.insecure_channel(c.address, options=CHANNEL_OPTIONS)
        stub = rpc.CoordinatorStub(ch)
        join = pb.JoinRequest(index=0, advertise="127.0.0.1:9")

        # 1. A wrong token.
        refused(
            lambda: stub.Join(
                join, metadata=((TOKEN_METADATA, "x" * 32),), timeout=60, wait_for_ready=True
            ),
            grpc.StatusCode.UNAUTHENTICATED,
            "invalid join token",
        )
        # No session at all.
        refused(
            lambda: stub.Heartbeat(pb.HeartbeatRequest(peer_id="peer-0"), timeout=10),
            grpc.StatusCode.UNAUTHENTICATED,
            "unknown or expired session",
        )

        # A member that misbehaves: joins properly, then sends garbage.
        reply = stub.Join(join, metadata=((TOKEN_METADATA, TOKEN),), timeout=30)
        md = ((SESSION_METADATA, reply.session),)
        header = pb.UpdateHeader(peer_id="peer-0", round=1, num_samples=10)
        d = reply.config.embed_dim

        def send(chunks: list[pb.TensorChunk]):  # type: ignore[no-untyped-def]
            return lambda: stub.SubmitUpdate(upload(header, chunks), metadata=md, timeout=30)

        # 2. A tensor of the wrong shape.
        bad_shape = list(
            chunk_tensor(numpy_to_wire("embedding.0.weight", np.zeros((d, 5), np.float32)))
        )
        refused(
            send(bad_shape),
            grpc.StatusCode.INVALID_ARGUMENT,
            "shape [16, 5] does not match the expected [16, 32]",
        )
        good = list(
            chunk_tensor(numpy_to_wire("embedding.0.weight", np.zeros((d, 32), np.float32)), 256)
        )
        # 3. A corrupted checksum.
        corrupt = [pb.TensorChunk.FromString(x.SerializeToString()) for x in good]
        corrupt[1].data = b"\xff" + corrupt[1].data[1:]
        refused(send(corrupt), grpc.StatusCode.INVALID_ARGUMENT, "checksum mismatch")
        # 4. A chunk past the declared size.
        past = [pb.TensorChunk.FromString(x.SerializeToString()) for x in good]
        past[-1].data += b"\x00" * 8
        past[-1].crc32 = zlib.crc32(past[-1].data)
        refused(send(past), grpc.StatusCode.INVALID_ARGUMENT, "past the declared size")
        # 5. A message over the limit: gRPC refuses it before our code sees it.
        huge = pb.TensorChunk(name="embedding.0.weight", data=b"\x00" * (MAX_MESSAGE_BYTES + 1))
        refused(send([huge]), grpc.StatusCode.RESOURCE_EXHAUSTED, "")
        # 6. Another member's identity.
        refused(
            lambda: stub.Heartbeat(pb.HeartbeatRequest(peer_id="peer-1"), metadata=md, timeout=10),
            grpc.StatusCode.PERMISSION_DENIED,
            "used as peer-1",
        )
        # 7. Experts from a real peer without a ticket from the coordinator's plan.
        peer = rpc.ExpertExchangeStub(
            grpc.insecure_channel(f"127.0.0.1:{peer_port}", options=CHANNEL_OPTIONS)
        )
        steal = pb.ExpertRequest(requester_id="peer-0", round=1, experts=[0], ticket="guess")
        # The peer's server is up before its join completes; until then it serves nobody.
        deadline = time.monotonic() + 60
        while "peer-1 joined" not in c.log_text("coordinator"):
            assert time.monotonic() < deadline, "peer-1 never joined"
            time.sleep(0.05)
        refused(
            lambda: list(peer.FetchExperts(steal, timeout=60, wait_for_ready=True)),
            grpc.StatusCode.PERMISSION_DENIED,
            "",
        )
        ch.close()

        # The hostile member goes silent; the run finishes without it.
        assert c.wait("coordinator") == 0, c.logs()
        assert c.wait("peer-1") == 0 and c.wait("peer-2") == 0
        s = c.summary()
        assert s["status"] == "completed" and s["dropped_peers"] == ["peer-0"]
        log = c.log_text("coordinator")
        for text in (
            "invalid join token",
            "does not match the expected",
            "checksum mismatch",
            "past the declared size",
        ):
            assert text in log  # each refusal is logged with its reason
    finally:
        c.stop()


def test_token_on_the_command_line_is_refused() -> None:
    proc = subprocess.run(
        [*FEDMOE, "peer", "--coordinator", "127.0.0.1:1", "--index", "0", "--token", "abc"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--token-file" in proc.stderr


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    run_ca, rogue_ca = tmp_path_factory.mktemp("run-ca"), tmp_path_factory.mktemp("rogue-ca")
    for d in (run_ca, rogue_ca):
        proc = subprocess.run(
            [*FEDMOE, "certs", str(d), "--peers", "2"], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
    return run_ca, rogue_ca


def test_tls_run_completes(certs: tuple[Path, Path], tmp_path: Path) -> None:
    run_ca, _ = certs
    proc = subprocess.run(
        [
            *FEDMOE,
            "local",
            "--peers",
            "2",
            *RUN,
            "--min-peers",
            "2",
            "--tls",
            "--certs",
            str(run_ca),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "status completed" in proc.stdout


def test_peer_with_a_certificate_from_another_ca_cannot_register(certs, tmp_path: Path) -> None:
    run_ca, rogue_ca = certs
    c = Cluster(tmp_path, 2, RUN, token=TOKEN)
    c.start_coordinator(extra=["--tls", "--certs", str(run_ca)])
    c.start_peer(0, extra=["--tls", "--certs", str(rogue_ca), "--timeout", "8"])
    try:
        assert c.wait("peer-0", timeout=120) != 0
        assert "peer 0: DEADLINE_EXCEEDED" in c.log_text(
            "peer-0"
        )  # never got through the handshake
        assert "joined" not in c.log_text("coordinator")
    finally:
        c.stop()


def test_peer_with_a_certificate_from_another_ca_cannot_fetch(certs) -> None:
    run_ca, rogue_ca = certs
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=SERVER_OPTIONS)
    store = ExpertStore(wait_timeout=5)
    store.publish(1, {0: [numpy_to_wire("experts.0.w", np.ones(4, np.float32))]}, 4096)
    store.set_orders(1, {"peer-1": ([0], "ticket")})
    add_expert_exchange(server, ExpertExchangeService(store, ByteCounter()))
    port = add_port(server, "127.0.0.1:0", load_tls(run_ca, "peer-0"))
    server.start()
    try:
        request = pb.ExpertRequest(requester_id="peer-1", round=1, experts=[0], ticket="ticket")
        rogue = rpc.ExpertExchangeStub(
            channel(f"localhost:{port}", load_tls(rogue_ca, "peer-1"), CHANNEL_OPTIONS)
        )
        refused(
            lambda: list(rogue.FetchExperts(request, timeout=10)), grpc.StatusCode.UNAVAILABLE, ""
        )
        member = rpc.ExpertExchangeStub(
            channel(f"localhost:{port}", load_tls(run_ca, "peer-1"), CHANNEL_OPTIONS)
        )
        chunks = list(
            member.FetchExperts(request, timeout=10)
        )  # the same request with the run's CA
        assert chunks and chunks[0].name == "experts.0.w"
    finally:
        server.stop(0)
