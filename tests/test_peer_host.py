"""Several peers in one OS process (`fedmoe peer --index A-B`, `fedmoe local --procs P`).

Real processes on loopback: each hosted peer is a full member (own join, data, model, store,
counters), fetches between co-hosted peers go through gRPC and are counted, and the one expert
endpoint of a process routes each request to the peer it names.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedmoe.cli import parse_indices
from fedmoe.common.accounting import ByteCounter
from fedmoe.common.config import make_config, participants
from fedmoe.common.grpc_options import CHANNEL_OPTIONS, SERVER_OPTIONS
from fedmoe.common.proto import pb, rpc
from fedmoe.common.tensors import numpy_to_wire
from fedmoe.local import split_ranges
from fedmoe.peer.expert_service import ExpertExchangeService, expert_server
from fedmoe.peer.expert_store import ExpertStore
from tests.cluster import FEDMOE, Cluster, free_port

SMALL = [
    *("--dataset", "synthetic", "--seed", "2"),
    *("--embed-dim", "16", "--expert-hidden", "8", "--experts", "4"),
    *("--peer-timeout", "10", "--round-timeout", "60"),  # 3 s dropped hosted peers under load
]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDMOE, *args], capture_output=True, text=True, timeout=timeout)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# --------------------------------------------------------------------------- index specs


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("3", [3]),
        ("0-4", [0, 1, 2, 3, 4]),
        ("0,3,7", [0, 3, 7]),
        ("0-3,8", [0, 1, 2, 3, 8]),
        ("8, 0-1", [0, 1, 8]),
        ("5-5", [5]),
    ],
)
def test_index_specs(spec: str, expected: list[int]) -> None:
    assert parse_indices(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "bad peer index ''"),
        ("-1", "bad peer index '-1'"),
        ("3-", "bad peer index '3-'"),
        ("a-b", "bad peer index 'a-b'"),
        ("1,,2", "bad peer index ''"),
        ("5-2", "5-2"),
        ("0-3,2", "peer index 2 is given twice"),
        ("1024", "too large"),
    ],
)
def test_bad_index_specs_are_refused_clearly(spec: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_indices(spec)


def test_peer_command_refuses_a_bad_index_spec() -> None:
    proc = run_cli("peer", "--coordinator", "127.0.0.1:1", "--index", "4-1")
    assert proc.returncode == 2
    assert "--index" in proc.stderr and "bad peer index range '4-1'" in proc.stderr


def test_peers_are_split_into_contiguous_ranges() -> None:
    assert split_ranges(6, 2) == [[0, 1, 2], [3, 4, 5]]
    assert split_ranges(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_ranges(3, 3) == [[0], [1], [2]]
    ranges = split_ranges(100, 4)
    assert [len(r) for r in ranges] == [25] * 4 and sum(ranges, []) == list(range(100))


# --------------------------------------------------------------------------- a whole run


def test_six_peers_in_two_processes(tmp_path: Path) -> None:
    # P = 23 keeps the whole pool of 6 x 4 experts in every row: every peer fetches every
    # expert of the 5 others, two of which live in its own process.
    proc = run_cli(
        *("local", "--peers", "6", "--procs", "2", "--rounds", "2", *SMALL),
        *("--sync-every", "1", "--neighbors", "23", "--out", str(tmp_path)),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "starting 6 peers in 2 process(es)" in proc.stdout
    assert "peers-0-2.log" in proc.stdout and "peers-3-5.log" in proc.stdout
    assert (tmp_path / "peers-0-2.log").is_file() and not (tmp_path / "peer-0.log").exists()

    s = summary(tmp_path)
    assert s["status"] == "completed" and s["rounds_completed"] == 2
    assert s["dropped_peers"] == []
    assert s["launcher"] == {
        "processes": 2,
        "exited_early": [],
        "stopped_after_the_run": [],
        "failed_after_the_run": [],
    }
    recs = records(tmp_path)
    assert sorted((r["round"], r["peer"]) for r in recs) == [
        (r, f"peer-{k}") for r in (1, 2) for k in range(6)
    ]
    # Every peer fetched all 20 experts of the 5 others, co-hosted ones included.
    assert all(r["experts_fetched"] == 20 for r in recs), [r["experts_fetched"] for r in recs]
    assert all(r["bytes"]["p2p_received"] > 0 and r["bytes"]["p2p_sent"] > 0 for r in recs)
    # Each transfer counted once at each end, per peer: the sides agree.
    assert sum(r["bytes"]["p2p_sent"] for r in recs) == sum(
        r["bytes"]["p2p_received"] for r in recs
    )
    view = s["coordinator_view"]
    assert view["bytes_received"] == sum(r["bytes"]["coordinator_sent"] for r in recs)
    assert view["bytes_sent"] == sum(r["bytes"]["coordinator_received"] for r in recs)
    assert s["bytes"]["p2p"] == sum(r["bytes"]["p2p_sent"] for r in recs)  # each message once
    # One process, three members: three joins, each logged under its own name.
    log = (tmp_path / "peers-0-2.log").read_text()
    for k in range(3):
        assert f"fedmoe.peer.peer-{k} INFO joined as peer-{k}" in log
    # Each member trains on its own partition.
    assert len({r["num_samples"] for r in recs if r["round"] == 1}) > 1


def test_partial_participation_rounds_hold_exactly_the_sampled_peers(tmp_path: Path) -> None:
    proc = run_cli(
        *("local", "--peers", "6", "--procs", "2", "--rounds", "3", *SMALL),
        *("--clients-per-round", "3", "--sync-every", "1", "--out", str(tmp_path)),
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg = make_config(peers=6, clients_per_round=3, seed=2, dataset="synthetic")
    by_round: dict[int, list[str]] = {}
    for r in records(tmp_path):
        by_round.setdefault(r["round"], []).append(r["peer"])
    expected = {r: [f"peer-{k}" for k in participants(cfg, r)] for r in (1, 2, 3)}
    assert {r: sorted(p) for r, p in by_round.items()} == {
        r: sorted(p) for r, p in expected.items()
    }
    s = summary(tmp_path)
    assert s["status"] == "completed" and s["dropped_peers"] == []
    # Peers sampled for no later round waited for the end, then exited on their own.
    assert s["launcher"]["exited_early"] == [] and s["launcher"]["stopped_after_the_run"] == []


# --------------------------------------------------------------------------- routing


def _hosted_server(stores: dict[str, ExpertStore], counters: dict[str, ByteCounter]):  # type: ignore[no-untyped-def]
    service = ExpertExchangeService(hosted=len(stores))
    for peer_id, store in stores.items():
        service.add_peer(peer_id, store, counters[peer_id])
    server = expert_server(service, 4, SERVER_OPTIONS)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_one_endpoint_routes_each_fetch_to_the_peer_it_names() -> None:
    stores, counters = {}, {}
    for k, value in (("peer-0", 0.0), ("peer-1", 1.0)):
        store = ExpertStore(wait_timeout=5)
        store.publish(1, {0: [numpy_to_wire("experts.0.w", np.full(4, value, np.float32))]}, 4096)
        store.set_orders(1, {"peer-7": ([0], f"ticket-{k}")})
        stores[k], counters[k] = store, ByteCounter()
    server, port = _hosted_server(stores, counters)
    try:
        stub = rpc.ExpertExchangeStub(
            grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
        )

        def fetch(source: str, ticket: str) -> list[pb.TensorChunk]:
            request = pb.ExpertRequest(
                requester_id="peer-7", round=1, experts=[0], ticket=ticket, source_id=source
            )
            return list(stub.FetchExperts(request, timeout=10))

        chunks = fetch("peer-1", "ticket-peer-1")
        assert np.frombuffer(chunks[0].data, np.float32).tolist() == [1.0] * 4
        # Served and counted by peer-1 only.
        assert counters["peer-1"].totals()["p2p_sent"] > 0
        assert counters["peer-0"].totals()["p2p_sent"] == 0
        # The other peer's ticket does not open this one's store.
        for source, ticket, code in (
            ("peer-0", "ticket-peer-1", grpc.StatusCode.PERMISSION_DENIED),
            ("peer-9", "ticket-peer-0", grpc.StatusCode.NOT_FOUND),
            ("", "ticket-peer-0", grpc.StatusCode.NOT_FOUND),  # two hosted: must name one
            ("x" * 5000, "ticket-peer-0", grpc.StatusCode.NOT_FOUND),
        ):
            with pytest.raises(grpc.RpcError) as info:
                fetch(source, ticket)
            assert info.value.code() == code, (source, info.value.details())
            assert len(info.value.details()) < 200  # a caller's string is never echoed whole
    finally:
        server.stop(0)


def test_a_single_hosted_peer_also_answers_an_unnamed_fetch() -> None:
    store = ExpertStore(wait_timeout=5)
    store.publish(1, {0: [numpy_to_wire("experts.0.w", np.ones(4, np.float32))]}, 4096)
    store.set_orders(1, {"peer-1": ([0], "t")})
    server, port = _hosted_server({"peer-0": store}, {"peer-0": ByteCounter()})
    try:
        stub = rpc.ExpertExchangeStub(
            grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
        )
        request = pb.ExpertRequest(requester_id="peer-1", round=1, experts=[0], ticket="t")
        assert list(stub.FetchExperts(request, timeout=10))
    finally:
        server.stop(0)


def test_peer_host_process_refuses_an_unknown_source_and_finishes_the_run(
    tmp_path: Path,
) -> None:
    # Three members: the run cannot start before peer-2 joins, so the host is surely serving
    # when the probe arrives (with two, a fast run could be over before it).
    c = Cluster(tmp_path, 3, ["--rounds", "1", *SMALL])
    c.start_coordinator()
    port = free_port()
    c.start_peer("0-1", listen=f"127.0.0.1:{port}")
    try:
        stub = rpc.ExpertExchangeStub(
            grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
        )
        request = pb.ExpertRequest(
            requester_id="peer-0", round=1, experts=[0], ticket="guess", source_id="peer-5"
        )
        with pytest.raises(grpc.RpcError) as info:
            list(stub.FetchExperts(request, timeout=60, wait_for_ready=True))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
        assert "'peer-5' is not served here" in info.value.details()

        c.start_peer(2)
        assert c.wait("coordinator") == 0, c.logs()
        assert c.wait("peers-0-1") == 0 and c.wait("peer-2") == 0, c.logs()
        s = c.summary()
        assert s["status"] == "completed"
        assert sorted(r["peer"] for r in c.records()) == ["peer-0", "peer-1", "peer-2"]
        # Both hosted members kept their member secret, readable by this user only.
        for k in (0, 1):
            secret = c.state / "peers-0-1" / f"member-{k}.secret"
            assert secret.read_text().strip() and secret.stat().st_mode & 0o777 == 0o600
    finally:
        c.stop()


def test_local_refuses_more_processes_than_peers(tmp_path: Path) -> None:
    proc = run_cli("local", "--peers", "2", "--procs", "3", *SMALL, "--out", str(tmp_path))
    assert proc.returncode == 2 and "--procs must be between 1 and --peers" in proc.stderr


# --------------------------------------------------------------------------- shared per process


def test_hosted_peers_read_the_dataset_once_and_keep_only_their_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedmoe.common import data

    calls: list[tuple] = []
    real = data.load_dataset

    def counting(name: str, data_dir: str | None, seed: int):  # type: ignore[no-untyped-def]
        calls.append((name, data_dir, seed))
        return real(name, data_dir, seed)

    monkeypatch.setattr(data, "load_dataset", counting)
    data.clear_dataset_cache()
    try:
        cached = [
            data.load_peer_data("synthetic", None, 4, k, 0.5, 7, cache=True) for k in range(4)
        ]
        assert calls == [("synthetic", None, 7)]
        plain = [data.load_peer_data("synthetic", None, 4, k, 0.5, 7) for k in range(4)]
        assert len(calls) == 5  # without the cache: read again
        for a, b in zip(cached, plain, strict=True):
            assert np.array_equal(a.train.x, b.train.x) and np.array_equal(a.train.y, b.train.y)
            assert np.array_equal(a.local_test.y, b.local_test.y)
        assert sum(len(p.train) for p in cached) == 2000  # disjoint rows, nothing else kept
        data.clear_dataset_cache()
        data.load_peer_data("synthetic", None, 4, 0, 0.5, 7, cache=True)
        assert len(calls) == 6  # cleared: read again
    finally:
        data.clear_dataset_cache()


def test_member_secret_is_private_and_replaced_atomically(tmp_path: Path) -> None:
    from fedmoe.peer.checkpoint import MemberSecret

    secret = MemberSecret(tmp_path / "state", 3)
    assert secret.load() == ""  # first join: nothing to prove
    secret.save("first-secret")
    secret.save("second-secret")
    assert secret.path.name == "member-3.secret"
    assert secret.load() == "second-secret"
    assert secret.path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in secret.path.parent.iterdir()] == ["member-3.secret"]  # no temp left
