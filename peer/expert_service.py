"""The ExpertExchange gRPC service every peer runs: streams planned experts to other peers."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc

from common import faults
from common.accounting import ByteCounter
from common.proto import pb, rpc
from peer.expert_store import ExpertStore, ServeRefused

log = logging.getLogger("fedmoe.peer")


def _serialize_chunk(chunk: bytes | pb.TensorChunk) -> bytes:
    """Chunks come pre-serialized from the store; a TensorChunk message is serialized as usual."""
    return chunk if isinstance(chunk, bytes) else chunk.SerializeToString()


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


class ExpertExchangeService(rpc.ExpertExchangeServicer):
    def __init__(self, store: ExpertStore, counter: ByteCounter) -> None:
        self.store = store
        self.counter = counter

    def FetchExperts(
        self, request: pb.ExpertRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        try:
            chunks = self.store.take(
                request.round, request.requester_id, list(request.experts), request.ticket
            )
        except ServeRefused as e:
            log.warning("refused expert request from %s: %s", request.requester_id, e)
            context.abort(getattr(grpc.StatusCode, e.code), str(e))
            return
        # Counted under the request's round: this peer reports that round only after serving.
        self.counter.message(request.round, "p2p", "received", request)
        for chunk in chunks:
            self.counter.add(request.round, "p2p", "sent", len(chunk))
            faults.count("kill_after_served_chunks")
            yield chunk
        self.store.mark_served(request.round, request.requester_id)
