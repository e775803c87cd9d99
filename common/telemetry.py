"""Live metrics of a coordinator or a peer-host process, in the Prometheus text format.

`--metrics-port PORT` (coordinator, peer, local) serves them at http://HOST:PORT/metrics. The
coordinator and the peers tell this module what happened through a few plain methods
(`CoordinatorTelemetry`, `PeerTelemetry`); nothing else imports prometheus_client.

Every metric is named `fedmoe_*`. Label values are bounded: peers are the hosted (or reported)
"peer-K" ids and refusal reasons the names of common/refusal.Reason, never a string taken from
a request. The endpoint is served by one thread, one connection at a time, each with a socket
timeout, on 127.0.0.1 unless `--metrics-listen` says otherwise: it reveals run state without
authentication, so a listener beyond loopback must be asked for.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from fedmoe.common.accounting import CLASSES, DIRECTIONS
from fedmoe.common.grpc_status import STATUS

log = logging.getLogger("fedmoe.telemetry")

# The line a process prints (and logs) once its endpoint listens; port 0 asks for any port.
METRICS_LINE = "FEDMOE_METRICS "
# A scrape that stalls for this long is dropped, so that it cannot hold the one serving thread.
CONNECTION_TIMEOUT = 5.0
# A status code a service answered with -> the refusal reason it stands for (one to one).
REASON_OF_CODE: dict[grpc.StatusCode, str] = {
    code: reason.name.lower() for reason, code in STATUS.items()
}
ROUND_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
FETCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True)
class MetricsEndpoint:
    """Where to serve: HOST (default loopback) and PORT (0: any free port)."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"metrics port must be in 0..65535, not {self.port}")
        if not self.host or len(self.host) > 255 or any(c.isspace() for c in self.host):
            raise ValueError(f"bad metrics listen host {self.host!r}")

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def announce(where: MetricsEndpoint, port: int) -> str:
    """The line that says where the endpoint listens (launchers and tests look for it)."""
    host = f"[{where.host}]" if ":" in where.host else where.host
    return f"{METRICS_LINE}http://{host}:{port}/metrics"


class _QuietHandler(WSGIRequestHandler):
    timeout = CONNECTION_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
        pass


class _Server(WSGIServer):
    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN (a DNS lookup that can hang); the
        # WSGI environ only needs the name we were given.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Endpoint:
    """A registry and, once `serve` is called, the HTTP endpoint that exposes it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._httpd: _Server | None = None

    def serve(self, where: MetricsEndpoint) -> int:
        """Start serving; returns the port. OSError (port taken, bad host) is the caller's."""
        server_class = _Server6 if ":" in where.host else _Server
        httpd = make_server(
            where.host,
            where.port,
            make_wsgi_app(self.registry),
            server_class=server_class,
            handler_class=_QuietHandler,
        )
        assert isinstance(httpd, _Server)
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
        port = int(httpd.server_address[1])
        if not where.loopback:
            log.warning(
                "metrics served on %s:%d to anyone who can reach it (no authentication)",
                where.host,
                port,
            )
        return port

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


class _BytesCollector(Collector):
    """Bytes read from live byte counters at scrape time (nothing is copied), labelled
    `labels` (e.g. peer) then class and direction."""

    def __init__(
        self, name: str, doc: str, labels: tuple[str, ...], classes: tuple[str, ...] = CLASSES
    ) -> None:
        self.name = name
        self.classes = classes
        self.doc = doc
        self.labels = labels
        self._lock = threading.Lock()
        self._sources: dict[tuple[str, ...], Callable[[], Mapping[str, int]]] = {}

    def add(self, label_values: tuple[str, ...], totals: Callable[[], Mapping[str, int]]) -> None:
        with self._lock:
            self._sources[label_values] = totals

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            self.name, self.doc, labels=[*self.labels, "class", "direction"]
        )
        with self._lock:
            sources = list(self._sources.items())
        for values, totals in sources:
            counts = totals()
            for klass in self.classes:
                for direction in DIRECTIONS:
                    family.add_metric(
                        [*values, klass, direction], counts.get(f"{klass}_{direction}", 0)
                    )
        yield family


