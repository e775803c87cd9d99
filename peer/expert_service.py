"""The ExpertExchange gRPC service every peer runs: streams planned experts to other peers."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc

from common.accounting import ByteCounter
from common.proto import pb, rpc
from common.tensors import chunk_tensors
from peer.expert_store import ExpertStore, ServeRefused

log = logging.getLogger("fedmoe.peer")


class ExpertExchangeService(rpc.ExpertExchangeServicer):
    def __init__(self, store: ExpertStore, counter: ByteCounter, chunk_bytes: int) -> None:
        self.store = store
        self.counter = counter
        self.chunk_bytes = chunk_bytes

    def FetchExperts(
        self, request: pb.ExpertRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.TensorChunk]:
        try:
            tensors = self.store.take(request.round, request.requester_id, list(request.experts))
        except ServeRefused as e:
            log.warning("refused expert request from %s: %s", request.requester_id, e)
            context.abort(getattr(grpc.StatusCode, e.code), str(e))
            return
        # Counted under the request's round: this peer reports that round only after serving.
        self.counter.message(request.round, "p2p", "received", request)
        for chunk in chunk_tensors(tensors, self.chunk_bytes):
            self.counter.message(request.round, "p2p", "sent", chunk)
            yield chunk
        self.store.mark_served(request.round, request.requester_id)
