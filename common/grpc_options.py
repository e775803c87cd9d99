"""gRPC settings shared by every server and channel: explicit size limits and keepalive.

Chunks are at most `WireLimits.max_chunk_bytes`; no single message needs more than that plus
framing, so the limit is set a little above it on both sides instead of gRPC's defaults.
Keepalive: clients ping every 60 s of idleness; servers accept pings down to every 10 s, so the
client's rate never trips `too_many_pings` (GOAWAY).

Retries (common/retry.py): the unary calls that must survive a restarting coordinator, Join and
ReportMetrics, are retried by gRPC from SERVICE_CONFIG (on UNAVAILABLE, exponential backoff).
Heartbeat is left out on purpose: the next heartbeat is its retry, and a heartbeat retried past its
deadline would end DEADLINE_EXCEEDED instead of telling the peer that the coordinator is gone.
Streaming calls get no gRPC retry policy: retry_stream retries them whole, so that no stream is
retried twice over.
"""

from __future__ import annotations

import json

from fedmoe.common.tensors import WireLimits

MAX_MESSAGE_BYTES = WireLimits().max_chunk_bytes + (1 << 20)

_COMMON = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

UNARY_RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.2s",
    "maxBackoff": "5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
RETRIED_UNARY_METHODS = (
    ("fedmoe.v1.Coordinator", "Join"),
    ("fedmoe.v1.Coordinator", "ReportMetrics"),
)
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": s, "method": m} for s, m in RETRIED_UNARY_METHODS],
                "retryPolicy": UNARY_RETRY_POLICY,
            }
        ]
    }
)

CHANNEL_OPTIONS = _COMMON + [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", SERVICE_CONFIG),
    # Large windows let one stream fill a fast link (BDP probing stays on).
    ("grpc.http2.lookahead_bytes", 1 << 20),
]

SERVER_OPTIONS = _COMMON + [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 5),
    ("grpc.so_reuseport", 0),
]