BYTES_DOC = "application bytes (serialized gRPC messages) by traffic class and direction"


class CoordinatorTelemetry(_Endpoint):
    """The coordinator's metrics. Bytes by class are the peers' reports of written rounds (what
    metrics.jsonl holds); the coordinator's own live count is fedmoe_coordinator_bytes_total."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.round = Gauge(
            "fedmoe_round",
            "round number: open (accepting uploads) and reported (metrics written)",
            ["state"],
            registry=r,
        )
        self.peers_alive = Gauge("fedmoe_peers_alive", "members heard from lately", registry=r)
        self.bytes = Counter(
            "fedmoe_bytes",
            f"{BYTES_DOC}, as the peers reported them",
            ["class", "direction"],
            registry=r,
        )
        self.own_bytes = _BytesCollector(
            "fedmoe_coordinator_bytes",
            "bytes of Coordinator calls counted by the coordinator's server, live",
            (),
            ("coordinator",),  # no expert byte ever passes the coordinator
        )
        r.register(self.own_bytes)
        self.accuracy = Gauge(
            "fedmoe_accuracy", "personal test accuracy, last round reported", ["peer"], registry=r
        )
        self.global_accuracy = Gauge(
            "fedmoe_global_accuracy",
            "global test accuracy, last round reported",
            ["peer"],
            registry=r,
        )
        self.round_seconds = Histogram(
            "fedmoe_round_seconds",
            "slowest peer's round, per written round",
            registry=r,
            buckets=ROUND_BUCKETS,
        )
        self.refusals = Counter(
            "fedmoe_refusals",
            "calls refused, by reason (common/refusal.py)",
            ["reason"],
            registry=r,
        )

    def watch_own_bytes(self, totals: Callable[[], Mapping[str, int]]) -> None:
        self.own_bytes.add((), totals)

    def tick(self, open_round: int, reported_round: int, alive: int) -> None:
        self.round.labels(state="open").set(open_round)
        self.round.labels(state="reported").set(reported_round)
        self.peers_alive.set(alive)

    def round_written(self, round_: int, records: Iterable[Mapping[str, Any]]) -> None:
        """A round's records are in metrics.jsonl: add their bytes, set accuracies."""
        slowest = 0.0
        for rec in records:
            for klass in CLASSES:
                for direction in DIRECTIONS:
                    n = int(rec["bytes"][f"{klass}_{direction}"])
                    self.bytes.labels(klass, direction).inc(n)
            self.accuracy.labels(rec["peer"]).set(rec["accuracy"])
            self.global_accuracy.labels(rec["peer"]).set(rec["global_accuracy"])
            slowest = max(slowest, float(rec["seconds"]))
        self.round.labels(state="reported").set(round_)
        self.round_seconds.observe(slowest)

    def refused(self, reason: str, request: Any) -> None:
        self.refusals.labels(reason).inc()


class PeerEvents:
    """What a peer's round loop tells about itself; this base does nothing (no --metrics-port)."""

    def fetched(self, peer_id: str, seconds: float) -> None:
        """One source's experts arrived, `seconds` after the fetch began (retries included)."""

    def round_reported(
        self, peer_id: str, round_: int, accuracy: float, global_accuracy: float, seconds: float
    ) -> None:
        """The peer sent its report of `round_`."""


