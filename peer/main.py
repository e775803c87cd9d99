"""`fedmoe peer`: join the run, serve experts to other peers, train, exit 0 when the run is over.

One process may host several peers (`--index 0-24`, issue "Scale: 100 peers on one machine").
Each hosted peer is a full member: its own join, session and member secret, data partition,
model and optimizer, expert store, byte counter, round loop with its own heartbeats, and
checkpoint. They share the process's torch runtime and device (training and evaluation take
turns, see peer/trainer.py), the dataset as read from disk (each keeps only its own rows), and
one gRPC server whose ExpertExchange routes each request to the peer it names (source_id).
Fetches between two peers of one process still go through gRPC on loopback, counted per peer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
import torch

from fedmoe.common.accounting import ByteCounter
from fedmoe.common.auth import CredentialError, load_token
from fedmoe.common.config import is_sync_round
from fedmoe.common.data import DataError, clear_dataset_cache, load_peer_data
from fedmoe.common.grpc_options import SERVER_OPTIONS
from fedmoe.common.netaddr import is_loopback_listen, split_host_port
from fedmoe.common.plugins import PluginError, load_plugin
from fedmoe.common.proto import pb
from fedmoe.common.reflection import REFLECTION_SERVICES, TokenGate, enable_reflection
from fedmoe.common.telemetry import (
    MetricsEndpoint,
    PeerEvents,
    PeerTelemetry,
    RefusalInterceptor,
    announce,
)
from fedmoe.common.tls import TlsFiles, add_port
from fedmoe.common.wire_counters import WireMeter
from fedmoe.common.wire_counters import detect as detect_interfaces
from fedmoe.peer.advertise import auto_advertise_port, own_address
from fedmoe.peer.checkpoint import AssignedIndex, MemberSecret, PeerCheckpoint
from fedmoe.peer.coordinator_client import CoordinatorClient
from fedmoe.peer.embedding_init import EmbeddingInitError
from fedmoe.peer.expert_client import ExpertClient
from fedmoe.peer.expert_service import ExpertExchangeService, expert_server
from fedmoe.peer.expert_store import ExpertStore
from fedmoe.peer.runner import BadAggregate, PeerRunner
from fedmoe.peer.trainer import COMPUTE_LOCK, LocalTrainer, build_model

log = logging.getLogger("fedmoe.peer")

WILDCARDS = {"0.0.0.0", "::", ""}
CUDA_AUTO = "cuda:auto"
# The expert server only ever receives ExpertRequest messages (ids, a ticket, expert numbers:
# well under 1 KiB). Refusing larger ones in gRPC itself makes a 4 MiB request cheap to refuse.
MAX_EXPERT_REQUEST_BYTES = 64 << 10
EXPERT_SERVER_OPTIONS = [
    (k, v) for k, v in SERVER_OPTIONS if k != "grpc.max_receive_message_length"
] + [("grpc.max_receive_message_length", MAX_EXPERT_REQUEST_BYTES)]
# Server threads per hosted peer: each holds a fetch while it waits for its plan or streams.
SERVER_THREADS_PER_PEER = 8


def device_for(device: str, index: int) -> str:
    """`cuda:auto`: peer K trains on GPU K mod the GPUs this process sees (replicas of one
    compose service all see the same GPUs and spread over them by their assigned index)."""
    if device != CUDA_AUTO:
        return device
    return f"cuda:{index % torch.cuda.device_count()}"


def check_device(device: str) -> str:
    """Fail at start, with a clear message, when the asked device is not there."""
    if device == "cpu":
        return device
    if device == CUDA_AUTO:  # a GPU by peer index, chosen once the index is known
        if not torch.cuda.is_available():
            raise SystemExit(f"peer: --device {device} asked, but no CUDA GPU is available here")
        return device
    if not device.startswith("cuda:") or not device[5:].isdigit():
        raise SystemExit(f"peer: --device must be cpu, cuda:N or cuda:auto, not {device!r}")
    index = int(device[5:])
    if not torch.cuda.is_available():
        raise SystemExit(f"peer: --device {device} asked, but no CUDA GPU is available here")
    if index >= torch.cuda.device_count():
        raise SystemExit(
            f"peer: --device {device} asked, but only {torch.cuda.device_count()} GPU(s) exist"
        )
    return device


class _DataGate:
    """Clears the per-process dataset cache once every hosted peer has its own rows."""

    def __init__(self, members: int) -> None:
        self._left = members
        self._lock = threading.Lock()

    def done(self) -> None:
        with self._lock:
            self._left -= 1
            if self._left == 0:
                clear_dataset_cache()


class _Host:
    """What the peers of one process share: the coordinator's address, the join token, the
    expert server and its advertised address, the device, and the command's settings."""

    def __init__(
        self,
        coordinator: str,
        advertise: str,
        token: str,
        service: ExpertExchangeService,
        members: int,
        device: str,
        data_dir: str | None,
        timeout: float,
        state_dir: Path | None,
        tls: Mapping[int, TlsFiles] | None,
        wire: WireMeter | None,
        telemetry: PeerTelemetry | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.telemetry = telemetry
        self.advertise = advertise
        self.token = token
        self.service = service
        self.multi = members > 1
        self.device = device
        self.data_dir = data_dir
        self.timeout = timeout
        self.state_dir = state_dir
        self.tls = tls
        self.wire = wire
        self.data = _DataGate(members)

    def run_member(self, index: int | None) -> None:
        """Join as peer `index` (None: as the index the coordinator assigns, `--index auto`) and
        take part until the run is over; SystemExit on failure."""
        tls = self.tls[index] if self.tls and index is not None else None
        counter = ByteCounter()
        store = ExpertStore(wait_timeout=self.timeout)
        coord = CoordinatorClient(
            self.coordinator, counter, chunk_bytes=1 << 20, timeout=self.timeout, tls=tls
        )
        experts = ExpertClient(counter, self.timeout, tls=tls)
        name = f"peer {index}" if index is not None else "peer (--index auto)"
        data_pending = True
        try:
            reply, index = self._join(coord, index)
            name = f"peer {index}"
            cfg = reply.config
            coord.chunk_bytes = cfg.chunk_bytes
            store.has_experts = lambda r: is_sync_round(cfg, r)
            store.max_experts = cfg.num_experts
            self.service.add_peer(reply.peer_id, store, counter)
            if self.telemetry is not None:
                self.telemetry.add_peer(reply.peer_id, counter.totals)
            # Hosted peers share one log file: each logs under its own name.
            plog = logging.getLogger(f"fedmoe.peer.{reply.peer_id}") if self.multi else log
            plog.info(
                "joined as %s, run %s, round %d, serving experts at %s",
                reply.peer_id,
                cfg.run_id,
                reply.start_round,
                self.advertise,
            )
            if cfg.model:  # a model plug-in this machine cannot import: say so before the data
                load_plugin(cfg.model, "--model")
            try:
                data = load_peer_data(
                    cfg.dataset,
                    self.data_dir or cfg.data_dir or None,
                    cfg.peers,
                    index,
                    cfg.alpha,
                    cfg.seed,
                    cache=self.multi,
                    val_fraction=cfg.val_fraction,
                )
            finally:
                data_pending = False
                self.data.done()
            # build_model seeds torch's global generator: one peer at a time, so that every
            # peer starts from the same initialisation.
            with COMPUTE_LOCK:
                device = device_for(self.device, index)
                trainer = LocalTrainer(build_model(cfg, data, index), data, cfg, device, index)
            plog.info(
                "model ready on %s: %d training samples, %d validation, %d personal test samples",
                device,
                trainer.num_samples,
                len(data.val) if data.val is not None else 0,
                len(data.local_test),
            )
            runner = PeerRunner(
                cfg,
                reply.peer_id,
                trainer,
                coord,
                experts,
                store,
                counter,
                serve_timeout=self.timeout,
                checkpoint=PeerCheckpoint(self.state_dir, index) if self.state_dir else None,
                heartbeat_seconds=max(0.2, reply.heartbeat_ms / 1000),
                wire=self.wire,
                index=index,
                logger=plog,
                events=self.telemetry or PeerEvents(),
            )
            runner.run(reply.start_round)
        except grpc.RpcError as e:
            raise SystemExit(f"{name}: {e.code().name}: {e.details()}") from e
        except (
            DataError,
            BadAggregate,
            PluginError,
            EmbeddingInitError,
        ) as e:  # PluginError: --model
            raise SystemExit(f"{name}: {e}") from e
        finally:
            if data_pending:
                self.data.done()
            coord.close()
            experts.close()

    def _join(self, coord: CoordinatorClient, index: int | None) -> tuple[pb.JoinReply, int]:
        """Join as `index`, or with None as the index the coordinator assigns; keeps what a
        restart needs (member secret; for an auto peer its index) in the --state-dir."""
        auto = index is None
        assigned = AssignedIndex(self.state_dir) if auto and self.state_dir else None
        held = assigned.load() if assigned is not None else None
        # An auto peer names the member it was (if any): the coordinator lets it rejoin as that
        # member only if the secret proves it, else it assigns a free index.
        ask = index if index is not None else (held or 0)
        secret = None
        if self.state_dir and (not auto or held is not None):
            secret = MemberSecret(self.state_dir, ask)
            coord.member_secret = secret.load()  # proves we are this index's member
        try:
            reply = coord.join(
                ask, self.advertise, self.token, connect_timeout=self.timeout, any_index=auto
            )
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise SystemExit(
                    f"peer {'(--index auto)' if auto else index}: DEADLINE_EXCEEDED: could not "
                    f"reach the coordinator at {self.coordinator} within {self.timeout:.0f} s. "
                    "Check the address and port, that it runs, firewalls, and with --tls that "
                    "both sides use certificates of the same CA whose names match the address"
                ) from e
            raise
        if index is None:
            index = assigned_index(reply.peer_id, reply.config.peers)
            if assigned is not None:
                if index != held:  # first, so that a crash before the secret is saved still
                    assigned.save(index)  # rejoins as this index (once it is silent)
                secret = MemberSecret(assigned.path.parent, index)
        if secret is not None and reply.member_secret:
            secret.save(reply.member_secret)
        return reply, index


def assigned_index(peer_id: str, peers: int) -> int:
    """K of the "peer-K" the coordinator assigned to an auto peer (checked: it is not trusted
    to send a well-formed one)."""
    digits = peer_id[5:] if peer_id.startswith("peer-") else ""
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 4) or int(digits) >= peers:
        raise SystemExit(
            f"peer (--index auto): the coordinator assigned {peer_id[:40]!r}, not peer-K with "
            f"K < {peers}"
        )
    return int(digits)


