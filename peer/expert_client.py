"""Fetching experts from other peers: one long-lived channel per source address.

Every message is counted as p2p by the channel's CountingInterceptor (common/accounting.py),
under the round the request names. One `fetch` is one attempt; the round loop retries a failed stream whole through
common/retry.retry_stream (FETCH_RETRY), the one helper for every streaming call.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import grpc

from fedmoe.common.accounting import ByteCounter, CountingInterceptor
from fedmoe.common.chunk_decoder import decode_chunk
from fedmoe.common.grpc_options import CHANNEL_OPTIONS
from fedmoe.common.proto import pb
from fedmoe.common.tensors import TensorAssembler, TensorSpec, WireLimits, WireTensor, check_value
from fedmoe.common.tls import TlsFiles, channel

FETCH_METHOD = "/fedmoe.v1.ExpertExchange/FetchExperts"


class ExpertClient:
    def __init__(
        self,
        counter: ByteCounter,
        timeout: float,
        limits: WireLimits | None = None,
        tls: TlsFiles | None = None,
    ):
        self.counter = counter
        self.timeout = timeout
        self.limits = limits or WireLimits()
        self.tls = tls
        self._lock = threading.Lock()
        self._channels: dict[tuple[str, str | None], grpc.Channel] = {}
        self._calls: dict[tuple[str, str | None], grpc.UnaryStreamMultiCallable] = {}
        self._counting = CountingInterceptor(counter, "p2p")

    def _fetch_call(self, address: str, server_name: str | None) -> grpc.UnaryStreamMultiCallable:
        """FetchExperts on the (reused) channel to `address`, answering with each chunk's
        serialized bytes: common/chunk_decoder.py decodes them without copying the payload."""
        key = (address, server_name)
        with self._lock:
            call = self._calls.get(key)
            if call is None:
                ch = channel(address, self.tls, CHANNEL_OPTIONS, server_name)
                self._channels[key] = ch
                call = grpc.intercept_channel(ch, self._counting).unary_stream(
                    FETCH_METHOD,
                    request_serializer=pb.ExpertRequest.SerializeToString,
                    response_deserializer=None,  # the bytes as received
                )
                self._calls[key] = call
        return call

    def fetch(
        self,
        address: str,
        requester_id: str,
        round_: int,
        experts: list[int],
        expected: Mapping[str, TensorSpec],
        ticket: str = "",
        source_id: str = "",
        max_norm: float | None = None,
    ) -> dict[str, WireTensor]:
        """Stream the experts in; every tensor is validated against `expected` before use.

        `source_id` names the peer to fetch from when one endpoint hosts several. With
        `max_norm`, each tensor must also be finite with an L2 norm at most `max_norm`: a source
        that sends poisoned values fails the fetch (WireError) instead of being merged.
        """
        request = pb.ExpertRequest(
            requester_id=requester_id,
            round=round_,
            experts=experts,
            ticket=ticket,
            source_id=source_id,
        )
        assembler = TensorAssembler(self.limits, expected)
        # Under TLS the source must hold its own certificate (peer-K), whatever its address.
        server_name = source_id if self.tls is not None and source_id else None
        call = self._fetch_call(address, server_name)(request, timeout=self.timeout)
        try:
            for raw in call:
                tensor = assembler.add(decode_chunk(raw))
                if tensor is not None and max_norm is not None:
                    check_value(tensor, max_norm)  # as each completes: stop a bad stream early
            return assembler.finish()
        except BaseException:
            call.cancel()  # no-op when the stream already ended; frees the server otherwise
            raise

    def close(self) -> None:
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
            self._calls.clear()
