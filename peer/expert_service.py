"""The ExpertExchange gRPC service: streams planned experts to other peers.

One process may host several peers behind one endpoint (`fedmoe peer --index 0-24`): each
request names the peer it fetches from (`ExpertRequest.source_id`, "peer-K") and is served from
that peer's own store and counted by that peer's own byte counter. An empty source_id is taken
only where the process hosts exactly one peer (the form older fetchers and hand-made tools use).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message

from fedmoe.common import faults
from fedmoe.common.accounting import ByteCounter, CountingServerInterceptor
from fedmoe.common.grpc_status import status_of
from fedmoe.common.logsafe import clip
from fedmoe.common.proto import pb, rpc
from fedmoe.common.refusal import Refused
from fedmoe.peer.expert_store import ExpertStore

log = logging.getLogger("fedmoe.peer")


def _serialize_chunk(chunk: bytes | pb.TensorChunk) -> bytes:
    """Chunks come pre-serialized from the store; a TensorChunk message is serialized as usual."""
    return chunk if isinstance(chunk, bytes) else chunk.SerializeToString()


def expert_server(
    service: ExpertExchangeService,
    workers: int,
    options: list[tuple[str, Any]],
    maximum_concurrent_rpcs: int | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> grpc.Server:
    """A gRPC server serving `service`, every served message counted as p2p in the counter of the
    hosted peer it is for (CountingServerInterceptor). Add a port, then start it.
    `interceptors` run before the counting one (telemetry, the reflection gate)."""
    counting = CountingServerInterceptor("fedmoe.v1.ExpertExchange", "p2p", service.counter_of)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="experts"),
        options=options,
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
        interceptors=[*interceptors, counting],
    )
    add_expert_exchange(server, service)
    return server


def add_expert_exchange(server: grpc.Server, service: ExpertExchangeService) -> None:
    """Register the service like the generated helper does, but with the pass-through serializer
    so that the pre-encoded TensorChunk bytes go out without being parsed and re-serialized."""
    handler = grpc.method_handlers_generic_handler(
        "fedmoe.v1.ExpertExchange",
        {
            "FetchExperts": grpc.unary_stream_rpc_method_handler(
                service.FetchExperts,
                request_deserializer=pb.ExpertRequest.FromString,
                response_serializer=_serialize_chunk,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))


@dataclass(frozen=True)
class HostedPeer:
    peer_id: str  # "" for a store registered before (or without) a join
    store: ExpertStore
    counter: ByteCounter


class ExpertExchangeService(rpc.ExpertExchangeServicer):
    """Serves the experts of the peers this process hosts.

    `ExpertExchangeService(store, counter)` serves one peer (empty source_id accepted);
    `ExpertExchangeService(hosted=N)` then `add_peer(...)` once per peer as each joins.
    """

    def __init__(
        self,
        store: ExpertStore | None = None,
        counter: ByteCounter | None = None,
        hosted: int = 1,
    ) -> None:
        self.hosted = hosted  # how many peers this process serves (fixed at start)
        self._lock = threading.Lock()
        self._peers: dict[str, HostedPeer] = {}
        self._only: HostedPeer | None = None
        if store is not None:
            self._only = HostedPeer("", store, counter or ByteCounter())

    def add_peer(self, peer_id: str, store: ExpertStore, counter: ByteCounter) -> None:
        """Route requests for `peer_id` to this store (called once the peer has joined)."""
        peer = HostedPeer(peer_id, store, counter)
        with self._lock:
            self._peers[peer_id] = peer
            if self.hosted == 1:
                self._only = peer

    def counter_of(self, request: Message) -> ByteCounter | None:
        """The byte counter of the hosted peer an ExpertRequest names (None: nobody here)."""
        peer = self._route(getattr(request, "source_id", ""))
        return None if peer is None else peer.counter

    def _route(self, source_id: str) -> HostedPeer | None:
        with self._lock:
            if source_id:
                return self._peers.get(source_id)
            return self._only if self.hosted == 1 else None

    def FetchExperts(
        self, request: pb.ExpertRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        peer = self._route(request.source_id)
        if peer is None:
            if request.source_id:
                message = f"peer {clip(request.source_id)} is not served here"
            elif self.hosted > 1:
                message = f"this endpoint hosts {self.hosted} peers: name one in source_id"
            else:
                message = "no peer has joined the run here yet"
            log.warning("refused expert request from %s: %s", clip(request.requester_id), message)
            context.abort(grpc.StatusCode.NOT_FOUND, message)
            return
        # A caller that goes away (cancel, deadline) must not keep a server thread waiting for
        # a plan: the callback marks it and wakes the store's waiters, which then give up.
        cancelled = threading.Event()

        def ended() -> None:
            cancelled.set()
            peer.store.wake()

        context.add_callback(ended)
        remaining = context.time_remaining()
        wait = (
            peer.store.wait_timeout
            if remaining is None
            else min(peer.store.wait_timeout, remaining)
        )
        try:
            chunks = peer.store.take(
                request.round,
                request.requester_id,
                list(request.experts),
                request.ticket,
                wait_seconds=wait,
                cancelled=cancelled,
            )
        except Refused as e:
            log.warning(
                "refused expert request from %s to %s: %s",
                clip(request.requester_id),
                peer.peer_id or "this peer",
                e,
            )
            context.abort(status_of(e.reason), str(e))
            return
        # Counted by the server's CountingServerInterceptor (`counter_of`) under the request's
        # round, in the counter of the hosted peer it names: this peer reports that round only
        # after serving.
        for chunk in chunks:
            faults.count("kill_after_served_chunks", peer.peer_id or None)
            yield chunk
        peer.store.mark_served(request.round, request.requester_id)
