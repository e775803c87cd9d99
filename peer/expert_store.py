"""What a peer serves to others: its expert snapshots per round, and the plan's serve orders.

No gRPC here; the ExpertExchange service (peer/expert_service.py) asks this store what to send.
A request is served only if the coordinator's plan for that round orders it: the requester and
the experts must match a serve order, and each order is served once.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable

from common.tensors import WireTensor, chunk_tensors


class ServeRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ExpertStore:
    def __init__(
        self, wait_timeout: float = 600.0, has_experts: Callable[[int], bool] = lambda r: True
    ) -> None:
        self.wait_timeout = wait_timeout
        self.has_experts = has_experts  # which rounds aggregate experts (set from the config)
        self._finished = 0  # rounds up to here are over: their snapshots are gone
        self._current = 0  # the round this peer is working on
        self._cv = threading.Condition()
        # Snapshots are kept as serialized TensorChunk messages: encoded (chunked, checksummed,
        # serialized) once at publish, however many peers then fetch them.
        self._snapshots: dict[int, dict[int, list[bytes]]] = {}
        self._orders: dict[int, dict[str, tuple[set[int], str]]] = {}
        self._served: dict[int, set[str]] = {}
        self._reported: dict[int, set[str]] = {}  # requesters known (heartbeat) to be done

    def begin(self, round_: int) -> None:
        """This peer starts working on `round_`: earlier rounds it has no snapshot of are lost."""
        with self._cv:
            self._current = max(self._current, round_)
            self._cv.notify_all()

    def publish(self, round_: int, experts: dict[int, list[WireTensor]], chunk_bytes: int) -> None:
        encoded = {
            m: [c.SerializeToString() for c in chunk_tensors(tensors, chunk_bytes)]
            for m, tensors in experts.items()
        }
        with self._cv:
            self._snapshots[round_] = encoded
            self._cv.notify_all()

    def set_orders(self, round_: int, orders: dict[str, tuple[list[int], str]]) -> None:
        """requester -> (experts, ticket), from this peer's plan."""
        with self._cv:
            self._orders[round_] = {r: (set(e), t) for r, (e, t) in orders.items()}
            self._served.setdefault(round_, set())
            self._cv.notify_all()

    def take(self, round_: int, requester: str, experts: list[int], ticket: str) -> list[bytes]:
        """The serialized chunks to stream for one request; waits (bounded) for this peer's plan."""
        with self._cv:

            def gone() -> bool:  # a round this peer will never serve (over, or missed: restart)
                past = round_ < self._current and round_ not in self._snapshots
                return round_ <= self._finished or past

            if not self.has_experts(round_) or gone():
                raise ServeRefused("NOT_FOUND", f"no experts of round {round_} are served here")
            # The requester may get its plan before this peer has read its own: wait for it
            # (or for this peer to leave the round, when it was too late to take part).
            self._cv.wait_for(lambda: round_ in self._orders or gone(), self.wait_timeout)
            if round_ not in self._orders:
                raise ServeRefused("NOT_FOUND", f"this peer has no plan for round {round_}")
            entry = self._orders[round_].get(requester)
            if entry is None:
                raise ServeRefused(
                    "PERMISSION_DENIED",
                    f"{requester!r} is not planned to fetch from me in round {round_}",
                )
            planned, expected_ticket = entry
            if not hmac.compare_digest(ticket, expected_ticket):
                raise ServeRefused("PERMISSION_DENIED", f"invalid ticket for round {round_}")
            if requester in self._served[round_]:
                raise ServeRefused(
                    "ALREADY_EXISTS", f"{requester!r} already fetched round {round_}"
                )
            if set(experts) != planned:
                raise ServeRefused(
                    "INVALID_ARGUMENT",
                    f"requested experts {sorted(set(experts))}, the plan orders {sorted(planned)}",
                )
            snapshot = self._snapshots.get(round_)
            if snapshot is None:
                raise ServeRefused("NOT_FOUND", f"no expert snapshot for round {round_}")
            return [chunk for m in sorted(planned) for chunk in snapshot[m]]

    def mark_served(self, round_: int, requester: str) -> None:
        with self._cv:
            self._served.setdefault(round_, set()).add(requester)
            self._cv.notify_all()

    def retain(self, members: set[str]) -> None:
        """Void the orders of peers that left the run: nobody waits for them any more."""
        with self._cv:
            for orders in self._orders.values():
                for peer in set(orders) - members:
                    del orders[peer]
            self._cv.notify_all()

    def release(self, round_: int, peers: set[str]) -> None:
        """These peers are done with `round_` (they reported it): stop waiting for them."""
        with self._cv:
            self._reported.setdefault(round_, set()).update(peers)
            orders = self._orders.get(round_, {})
            for peer in peers & set(orders):
                if peer not in self._served.get(round_, set()):
                    del orders[peer]
            self._cv.notify_all()

    def wait_all_served(self, round_: int, timeout: float) -> list[str]:
        """Wait until every ordered requester was served; returns those that never came."""
        with self._cv:
            orders = self._orders.get(round_, {})
            self._cv.wait_for(lambda: set(orders) <= self._served.get(round_, set()), timeout)
            return sorted(set(orders) - self._served.get(round_, set()))

    def served(self, round_: int) -> set[str]:
        with self._cv:
            return set(self._served.get(round_, set()))

    def wait_reported(self, round_: int, peers: set[str], timeout: float) -> bool:
        """Wait until these requesters reported the round: everything sent to them has arrived."""
        with self._cv:
            return self._cv.wait_for(lambda: peers <= self._reported.get(round_, set()), timeout)

    def drop(self, round_: int) -> None:
        with self._cv:
            self._finished = max(self._finished, round_)
            self._cv.notify_all()
            self._reported.pop(round_, None)
            self._snapshots.pop(round_, None)
            self._orders.pop(round_, None)
            self._served.pop(round_, None)