def run_peers(
    coordinator: str,
    listen: str,
    advertise: str | None,
    indices: Sequence[int],
    device: str,
    data_dir: str | None,
    timeout: float,
    threads: int | None,
    token_file: str | None = None,
    state_dir: Path | None = None,
    tls: Mapping[int, TlsFiles] | None = None,
    wire_iface: str | None = None,
    metrics: MetricsEndpoint | None = None,
    auto: bool = False,
) -> int:
    """Host the peers `indices` in this process; returns 0 once every one of them is done.

    With `auto` (`--index auto`, `indices` empty) this process is one peer whose index the
    coordinator assigns at its join."""
    if auto and indices:
        raise SystemExit("peer: --index auto hosts one peer whose index the coordinator assigns")
    if not indices and not auto:
        raise SystemExit("peer: no --index given")
    if auto and tls:  # fedmoe/cli.py resolves it: under mutual TLS the certificate is the index
        raise SystemExit("peer: --index auto with --tls: the certificate (peer-K) names the index")
    device = check_device(device)
    multi = len(indices) > 1
    # Started first: the join and the connection set-up belong to round 1's wire bytes. Kernel
    # counters are per interface, not per peer: with several peers in one process they cannot
    # be told apart, so they are not reported.
    wire = None
    if multi:
        if wire_iface not in (None, "off", "auto"):
            log.warning("--wire-iface ignored: hosted peers share this process's interfaces")
    else:
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
    advertise_port = auto_advertise_port(advertise) if advertise else None
    if advertise_port is not None:
        advertise = None  # resolved once the listening port is known
    elif advertise is None and host in WILDCARDS:
        raise SystemExit("peer: --advertise HOST:PORT is required when listening on all interfaces")
    if tls is None and not is_loopback_listen(listen):
        log.warning(
            "serving experts on %s without TLS: traffic is not encrypted (use --tls)", listen
        )

    workers = max(16, SERVER_THREADS_PER_PEER * len(indices))
    # Calls queue for a thread up to 4x the pool (honest fan-in: every requester of a sync round
    # at once), beyond that they are refused (RESOURCE_EXHAUSTED): a flood is bounded in memory,
    # and it cannot park the threads either (waits in the store end with the caller's deadline).
    service = ExpertExchangeService(hosted=len(indices))
    telemetry = PeerTelemetry() if metrics is not None else None
    # Outermost first: refusals are seen as the caller sees them (the gate's included).
    interceptors: list[grpc.ServerInterceptor] = [TokenGate(token)]
    if telemetry is not None:
        watched = ("fedmoe.v1.ExpertExchange", *REFLECTION_SERVICES)
        interceptors.insert(0, RefusalInterceptor(watched, telemetry.refused))
    server = expert_server(service, workers, EXPERT_SERVER_OPTIONS, 4 * workers, interceptors)
    enable_reflection(server, ("fedmoe.v1.ExpertExchange",))
    try:
        # One endpoint for all hosted peers; it presents each one's certificate to a client
        # that asks for it by name (SNI: the expert client does), the first one's otherwise.
        first = tls[indices[0]] if tls else None
        port = add_port(server, listen, first, [tls[k] for k in indices[1:]] if tls else ())
    except RuntimeError as e:
        raise SystemExit(f"peer: cannot listen on {listen}: {e}") from e
    if advertise_port is not None:  # --advertise auto[:PORT]
        advertise = own_address(coordinator, advertise_port or port)
        log.info("advertising %s (--advertise auto)", advertise)
    advertise = advertise or f"{host}:{port}"
    if telemetry is not None:
        assert metrics is not None
        _serve_metrics(telemetry, metrics)
    server.start()
    hosted = _Host(
        coordinator,
        advertise,
        token,
        service,
        len(indices),
        device,
        data_dir,
        timeout,
        state_dir,
        tls,
        wire,
        telemetry,
    )
    try:
        if auto:
            hosted.run_member(None)
        elif not multi:
            hosted.run_member(indices[0])  # in this thread: exactly the one-peer process
        else:
            log.info("hosting peers %s, serving experts at %s", _describe(indices), advertise)
            errors = _run_threads(hosted, indices)
            if errors:
                raise SystemExit("\n".join(errors))
    finally:
        server.stop(grace=2).wait()
        if telemetry is not None:
            telemetry.close()
    log.info("run finished")
    return 0


