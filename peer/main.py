"""`fedmoe peer`: join the run, serve experts to other peers, train, exit 0 when the run is over."""

from __future__ import annotations

import logging
from concurrent import futures
from pathlib import Path

import grpc
import torch

from common.accounting import ByteCounter
from common.auth import CredentialError, load_token
from common.config import is_sync_round
from common.data import DataError, load_peer_data
from common.grpc_options import SERVER_OPTIONS
from common.netaddr import is_loopback_listen, split_host_port
from common.tls import TlsFiles, add_port
from common.wire_counters import WireMeter
from common.wire_counters import detect as detect_interfaces
from peer.checkpoint import PeerCheckpoint
from peer.coordinator_client import CoordinatorClient
from peer.expert_client import ExpertClient
from peer.expert_service import ExpertExchangeService, add_expert_exchange
from peer.expert_store import ExpertStore
from peer.runner import PeerRunner
from peer.trainer import LocalTrainer, build_model

log = logging.getLogger("fedmoe.peer")

WILDCARDS = {"0.0.0.0", "::", ""}


def check_device(device: str) -> str:
    """Fail at start, with a clear message, when the asked device is not there."""
    if device == "cpu":
        return device
    if not device.startswith("cuda:") or not device[5:].isdigit():
        raise SystemExit(f"peer: --device must be cpu or cuda:N, not {device!r}")
    index = int(device[5:])
    if not torch.cuda.is_available():
        raise SystemExit(f"peer: --device {device} asked, but no CUDA GPU is available here")
    if index >= torch.cuda.device_count():
        raise SystemExit(
            f"peer: --device {device} asked, but only {torch.cuda.device_count()} GPU(s) exist"
        )
    return device


def run_peer(
    coordinator: str,
    listen: str,
    advertise: str | None,
    index: int,
    device: str,
    data_dir: str | None,
    timeout: float,
    threads: int | None,
    token_file: str | None = None,
    state_dir: Path | None = None,
    tls: TlsFiles | None = None,
    wire_iface: str | None = None,
) -> int:
    device = check_device(device)
    # Started first: the join and the connection set-up belong to round 1's wire bytes.
    wire = WireMeter(detect_interfaces(wire_iface, on_loopback=is_loopback_listen(coordinator)))
    try:
        token = load_token(token_file)
    except CredentialError as e:
        raise SystemExit(f"peer: {e}") from e
    if token is None:
        raise SystemExit("peer: a join token is required: --token-file FILE or FEDMOE_TOKEN")
    if threads:
        torch.set_num_threads(threads)
    host, _ = split_host_port(listen)
    if advertise is None and host in WILDCARDS:
        raise SystemExit("peer: --advertise HOST:PORT is required when listening on all interfaces")
    if tls is None and not is_loopback_listen(listen):
        log.warning(
            "serving experts on %s without TLS: traffic is not encrypted (use --tls)", listen
        )

    counter = ByteCounter()
    store = ExpertStore(wait_timeout=timeout)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=SERVER_OPTIONS)
    coord = CoordinatorClient(coordinator, counter, chunk_bytes=1 << 20, timeout=timeout, tls=tls)
    add_expert_exchange(server, ExpertExchangeService(store, counter))
    try:
        port = add_port(server, listen, tls)
    except RuntimeError as e:
        raise SystemExit(f"peer: cannot listen on {listen}: {e}") from e
    advertise = advertise or f"{host}:{port}"
    server.start()
    try:
        try:
            reply = coord.join(index, advertise, token, connect_timeout=timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise SystemExit(
                    f"peer {index}: DEADLINE_EXCEEDED: could not reach the coordinator at "
                    f"{coordinator} within {timeout:.0f} s. Check the address and port, that it "
                    "runs, firewalls, and with --tls that both sides use certificates of the "
                    "same CA whose names match the address"
                ) from e
            raise
        cfg = reply.config
        coord.chunk_bytes = cfg.chunk_bytes
        store.has_experts = lambda r: is_sync_round(cfg, r)
        log.info(
            "joined as %s, run %s, round %d, serving experts at %s",
            reply.peer_id,
            cfg.run_id,
            reply.start_round,
            advertise,
        )
        data = load_peer_data(
            cfg.dataset, data_dir or cfg.data_dir or None, cfg.peers, index, cfg.alpha, cfg.seed
        )
        trainer = LocalTrainer(build_model(cfg, data), data, cfg, device, index)
        runner = PeerRunner(
            cfg,
            reply.peer_id,
            trainer,
            coord,
            ExpertClient(counter, timeout, tls=tls),
            store,
            counter,
            serve_timeout=timeout,
            checkpoint=PeerCheckpoint(state_dir, index) if state_dir else None,
            heartbeat_seconds=max(0.2, reply.heartbeat_ms / 1000),
            wire=wire,
        )
        runner.run(reply.start_round)
    except grpc.RpcError as e:
        raise SystemExit(f"peer {index}: {e.code().name}: {e.details()}") from e
    except DataError as e:
        raise SystemExit(f"peer {index}: {e}") from e
    finally:
        server.stop(grace=2).wait()
        coord.close()
    log.info("run finished")
    return 0
