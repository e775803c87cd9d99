"""Why a request is refused, in the protocol's own terms.

The pure logic (round book, expert store) raises `Refused(Reason..., message)`; only the gRPC
services translate a reason into a status code (common/grpc_status.py). So the domain code knows
no transport, and a newcomer reads "not allowed" where it used to read "PERMISSION_DENIED".
"""

from __future__ import annotations

import enum


class Reason(enum.Enum):
    BAD_REQUEST = "bad request"  # malformed or out of range
    UNKNOWN_CALLER = "unknown caller"  # no valid session or token
    NOT_ALLOWED = "not allowed"  # a known caller asking for what is not its own
    WRONG_TIME = "wrong time"  # valid, but not in this state of the run (late, not open...)
    NOTHING_THERE = "nothing there"  # no such round, snapshot or upload
    TIMED_OUT = "timed out"  # the wait ended before the condition came true
    RUN_FAILED = "run failed"
    BUSY = "busy"  # over a per-caller limit
    CANCELLED = "cancelled"  # the caller went away
    DONE_ALREADY = "done already"  # served once, cannot repeat


class Refused(Exception):
    """A request that breaks the protocol; `reason` says why, the message says what to do."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
