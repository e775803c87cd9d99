"""The coordinator's grpc.aio server, on an event loop in a thread of its own; the main thread
keeps the round book's clock (tick) and the signals, as with the thread-pool server.

`FEDMOE_COORDINATOR_SERVER=threads` selects the thread-pool server instead (coordinator/main.py),
kept for A/B measurements (bench/scale.py) and as a fallback."""

from __future__ import annotations

import asyncio
import sys
import threading
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
# not held for 5 ms at each turn.
SWITCH_INTERVAL_SECONDS = 0.001
SERVING = health_pb2.HealthCheckResponse.SERVING


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

    def stop(self, grace: float) -> None:
        """Health says NOT_SERVING; calls in progress get `grace` seconds; then the loop ends."""
        self._loop.run(self.health.enter_graceful_shutdown())
        self._loop.run(self.server.stop(grace))
        self._loop.close()
        self.service.close()
