"""`fedmoe coordinator`: serve the run, checkpoint it, write the run directory, exit at the end."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedmoe.common import faults
from fedmoe.common.accounting import ByteCounter, CountingServerInterceptor
from fedmoe.common.auth import CredentialError, load_token, new_token_file
from fedmoe.common.grpc_options import SERVER_OPTIONS
from fedmoe.common.netaddr import is_loopback_listen
from fedmoe.common.proto import pb, rpc
from fedmoe.common.reflection import REFLECTION_SERVICES, TokenGate, enable_reflection
from fedmoe.common.telemetry import (
    CoordinatorTelemetry,
    MetricsEndpoint,
    RefusalInterceptor,
    announce,
)
from fedmoe.common.tls import TlsFiles, add_port
from fedmoe.common.wire_counters import METHOD, WireMeter
from fedmoe.common.wire_counters import detect as detect_interfaces
from fedmoe.coordinator.aio_server import AioServing
from fedmoe.coordinator.board import RoundBoard
from fedmoe.coordinator.checkpoint import CoordinatorCheckpoint
from fedmoe.coordinator.liveness import LivenessProcess
from fedmoe.coordinator.results import RunResults
from fedmoe.coordinator.rounds import RoundBook
from fedmoe.coordinator.service import CoordinatorService, heartbeat_ms
from fedmoe.coordinator.strategies import make_strategy

log = logging.getLogger("fedmoe.coordinator")
TICK_SECONDS = 0.25
# Which gRPC server serves the coordinator: "aio" (one event loop, coordinator/aio_server.py)
# or "threads" (a thread per call, as before; kept for A/B measurements and as a fallback).
SERVER_ENV = "FEDMOE_COORDINATOR_SERVER"
SERVER_KINDS = ("aio", "threads")


def server_kind() -> str:
    kind = os.environ.get(SERVER_ENV, "aio") or "aio"
    if kind not in SERVER_KINDS:
        raise SystemExit(f"coordinator: {SERVER_ENV}={kind!r}: must be one of {SERVER_KINDS}")
    return kind


class ThreadServing:
    """The Coordinator, health and (gated) reflection services on a thread-pool server."""

    def __init__(
        self,
        book: RoundBook,
        token: str,
        listen: str,
        tls: TlsFiles | None,
        interceptors: list[grpc.ServerInterceptor],
        workers: int,
    ) -> None:
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
            options=SERVER_OPTIONS,
            maximum_concurrent_rpcs=workers,
            interceptors=interceptors,
        )
        service = CoordinatorService(book, token, tls=tls is not None)
        self.told_finished = service.told_finished
        rpc.add_CoordinatorServicer_to_server(service, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection(self.server, ("fedmoe.v1.Coordinator", health.SERVICE_NAME))
        self.port = add_port(self.server, listen, tls)  # RuntimeError when it cannot listen
        self.server.start()

    def serving(self) -> None:
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set("fedmoe.v1.Coordinator", health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace=grace).wait()


def wire_summary(wire: WireMeter, by_round: dict[int, dict[str, int]], records: list[dict]) -> dict:
    """Wire bytes per role. The coordinator's interface carries only coordinator-class traffic,
    and every p2p packet crosses two peers' interfaces (out of one, into another), so with every
    node measured: p2p (each packet once) = (all peers' interface bytes - the coordinator's) / 2."""
    peers: dict[str, dict[str, int]] = {}
    unmeasured = set()
    for rec in records:
        w = rec.get("wire")
        if w is None:
            unmeasured.add(rec["peer"])
            continue
        p = peers.setdefault(rec["peer"], {"sent": 0, "received": 0})
        p["sent"] += w["sent"]
        p["received"] += w["received"]
    coordinator = sum(wire.total) if wire.measured else None
    peer_total = sum(p["sent"] + p["received"] for p in peers.values())
    all_measured = wire.measured and not unmeasured and bool(peers)
    return {
        "method": METHOD
        if (wire.measured or peers)
        else "not measured: no node has an interface of its own",
        "coordinator": coordinator,
        "p2p": (peer_total - coordinator) // 2
        if all_measured and coordinator is not None
        else None,
        "peers_total": peer_total if peers else None,
        "by_role": {
            "coordinator": {
                "interfaces": wire.counters.interfaces if wire.counters else [],
                "received": wire.total[0] if wire.measured else None,
                "sent": wire.total[1] if wire.measured else None,
                "by_round": by_round,
            },
            "peers": peers,
        },
        "note": (
            "classes told apart by role: the coordinator's interface carries only coordinator "
            "traffic; p2p = (peers' interface bytes minus the coordinator's) / 2, each packet once "
            "(it leaves one peer's interface and enters another's). Counted from process "
            "start to each node's last round (the final acks and connection close are not)."
        ),
    }


def _open_board(logdir: Path) -> RoundBoard:
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        return RoundBoard(logdir)
    except (OSError, ImportError) as e:
        raise SystemExit(f"coordinator: --tensorboard {logdir}: {e}") from e


def _serve_metrics(telemetry: CoordinatorTelemetry, where: MetricsEndpoint) -> None:
    try:
        port = telemetry.serve(where)
    except OSError as e:
        raise SystemExit(
            f"coordinator: cannot serve metrics on {where.host}:{where.port}: {e}"
        ) from e
    line = announce(where, port)
    log.info("%s", line)
    print(line, flush=True)


def run_coordinator(
    cfg: pb.RunConfig,
    listen: str,
    out_dir: Path,
    token_file: str | None,
    state_dir: Path | None,
    tls: TlsFiles | None,
    wire_iface: str | None = None,
    advertise_allow: tuple = (),
    metrics: MetricsEndpoint | None = None,
    tensorboard: Path | None = None,
    liveness_listen: str | None = None,
) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    wire = WireMeter(detect_interfaces(wire_iface, on_loopback=is_loopback_listen(listen)))
    wire_by_round: dict[int, dict[str, int]] = {}
    try:
        token = load_token(token_file)
    except CredentialError as e:
        raise SystemExit(f"coordinator: {e}") from e
    if token is None:
        token = new_token_file(out_dir / "join-token")
        log.warning(
            "no --token-file or FEDMOE_TOKEN: generated %s for this run", out_dir / "join-token"
        )

    checkpoint = CoordinatorCheckpoint(state_dir) if state_dir else None
    resuming = checkpoint is not None and checkpoint.exists()
    if resuming:
        assert checkpoint is not None
        saved = checkpoint.load_config()
        if saved.run_id != cfg.run_id:
            log.warning(
                "resuming run %s from %s; its saved configuration wins", saved.run_id, state_dir
            )
        cfg = saved
    results: RunResults | None = None
    telemetry = CoordinatorTelemetry() if metrics is not None else None
    board = _open_board(tensorboard) if tensorboard is not None else None

    def write_round(round_: int, records: list) -> None:
        assert results is not None  # created below, before the server accepts a report
        lap = wire.lap()
        if lap is not None:
            wire_by_round[round_] = {"received": lap[0], "sent": lap[1]}
        results.write_round(round_, records)
        # After metrics.jsonl: the live views show only what the run directory holds.
        if telemetry is not None:
            telemetry.round_written(round_, records)
        if board is not None:
            board.write_round(round_, records)

    book = RoundBook(cfg, make_strategy(cfg), write_round, checkpoint)
    book.advertise_allow = advertise_allow
    if resuming:
        assert checkpoint is not None
        checkpoint.restore(book)
        if book.finished and (out_dir / "summary.json").exists():
            # A restart after the end (a supervisor's, a redeployed stack): the results are
            # final; serving again would only overwrite summary.json with this process's view.
            print(
                f"run {cfg.run_id} in {state_dir} is already complete; results in {out_dir}",
                flush=True,
            )
            return 0
    results = RunResults(out_dir, cfg, resume_after=book.reported_round if resuming else None)
    if resuming:
        print(
            f"resumed run {cfg.run_id}: rounds 1..{book.reported_round} written, "
            f"round {book.open_round} open with {len(book.updates)} upload(s) saved",
            flush=True,
        )
    elif checkpoint is not None:
        checkpoint.save_state(book)

    counter = ByteCounter()
    # Honest peers hold at most ~3 calls each (result wait, heartbeat, report); calls beyond the
    # pool are refused (RESOURCE_EXHAUSTED) instead of queueing behind held threads.
    workers = max(16, 4 * cfg.peers + 8)
    # Every Coordinator call's messages are counted in one place, under the round they name.
    counting = CountingServerInterceptor("fedmoe.v1.Coordinator", "coordinator", lambda _: counter)
    # Outermost first: refusals are seen as the caller sees them (the gate's included).
    interceptors: list[grpc.ServerInterceptor] = [TokenGate(token), counting]
    if telemetry is not None:
        watched = ("fedmoe.v1.Coordinator", *REFLECTION_SERVICES)
        interceptors.insert(0, RefusalInterceptor(watched, telemetry.refused))
        telemetry.watch_own_bytes(counter.totals)
    kind = server_kind()
    try:
        serving: ThreadServing | AioServing = (ThreadServing if kind == "threads" else AioServing)(
            book, token, listen, tls, interceptors, workers
        )
    except RuntimeError as e:
        raise SystemExit(f"coordinator: cannot listen on {listen}: {e}") from e
    port = serving.port
    log.info("serving on a %s gRPC server", kind)
    liveness: LivenessProcess | None = None
    if liveness_listen:
        try:
            liveness = LivenessProcess(
                book, counter, serving.told_finished, liveness_listen, tls, workers
            )
        except RuntimeError as e:
            serving.stop(grace=0)
            raise SystemExit(f"coordinator: cannot listen on {liveness_listen}: {e}") from e
        log.info(
            "heartbeats served by a process of their own (pid %d) on port %d",
            liveness.proc.pid,
            liveness.port,
        )
        if tls is None and not is_loopback_listen(liveness_listen):
            log.warning("liveness port %s without TLS: not encrypted (use --tls)", liveness_listen)
    if tls is None and not is_loopback_listen(listen):
        log.warning("listening on %s without TLS: traffic is not encrypted (use --tls)", listen)
    if telemetry is not None:
        assert metrics is not None
        telemetry.tick(book.open_round, book.reported_round, len(book.alive()))
        _serve_metrics(telemetry, metrics)
    host = listen.rsplit(":", 1)[0]
    if liveness is not None and liveness_listen:
        print(f"FEDMOE_LIVENESS {liveness_listen.rsplit(':', 1)[0]}:{liveness.port}", flush=True)
    # The launcher reads this line to learn the port when --listen asked for port 0.
    print(f"FEDMOE_LISTENING {host}:{port}", flush=True)
    serving.serving()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    kill_round = faults.armed("kill_after_round")
    while not book.finished and book.failure is None:
        if stop.wait(TICK_SECONDS):
            book.fail("stopped by a signal")
            break
        book.tick()
        if telemetry is not None:
            telemetry.tick(book.open_round, book.reported_round, len(book.alive()))
        if kill_round is not None and book.reported_round >= kill_round:
            faults.kill_now(f"coordinator after round {book.reported_round} (checkpointed)")
    if book.finished:
        # Peers that sat out the last round learn that the run is over from a heartbeat reply:
        # keep answering until every live one has heard it (bounded by three heartbeats).
        if liveness is not None:
            liveness.flush()  # the liveness process tells the run's end from now on
        final = set(book.reported(cfg.rounds))
        waiting = lambda: set(book.alive()) - final - serving.told_finished  # noqa: E731
        linger_until = time.monotonic() + 3 * heartbeat_ms(cfg) / 1000
        while waiting() and time.monotonic() < linger_until and not stop.wait(TICK_SECONDS / 5):
            pass
    # Let held final acks reach their peers before the server goes away.
    serving.stop(grace=10)
    if liveness is not None:
        liveness.stop()  # after the linger: it may be the one telling peers the run is over
    if telemetry is not None:
        telemetry.close()
    if board is not None:
        board.close()
    totals = counter.totals()
    if not book.failure and not any(r["round"] == cfg.rounds for r in results.records):
        # Every round was written, but the last with no report: every peer was left out (silent
        # past --peer-timeout, e.g. on a machine too loaded to load its data in time).
        book.failure = f"no peer reported the last round ({cfg.rounds}); see events"
    summary = results.write_summary(
        {
            "status": "failed" if book.failure else "completed",
            "failure": book.failure,
            "embedding_version": book.embedding_version,
            "membership": book.membership_summary(),
            "dropped_peers": book.dropped_peers(),
            "events": list(book.events),
            "events_dropped": book.events_dropped,
            "round_timings": book.round_timings,
            "wire_bytes": wire_summary(wire, wire_by_round, results.records),
            "coordinator_view": {
                "bytes_sent": totals["coordinator_sent"],
                "bytes_received": totals["coordinator_received"],
                "tensor_groups_received": sorted(book.tensors_received),
                "note": "since this coordinator process started" if resuming else "whole run",
            },
        }
    )
    if book.failure:
        log.error("run failed: %s", book.failure)
        return 1
    print(
        f"run complete: final accuracy {summary['final_accuracy_mean']:.4f} "
        f"(global {summary['final_global_accuracy_mean']:.4f}), results in {out_dir}",
        flush=True,
    )
    return 0
