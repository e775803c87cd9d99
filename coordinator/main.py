"""`fedmoe coordinator`: serve the run, write the run directory, exit when the last round is in."""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.accounting import ByteCounter
from common.grpc_options import SERVER_OPTIONS
from common.netaddr import is_loopback_listen
from common.proto import pb, rpc
from coordinator.results import RunResults
from coordinator.rounds import RoundBook
from coordinator.service import CoordinatorService
from coordinator.strategies import make_strategy

log = logging.getLogger("fedmoe.coordinator")


def run_coordinator(cfg: pb.RunConfig, listen: str, out_dir: Path, round_timeout: float) -> int:
    results = RunResults(out_dir, cfg)
    book = RoundBook(cfg, make_strategy(cfg), results.write_round, round_timeout)
    counter = ByteCounter()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max(16, 4 * cfg.peers)), options=SERVER_OPTIONS
    )
    rpc.add_CoordinatorServicer_to_server(CoordinatorService(book, counter), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as e:
        raise SystemExit(f"coordinator: cannot listen on {listen}: {e}") from e
    if not is_loopback_listen(listen):
        log.warning("listening on %s without TLS: traffic is not encrypted", listen)
    server.start()
    host = listen.rsplit(":", 1)[0]
    # The launcher reads this line to learn the port when --listen asked for port 0.
    print(f"FEDMOE_LISTENING {host}:{port}", flush=True)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("fedmoe.v1.Coordinator", health_pb2.HealthCheckResponse.SERVING)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    failure = None
    while not book.finished:
        if stop.wait(0.5):
            failure = "stopped by a signal"
        elif time.monotonic() - book.last_progress > round_timeout:
            failure = f"no progress for {round_timeout:.0f} s (a peer died or never joined?)"
        if failure:
            book.fail(failure)
            break
    health_servicer.enter_graceful_shutdown()
    # Let held final acks reach their peers before the server goes away.
    server.stop(grace=10).wait()
    totals = counter.totals()
    summary = results.write_summary(
        {
            "status": "failed" if failure else "completed",
            "failure": failure,
            "embedding_version": book.embedding_version,
            "coordinator_view": {
                "bytes_sent": totals["coordinator_sent"],
                "bytes_received": totals["coordinator_received"],
                "tensor_groups_received": sorted(book.tensors_received),
            },
        }
    )
    if failure:
        log.error("run failed: %s", failure)
        return 1
    print(
        f"run complete: final accuracy {summary['final_accuracy_mean']:.4f} "
        f"(global {summary['final_global_accuracy_mean']:.4f}), results in {out_dir}",
        flush=True,
    )
    return 0