def _serve_metrics(telemetry: PeerTelemetry, where: MetricsEndpoint) -> None:
    try:
        port = telemetry.serve(where)
    except OSError as e:
        raise SystemExit(f"peer: cannot serve metrics on {where.host}:{where.port}: {e}") from e
    log.info("%s", announce(where, port))  # the launcher's peers log to a file: it is there


def _run_threads(hosted: _Host, indices: Sequence[int]) -> list[str]:
    """Run every hosted peer in its own thread; returns the failures, one line each."""
    errors: list[str] = []
    lock = threading.Lock()

    def member(index: int) -> None:
        try:
            hosted.run_member(index)
        except SystemExit as e:
            message = str(e.code)
        except Exception as e:  # one peer's bug must not take the others down
            log.exception("peer %d failed", index)
            message = f"peer {index}: {type(e).__name__}: {e}"
        else:
            return
        log.error("%s", message)
        with lock:
            errors.append(message)

    # Daemon threads: Ctrl-C (or SIGTERM's default action) ends the process with all its peers.
    workers = [
        threading.Thread(target=member, args=(k,), name=f"peer-{k}", daemon=True) for k in indices
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return sorted(errors)


def _describe(indices: Sequence[int]) -> str:
    """[0, 1, 2, 3, 8] -> "0-3,8" (the --index syntax)."""
    parts: list[str] = []
    ordered = sorted(indices)
    start = prev = ordered[0]
    for k in [*ordered[1:], None]:
        if k is not None and k == prev + 1:
            prev = k
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if k is not None:
            start = prev = k
    return ",".join(parts)