class PeerTelemetry(_Endpoint, PeerEvents):
    """The metrics of a peer-host process: every series is labelled peer="peer-K"."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self._peers: set[str] = set()
        self._lock = threading.Lock()
        self.round = Gauge(
            "fedmoe_round", "last round this peer reported", ["peer", "state"], registry=r
        )
        self.bytes = _BytesCollector(
            "fedmoe_bytes",
            f"{BYTES_DOC}, counted by this peer, live",
            ("peer",),
        )
        r.register(self.bytes)
        self.accuracy = Gauge(
            "fedmoe_accuracy", "personal test accuracy, last round", ["peer"], registry=r
        )
        self.global_accuracy = Gauge(
            "fedmoe_global_accuracy", "global test accuracy, last round", ["peer"], registry=r
        )
        self.round_seconds = Histogram(
            "fedmoe_round_seconds",
            "this peer's round, wall seconds",
            ["peer"],
            registry=r,
            buckets=ROUND_BUCKETS,
        )
        self.fetch_seconds = Histogram(
            "fedmoe_expert_fetch_seconds",
            "fetching one source's planned experts (with retries)",
            ["peer"],
            registry=r,
            buckets=FETCH_BUCKETS,
        )
        self.refusals = Counter(
            "fedmoe_refusals",
            "expert requests refused, by reason (common/refusal.py)",
            ["peer", "reason"],
            registry=r,
        )

    def add_peer(self, peer_id: str, totals: Callable[[], Mapping[str, int]]) -> None:
        """A hosted peer joined: its byte counter is read at every scrape."""
        with self._lock:
            self._peers.add(peer_id)
        self.bytes.add((peer_id,), totals)

    def fetched(self, peer_id: str, seconds: float) -> None:
        self.fetch_seconds.labels(peer_id).observe(seconds)

    def round_reported(
        self, peer_id: str, round_: int, accuracy: float, global_accuracy: float, seconds: float
    ) -> None:
        self.round.labels(peer_id, "reported").set(round_)
        self.accuracy.labels(peer_id).set(accuracy)
        self.global_accuracy.labels(peer_id).set(global_accuracy)
        self.round_seconds.labels(peer_id).observe(seconds)

    def refused(self, reason: str, request: Any) -> None:
        # The label is a hosted peer's id or "other": never a string a caller chose.
        source = str(getattr(request, "source_id", "") or "")
        with self._lock:
            peer = source if source in self._peers else "other"
        self.refusals.labels(peer, reason).inc()


# ---------------------------------------------------------------- refusals, seen in the server


class RefusalInterceptor(grpc.ServerInterceptor):
    """Tells `on_refusal(reason, request)` about every call of the given services that ends with
    a refusal's status code (common/grpc_status.py). It only looks at the code the handler set:
    the services stay as they are. Calls gRPC itself turns away before any handler runs (over
    `maximum_concurrent_rpcs`) never reach it."""

    def __init__(self, services: Iterable[str], on_refusal: Callable[[str, Any], None]) -> None:
        self.prefixes = tuple(f"/{s}/" for s in services)
        self.on_refusal = on_refusal

    def _note(self, context: grpc.ServicerContext, request: Any) -> None:
        code = context.code()  # type: ignore[attr-defined]  # set by abort() or set_code()
        reason = REASON_OF_CODE.get(code) if code is not None else None
        if reason is not None:
            self.on_refusal(reason, request)

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or not str(details.method).startswith(self.prefixes):
            return handler
        kinds = (
            ("unary_unary", grpc.unary_unary_rpc_method_handler, False, False),
            ("unary_stream", grpc.unary_stream_rpc_method_handler, False, True),
            ("stream_unary", grpc.stream_unary_rpc_method_handler, True, False),
            ("stream_stream", grpc.stream_stream_rpc_method_handler, True, True),
        )
        for attr, make, streaming_in, streaming_out in kinds:
            behavior = getattr(handler, attr)
            if behavior is not None:
                wrap = self._stream if streaming_out else self._unary
                return make(
                    wrap(behavior, streaming_in),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler

    def _unary(self, behavior: Callable[..., Any], streaming_in: bool) -> Callable[..., Any]:
        def watched(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return behavior(request, context)
            finally:
                self._note(context, None if streaming_in else request)

        return watched

    def _stream(self, behavior: Callable[..., Any], streaming_in: bool) -> Callable[..., Any]:
        def watched(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from behavior(request, context)
            finally:
                self._note(context, None if streaming_in else request)

        return watched
