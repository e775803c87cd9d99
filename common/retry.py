"""Retrying gRPC calls across transient failures (a restarting coordinator, a flapping link).

One policy per kind of call:

- Unary calls (Join, ReportMetrics) are retried by gRPC itself, from the service config in
  common/grpc_options.py (retryPolicy: UNAVAILABLE, exponential backoff), and wait for the
  channel to be ready (`wait_for_ready=True`) within their deadline while the coordinator is down.
  Heartbeat is not retried: the next heartbeat is its retry.
- Streaming calls (SubmitUpdate, GetRoundResult, GetLatestModel, FetchExperts) are retried here,
  by `retry_stream`, because a stream fails part-way through, after gRPC has committed it, and
  only the caller can start it again from the beginning. Each call site names its StreamRetry.

Protocol-level repeats (an upload sent again to a coordinator that restarted without it) are not
transport retries and live with the protocol (peer/runner.py).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

T = TypeVar("T")
log = logging.getLogger("fedmoe.retry")

TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}
)


def _code(error: BaseException) -> grpc.StatusCode | None:
    code = getattr(error, "code", None) if isinstance(error, grpc.RpcError) else None
    return code() if callable(code) else None


def is_transient(error: BaseException) -> bool:
    """A gRPC status that a later attempt may not see (the server restarting, a lost link)."""
    return _code(error) in TRANSIENT


def any_error(error: BaseException) -> bool:
    return isinstance(error, Exception)


@dataclass(frozen=True)
class StreamRetry:
    """How one kind of streaming call is retried: at most `attempts` tries (0: no limit) within
    `give_up_after` seconds (inf: no limit), waiting `first_delay` then doubling up to
    `max_delay` (with jitter) between tries, on the errors `retry_on` accepts."""

    attempts: int = 0
    give_up_after: float = math.inf
    first_delay: float = 0.2
    max_delay: float = 5.0
    retry_on: Callable[[BaseException], bool] = is_transient


def coordinator_stream(timeout: float) -> StreamRetry:
    """Streams to the coordinator: transient statuses, for as long as one call may take (a
    coordinator restarting from its checkpoint is back well within it)."""
    return StreamRetry(give_up_after=timeout)


# Streams from another peer: any failure (a lost stream, a refused or bad one) is tried once more
# after a short pause; then the source is left out of Eq. 11 (peer/runner.py).
FETCH_RETRY = StreamRetry(attempts=2, first_delay=0.5, retry_on=any_error)


def retry_stream(call: Callable[[], T], what: str, policy: StreamRetry) -> T:
    """Run `call` (which opens and consumes one stream); on an error `policy` retries, wait and
    run it again from the start. Any other error, or the last one, is raised."""
    deadline = time.monotonic() + policy.give_up_after
    delay = policy.first_delay
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as e:
            last = bool(policy.attempts) and attempt >= policy.attempts
            if last or not policy.retry_on(e) or time.monotonic() + delay > deadline:
                raise
            code = _code(e)
            details = getattr(e, "details", None)
            log.warning(
                "%s: %s (%s); retrying in %.1f s",
                what,
                code.name if code is not None else type(e).__name__,
                details() if callable(details) else e,
                delay,
            )
            time.sleep(delay * (0.5 + random.random()))
            delay = min(policy.max_delay, delay * 2)
