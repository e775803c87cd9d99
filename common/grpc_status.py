"""The one place where a refusal's reason becomes a gRPC status code (and back, for clients)."""

from __future__ import annotations

import grpc

from fedmoe.common.refusal import Reason

STATUS: dict[Reason, grpc.StatusCode] = {
    Reason.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.UNKNOWN_CALLER: grpc.StatusCode.UNAUTHENTICATED,
    Reason.NOT_ALLOWED: grpc.StatusCode.PERMISSION_DENIED,
    Reason.WRONG_TIME: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.NOTHING_THERE: grpc.StatusCode.NOT_FOUND,
    Reason.TIMED_OUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    Reason.RUN_FAILED: grpc.StatusCode.ABORTED,
    Reason.BUSY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.CANCELLED: grpc.StatusCode.CANCELLED,
    Reason.DONE_ALREADY: grpc.StatusCode.ALREADY_EXISTS,
}


def status_of(reason: Reason) -> grpc.StatusCode:
    return STATUS[reason]
