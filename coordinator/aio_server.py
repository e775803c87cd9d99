"""The coordinator's grpc.aio server, on an event loop in a thread of its own; the main thread
keeps the round book's clock (tick) and the signals, as with the thread-pool server.

`FEDMOE_COORDINATOR_SERVER=threads` selects the thread-pool server instead (coordinator/main.py),
kept for A/B measurements (bench/scale.py) and as a fallback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Coroutine, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedmoe.common.aio_interceptors import aio_interceptors
from fedmoe.common.grpc_options import SERVER_OPTIONS
from fedmoe.common.proto import rpc
from fedmoe.common.reflection import enable_reflection
from fedmoe.common.tls import TlsFiles, add_port
from fedmoe.coordinator.aio_service import AioCoordinatorService
from fedmoe.coordinator.rounds import RoundBook


# The loop shares the GIL with the book threads (a round's aggregate, uploads' decoding): they
# hand it over within 1 ms rather than CPython's default 5, so that a heartbeat on the loop is
# not held for 5 ms at each turn. FEDMOE_SWITCH_INTERVAL overrides it (seconds), for A/B runs.
def _switch_interval(default: float = 0.001) -> float:
    raw = os.environ.get("FEDMOE_SWITCH_INTERVAL", "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1.0
    if not 1e-5 <= value <= 0.1:
        raise SystemExit("FEDMOE_SWITCH_INTERVAL must be seconds in [0.00001, 0.1]")
    return value


SWITCH_INTERVAL_SECONDS = _switch_interval()
SERVING = health_pb2.HealthCheckResponse.SERVING
# The loop's lag is sampled this often (how late a timer fires: how long a call that arrives
# now waits for the loop's next turn); the last LAG_SAMPLES are kept, logged at the end.
LAG_PROBE_SECONDS = 0.01
LAG_SAMPLES = 1 << 16
log = logging.getLogger("fedmoe.coordinator")


class LagProbe:
    """Samples the event loop's lag; `summary()` is what the coordinator logs at its end (and
    bench/scale.py reads from its log: the server's side of a heartbeat's latency)."""

    def __init__(self) -> None:
        self.lags: deque[float] = deque(maxlen=LAG_SAMPLES)

    async def run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(LAG_PROBE_SECONDS)
            self.lags.append(max(0.0, time.perf_counter() - started - LAG_PROBE_SECONDS))

    def summary(self) -> str:
        lags = sorted(self.lags)
        if not lags:
            return "event loop lag: no samples"
        pick = lambda q: 1000 * lags[min(len(lags) - 1, int(q * len(lags)))]  # noqa: E731
        return (
            f"event loop lag ms: p50 {pick(0.5):.1f} p99 {pick(0.99):.1f} "
            f"max {1000 * lags[-1]:.1f} ({len(lags)} samples)"
        )


class _LoopThread:
    """An asyncio event loop running in its own thread; `run` a coroutine on it and wait."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-aio", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class AioServing:
    """The Coordinator, health and (gated) reflection services on a grpc.aio server."""

    def __init__(
        self,
        book: RoundBook,
        token: str,
        listen: str,
        tls: TlsFiles | None,
        interceptors: Sequence[grpc.ServerInterceptor],
        most_calls: int,
    ) -> None:
        self.service = AioCoordinatorService(book, token, tls=tls is not None)
        self.told_finished = self.service.told_finished
        self.health = health.aio.HealthServicer()
        self.probe = LagProbe()
        sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
        self._loop = _LoopThread()

        async def start() -> tuple[grpc.aio.Server, int]:
            server = grpc.aio.server(
                options=SERVER_OPTIONS,
                maximum_concurrent_rpcs=most_calls,
                interceptors=aio_interceptors(interceptors),
            )
            self.service.attach(asyncio.get_running_loop())
            rpc.add_CoordinatorServicer_to_server(self.service, server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            enable_reflection(server, ("fedmoe.v1.Coordinator", health.SERVICE_NAME))
            port = add_port(server, listen, tls)  # RuntimeError when it cannot listen
            await server.start()
            self._probing = asyncio.ensure_future(self.probe.run())
            return server, port

        try:
            self.server, self.port = self._loop.run(start())
        except BaseException:
            self._loop.close()
            self.service.close()
            raise

    def serving(self) -> None:
        self._loop.run(self.health.set("", SERVING))
        self._loop.run(self.health.set("fedmoe.v1.Coordinator", SERVING))

    async def _stop_probe(self) -> None:
        self._probing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._probing

    def stop(self, grace: float) -> None:
        """Health says NOT_SERVING; calls in progress get `grace` seconds; then the loop ends."""
        log.info("%s", self.probe.summary())
        self._loop.run(self.health.enter_graceful_shutdown())
        self._loop.run(self.server.stop(grace))
        self._loop.run(self._stop_probe())
        self._loop.close()
        self.service.close()
