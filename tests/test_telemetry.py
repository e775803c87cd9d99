"""The researcher's desk: Prometheus endpoints, TensorBoard scalars and gRPC server reflection.

All through real processes: `fedmoe local` for a live run (its endpoints scraped while it runs,
its event files read back after it), and a coordinator plus one peer (tests/cluster.py) held
before round 1 closes, for reflection and refusal counting on both servers.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from fedmoe.common.auth import TOKEN_METADATA
from fedmoe.common.proto import pb, rpc
from fedmoe.common.reflection import TokenGate
from fedmoe.common.telemetry import METRICS_LINE
from tests.cluster import FEDMOE, Cluster

TOKEN = "telemetry-test-token-" + "x" * 16
URL = re.compile(re.escape(METRICS_LINE) + r"(http://\S+)")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """{(sample name, sorted labels): value} of one scrape, parsed as Prometheus text."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def url_in(path: Path) -> str | None:
    match = URL.search(path.read_text(errors="replace")) if path.is_file() else None
    return match.group(1) if match else None


def wait_for(what: str, check: Callable[[], Any], proc: subprocess.Popen, timeout: float) -> Any:
    """Poll `check` until it returns something truthy; fail if `proc` ends or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"never saw {what} (process exit {proc.poll()})")
        time.sleep(0.05)


# ---------------------------------------------------------------- a live run of `fedmoe local`


@pytest.fixture(scope="module")
def live_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, Path]]:
    root = tmp_path_factory.mktemp("live")
    out = root / "run"
    console = open(root / "console.txt", "w")
    proc = subprocess.Popen(
        [*FEDMOE, "local", "--peers", "2", "--rounds", "3", "--dataset", "digits"]
        + ["--metrics-port", "0", "--tensorboard", str(root / "tb"), "--out", str(out)],
        stdout=console,
        stderr=subprocess.STDOUT,
    )
    yield proc, root
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    console.close()


def finished(live: tuple[subprocess.Popen, Path]) -> Path:
    proc, root = live
    assert proc.wait(timeout=300) == 0, (root / "console.txt").read_text()
    return root


def test_endpoints_answer_while_the_run_is_live(live_run: tuple[subprocess.Popen, Path]) -> None:
    proc, root = live_run
    coordinator = wait_for("the coordinator's URL", lambda: url_in(root / "console.txt"), proc, 120)
    peer = wait_for("peer-0's URL", lambda: url_in(root / "run" / "peer-0.log"), proc, 120)
    seen: dict[str, Samples] = {}

    def after_round_1() -> bool:
        # Both endpoints are scraped in every pass: each is kept once it shows round 1 done.
        for name, url in (("coordinator", coordinator), ("peer", peer)):
            if name in seen:
                continue
            try:
                samples = scrape(url)
            except (urllib.error.URLError, ConnectionError) as e:
                raise AssertionError(f"{name} endpoint {url} did not answer: {e}") from e
            labels = {"peer": "peer-0"} if name == "peer" else {}
            if (value(samples, "fedmoe_round", state="reported", **labels) or 0) >= 1:
                seen[name] = samples
        return len(seen) == 2

    wait_for("round 1 on both endpoints", after_round_1, proc, 120)

    c = seen["coordinator"]
    assert (value(c, "fedmoe_round", state="open") or 0) >= 1
    assert value(c, "fedmoe_peers_alive") == 2
    for direction in ("sent", "received"):
        assert (
            value(c, "fedmoe_bytes_total", **{"class": "coordinator"}, direction=direction) or 0
        ) > 0
        assert value(c, "fedmoe_bytes_total", **{"class": "p2p"}, direction=direction) is not None
        # The coordinator's own live count of its calls.
        own = value(
            c, "fedmoe_coordinator_bytes_total", **{"class": "coordinator"}, direction=direction
        )
        assert own is not None and own > 0
    for k in (0, 1):
        assert 0 <= (value(c, "fedmoe_accuracy", peer=f"peer-{k}") or -1) <= 1
        assert value(c, "fedmoe_global_accuracy", peer=f"peer-{k}") is not None
    assert (value(c, "fedmoe_round_seconds_count") or 0) >= 1

    p = seen["peer"]
    assert (
        value(p, "fedmoe_bytes_total", peer="peer-0", **{"class": "coordinator"}, direction="sent")
        or 0
    ) > 0
    assert 0 <= (value(p, "fedmoe_accuracy", peer="peer-0") or -1) <= 1
    assert (value(p, "fedmoe_round_seconds_count", peer="peer-0") or 0) >= 1
    # A process hosting peer-0 only: no series of any other peer.
    assert all(dict(labels).get("peer", "peer-0") == "peer-0" for _, labels in p)


def test_tensorboard_holds_each_round(live_run: tuple[subprocess.Popen, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = finished(live_run)
    board = EventAccumulator(str(root / "tb"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    expected = {"accuracy/mean", "global_accuracy/mean", "bytes/coordinator", "bytes/p2p"}
    expected |= {"round_seconds", "phase_seconds/train", "phase_seconds/fetch"}
    expected |= {f"{kind}/peer-{k}" for kind in ("accuracy", "global_accuracy") for k in (0, 1)}
    assert expected <= tags, sorted(tags)
    assert [e.step for e in board.Scalars("accuracy/mean")] == [1, 2, 3]

    records = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r["round"] == 3]
    mean = sum(r["accuracy"] for r in final) / len(final)
    assert board.Scalars("accuracy/mean")[-1].value == pytest.approx(mean, rel=1e-6)
    # Round 2 is the sync round (--sync-every 2): experts moved, each byte counted once.
    p2p = sum(r["bytes"]["p2p_sent"] for r in records if r["round"] == 2)
    assert p2p > 0
    assert board.Scalars("bytes/p2p")[1].value == pytest.approx(p2p, rel=1e-6)
    assert board.Scalars("bytes/p2p")[0].value == 0  # no experts move in round 1


# ---------------------------------------------------------------- reflection and refusals


def list_services(address: str, token: str | None) -> list[str]:
    metadata = [(TOKEN_METADATA, token)] if token is not None else None
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10)
        return [s.name for r in replies for s in r.list_services_response.service]


def refused_code(address: str, token: str | None) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        list_services(address, token)
    return e.value.code()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str, str]]:
    """A coordinator for 2 peers and peer 0 alone: the run waits in round 1 (it never closes)."""
    cluster = Cluster(tmp_path_factory.mktemp("held"), 2, ["--dataset", "digits"], token=TOKEN)
    try:
        cluster.start_coordinator(extra=["--metrics-port", "0"])
        cluster.wait_for_log("coordinator", "FEDMOE_LISTENING")
        cluster.start_peer(0, extra=["--metrics-port", "0"])
        cluster.wait_for_log("peer-0", "joined as peer-0")
        peer_address = re.search(r"serving experts at (\S+)", cluster.log_text("peer-0"))
        assert peer_address is not None
        yield cluster, cluster.address, peer_address.group(1)
    finally:
        cluster.stop()


def test_reflection_answers_only_with_the_join_token(held: tuple[Cluster, str, str]) -> None:
    cluster, coordinator, peer = held
    assert "fedmoe.v1.Coordinator" in list_services(coordinator, TOKEN)
    assert "fedmoe.v1.ExpertExchange" in list_services(peer, TOKEN)
    for address in (coordinator, peer):
        assert refused_code(address, None) == grpc.StatusCode.UNAUTHENTICATED
        assert refused_code(address, "not-the-token-" + "y" * 16) == grpc.StatusCode.UNAUTHENTICATED

    url = URL.search(cluster.log_text("coordinator"))
    assert url is not None
    samples = scrape(url.group(1))
    assert value(samples, "fedmoe_refusals_total", reason="unknown_caller") == 2
    assert value(samples, "fedmoe_round", state="open") == 1
    assert value(samples, "fedmoe_round", state="reported") == 0


def test_peer_counts_refused_expert_requests(held: tuple[Cluster, str, str]) -> None:
    cluster, _, peer = held
    with grpc.insecure_channel(peer) as channel:
        stub = rpc.ExpertExchangeStub(channel)
        for source, round_ in (("peer-0", 99), ("peer-9", 1), ("evil\n" * 50, 1)):
            request = pb.ExpertRequest(source_id=source, requester_id="peer-1", round=round_)
            with pytest.raises(grpc.RpcError) as e:
                list(stub.FetchExperts(request, timeout=10))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    url = URL.search(cluster.log_text("peer-0"))
    assert url is not None
    samples = scrape(url.group(1))
    assert value(samples, "fedmoe_refusals_total", peer="peer-0", reason="nothing_there") == 1
    # A source_id this process does not host is never a label: it is "other".
    assert value(samples, "fedmoe_refusals_total", peer="other", reason="nothing_there") == 2
    assert {dict(labels).get("peer") for _, labels in samples} <= {None, "peer-0", "other"}


def test_the_gate_refuses_without_reading_the_stream() -> None:
    """The refusing handler never touches the request stream (a flood costs nothing)."""

    class Details:
        method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        invocation_metadata = ((TOKEN_METADATA, "wrong"),)

    class Aborted(Exception):
        pass

    class Context:
        def abort(self, code: grpc.StatusCode, details: str) -> None:
            raise Aborted(code)

    def untouchable() -> Iterator[Any]:
        raise AssertionError("the request stream was read")
        yield

    def continuation(_: Any) -> Any:
        raise AssertionError("a refused call must not reach the reflection service")

    handler = TokenGate(TOKEN).intercept_service(continuation, Details())
    with pytest.raises(Aborted) as e:
        list(handler.stream_stream(untouchable(), Context()))
    assert e.value.args[0] == grpc.StatusCode.UNAUTHENTICATED


def test_launcher_metrics_ports(tmp_path: Path) -> None:
    """`fedmoe local --metrics-port P`: coordinator P, peer process i P+1+i; too high: refused."""
    from fedmoe.cli import build_parser
    from fedmoe.local import check_metrics_ports, telemetry_argv

    args = build_parser().parse_args(
        ["local", "--out", str(tmp_path), "--metrics-port", "9100", "--tensorboard", "tb"]
    )
    assert telemetry_argv(args, None)[:2] == ["--metrics-port", "9100"]
    assert "--tensorboard" in telemetry_argv(args, None)
    assert telemetry_argv(args, 2) == ["--metrics-port", "9103", "--metrics-listen", "127.0.0.1"]
    check_metrics_ports(args, 4)
    args.metrics_port = 65534
    with pytest.raises(ValueError, match="choose a lower port"):
        check_metrics_ports(args, 2)
    bad = subprocess.run(
        [*FEDMOE, "coordinator", "--out", str(tmp_path), "--metrics-port", "70000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "a port is in 0..65535" in bad.stderr
