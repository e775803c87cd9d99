"""The expert store's serving rules: only the current round, bounded waits, uniform refusals."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fedmoe.common.grpc_status import status_of
from fedmoe.common.refusal import Refused
from fedmoe.common.tensors import numpy_to_wire
from fedmoe.peer.expert_store import DENIED, MAX_REQUESTER_CHARS, ExpertStore


def store_at(round_: int, wait_timeout: float = 30.0) -> ExpertStore:
    """A store working on `round_` with two experts published, no plan yet."""
    s = ExpertStore(wait_timeout=wait_timeout, max_experts=2)
    s.begin(round_)
    experts = {m: [numpy_to_wire(f"experts.{m}.w", np.full(3, m, np.float32))] for m in (0, 1)}
    s.publish(round_, experts, chunk_bytes=1024)
    return s


def refusal(fn, *args, **kwargs) -> tuple[str, str, float]:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    with pytest.raises(Refused) as info:
        fn(*args, **kwargs)
    # As a caller sees it: the gRPC status the service turns the reason into.
    return status_of(info.value.reason).name, str(info.value), time.monotonic() - started


def test_planned_request_is_served_once() -> None:
    s = store_at(3)
    s.set_orders(3, {"peer-1": ([1], "t1")})
    chunks = s.take(3, "peer-1", [1], "t1", wait_seconds=5)
    assert len(chunks) == 1
    s.mark_served(3, "peer-1")
    code, message, _ = refusal(s.take, 3, "peer-1", [1], "t1")
    assert code == "ALREADY_EXISTS" and "peer" not in message
    assert s.wait_all_served(3, timeout=1) == []


@pytest.mark.parametrize("round_", [1, 2, 4, 1_000_000])
def test_other_rounds_are_refused_at_once(round_: int) -> None:
    s = store_at(3, wait_timeout=600)
    s.drop(1)  # round 1 is over; 2 was never published; 4 and beyond are not begun
    code, message, took = refusal(s.take, round_, "peer-1", [0], "t", wait_seconds=600)
    assert code == "NOT_FOUND" and took < 0.5, message


def test_round_without_experts_is_refused_at_once() -> None:
    s = ExpertStore(wait_timeout=600, has_experts=lambda r: r % 2 == 0)
    s.begin(3)
    code, _, took = refusal(s.take, 3, "peer-1", [0], "t")
    assert code == "NOT_FOUND" and took < 0.5


def test_wait_for_the_plan_is_bounded_by_the_caller() -> None:
    s = store_at(3, wait_timeout=600)
    code, _, took = refusal(s.take, 3, "peer-1", [0], "t", wait_seconds=0.3)
    assert code == "NOT_FOUND" and 0.25 <= took < 5


def test_wait_for_the_plan_is_bounded_by_the_store() -> None:
    s = store_at(3, wait_timeout=0.3)
    code, _, took = refusal(s.take, 3, "peer-1", [0], "t", wait_seconds=600)
    assert code == "NOT_FOUND" and 0.25 <= took < 5


def test_cancellation_stops_a_wait_promptly() -> None:
    s = store_at(3, wait_timeout=600)
    cancelled = threading.Event()
    result: list[tuple[str, str, float]] = []
    waiter = threading.Thread(
        target=lambda: result.append(
            refusal(s.take, 3, "peer-1", [0], "t", wait_seconds=600, cancelled=cancelled)
        )
    )
    waiter.start()
    time.sleep(0.2)  # let it block in the wait
    assert not result
    at = time.monotonic()
    cancelled.set()
    s.wake()
    waiter.join(timeout=5)
    assert result and result[0][0] == "CANCELLED"
    assert time.monotonic() - at < 1.0


def test_waiter_is_answered_when_the_plan_arrives() -> None:
    s = store_at(3, wait_timeout=600)
    out: list[list[bytes]] = []
    waiter = threading.Thread(target=lambda: out.append(s.take(3, "peer-1", [0], "t", 600)))
    waiter.start()
    time.sleep(0.1)
    s.set_orders(3, {"peer-1": ([0], "t")})
    waiter.join(timeout=5)
    assert out and len(out[0]) == 1


def test_refusals_reveal_nothing_about_the_plan() -> None:
    s = store_at(3)
    s.set_orders(3, {"peer-1": ([0, 1], "secret-ticket")})
    answers = {
        refusal(s.take, 3, "peer-1", [0, 1], "")[:2],  # planned, no ticket
        refusal(s.take, 3, "peer-1", [0, 1], "guess")[:2],  # planned, wrong ticket
        refusal(s.take, 3, "peer-1", [0], "secret-ticket")[:2],  # right ticket, wrong experts
        refusal(s.take, 3, "peer-9", [0, 1], "")[:2],  # not planned
        refusal(s.take, 3, "peer-9", [0, 1], "secret-ticket")[:2],
        refusal(s.take, 3, "x" * 4_000_000, [0], "")[:2],  # oversized id
        refusal(s.take, 3, "peer-1", [0, 1], "\u00e9\u0000" * 8)[:2],  # non-ASCII ticket
    }
    assert answers == {("PERMISSION_DENIED", DENIED)}
    assert "peer" not in DENIED and "[" not in DENIED


def test_oversized_inputs_are_refused_before_any_wait() -> None:
    s = store_at(3, wait_timeout=600)  # no plan: a valid request would wait
    code, message, took = refusal(s.take, 3, "p" * (MAX_REQUESTER_CHARS + 1), [0], "t")
    assert code == "PERMISSION_DENIED" and took < 0.5 and len(message) < 100
    code, message, took = refusal(s.take, 3, "peer-1", list(range(3)), "t")
    assert code == "INVALID_ARGUMENT" and took < 0.5 and len(message) < 100


def test_publish_counts_as_working_on_the_round() -> None:
    s = ExpertStore(wait_timeout=5)  # begin() never called, as in the bench and older callers
    s.publish(7, {0: [numpy_to_wire("experts.0.w", np.ones(2, np.float32))]}, 1024)
    s.set_orders(7, {"peer-1": ([0], "")})
    assert len(s.take(7, "peer-1", [0], "")) == 1


def test_moving_on_ends_a_wait() -> None:
    s = ExpertStore(wait_timeout=600)
    s.begin(3)  # working on 3, snapshot not published (e.g. late)
    result: list[tuple[str, str, float]] = []
    waiter = threading.Thread(target=lambda: result.append(refusal(s.take, 3, "p", [0], "t")))
    waiter.start()
    time.sleep(0.1)
    s.begin(4)
    waiter.join(timeout=5)
    assert result and result[0][0] == "NOT_FOUND"


def test_release_and_retain_still_void_orders() -> None:
    s = store_at(3)
    s.set_orders(3, {"peer-1": ([0], "a"), "peer-2": ([1], "b"), "peer-3": ([0], "c")})
    s.retain({"peer-1", "peer-2"})
    s.release(3, {"peer-2"})
    assert s.wait_all_served(3, timeout=0.1) == ["peer-1"]
    code, _, _ = refusal(s.take, 3, "peer-3", [0], "c")
    assert code == "PERMISSION_DENIED"


def test_a_fresh_store_waits_for_round_one_only() -> None:
    """Its server is up before the peer begins round 1: round 1 waits, round 2 is refused."""
    s = ExpertStore(wait_timeout=600)
    code, _, took = refusal(s.take, 1, "peer-1", [0], "t", wait_seconds=0.2)
    assert code == "NOT_FOUND" and took >= 0.15
    code, _, took = refusal(s.take, 2, "peer-1", [0], "t", wait_seconds=600)
    assert code == "NOT_FOUND" and took < 0.5
