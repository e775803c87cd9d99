"""Retrying gRPC calls across transient failures (a restarting coordinator, a flapping link)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

T = TypeVar("T")
log = logging.getLogger("fedmoe.retry")

TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}


def with_retries(
    call: Callable[[], T],
    what: str,
    give_up_after: float,
    transient: set[grpc.StatusCode] = TRANSIENT,
    first_delay: float = 0.2,
    max_delay: float = 5.0,
) -> T:
    """Run `call`; on a transient status wait (exponential backoff with jitter) and run it again,
    for at most `give_up_after` seconds. Other statuses are raised at once."""
    deadline = time.monotonic() + give_up_after
    delay = first_delay
    while True:
        try:
            return call()
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            if code not in transient or time.monotonic() + delay > deadline:
                raise
            log.warning(
                "%s: %s (%s); retrying in %.1f s",
                what,
                code.name if code else "?",
                e.details() if hasattr(e, "details") else "",
                delay,
            )
            time.sleep(delay * (0.5 + random.random()))
            delay = min(max_delay, delay * 2)
