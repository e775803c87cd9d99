"""gRPC server reflection, answered only to callers that present the run's join token.

Reflection lists the services and sends their descriptors, so that grpcurl-like tools can call
a server without the .proto file. It tells a caller nothing a peer does not already know, but
it is run state all the same, so it sits behind the same secret as joining the run: the join
token in the `x-fedmoe-token` metadata (common/auth.py). `TokenGate` refuses a reflection call
without it, UNAUTHENTICATED, before the request stream is read. The health service (container
health checks) stays open; the fedmoe services keep their own checks (session, ticket).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection

from fedmoe.common.auth import TOKEN_METADATA

# grpcio-reflection serves v1alpha; v1 is gated too, should a later version add it.
REFLECTION_SERVICES = (reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection")
DENIED = "server reflection needs the run's join token in the x-fedmoe-token metadata"


def enable_reflection(server: grpc.Server, services: Iterable[str]) -> None:
    """Serve reflection for `services` (full names, e.g. fedmoe.v1.Coordinator) on `server`."""
    reflection.enable_server_reflection((*services, reflection.SERVICE_NAME), server)


def _deny(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)
    yield  # unreachable: abort raises; the yield makes this a response stream


_DENY = grpc.stream_stream_rpc_method_handler(_deny)


class TokenGate(grpc.ServerInterceptor):
    """Lets a reflection call through only with the join token in its metadata; every other
    method passes untouched."""

    def __init__(self, token: str, services: Iterable[str] = REFLECTION_SERVICES) -> None:
        self._token = token.encode()
        self.prefixes = tuple(f"/{s}/" for s in services)

    def _presented(self, metadata: Iterable[Any] | None) -> bool:
        for key, value in metadata or ():
            if key == TOKEN_METADATA:
                given = value if isinstance(value, bytes) else str(value).encode()
                return hmac.compare_digest(given, self._token)
        return False

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        if str(details.method).startswith(self.prefixes) and not self._presented(
            details.invocation_metadata
        ):
            return _DENY
        return continuation(details)
