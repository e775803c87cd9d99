"""What a peer serves to others: its expert snapshots per round, and the plan's serve orders.

No gRPC here; the ExpertExchange service (peer/expert_service.py) asks this store what to send.
A request is served only if the coordinator's plan for that round orders it: the requester and
the experts must match a serve order, and each order is served once.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable

from fedmoe.common.refusal import Reason, Refused
from fedmoe.common.tensors import WireTensor, chunk_tensors

# Requester ids are "peer-<k>"; tickets are short tokens. Anything longer is refused unread.
MAX_REQUESTER_CHARS = 64
MAX_TICKET_CHARS = 256
DENIED = "no valid ticket for this request"
_NO_TICKET = "\x00" * 32  # compared against when the requester has no order: never matches


class ExpertStore:
    def __init__(
        self,
        wait_timeout: float = 600.0,
        has_experts: Callable[[int], bool] = lambda r: True,
        max_experts: int = 1024,
    ) -> None:
        self.wait_timeout = wait_timeout
        self.has_experts = has_experts  # which rounds aggregate experts (set from the config)
        self.max_experts = max_experts  # M: no request may name more experts (set from config)
        self._finished = 0  # rounds up to here are over: their snapshots are gone
        # The round this peer is working on. Round 1 counts as begun from the start: the server is
        # up before the peer begins it, and a request then is treated like one just after.
        self._current = 1
        self._cv = threading.Condition()
        # Snapshots are kept as serialized TensorChunk messages: encoded (chunked, checksummed,
        # serialized) once at publish, however many peers then fetch them.
        self._snapshots: dict[int, dict[int, list[bytes]]] = {}
        self._orders: dict[int, dict[str, tuple[set[int], str]]] = {}
        self._served: dict[int, set[str]] = {}
        self._reported: dict[int, set[str]] = {}  # requesters known (heartbeat) to be done

    def begin(self, round_: int) -> None:
        """This peer starts working on `round_`: only this round (and rounds whose snapshot it
        still holds) is served; earlier rounds it has no snapshot of are lost."""
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
            # Publishing a round's snapshot means working on it (begin() may not have been told).
            self._current = max(self._current, round_)
            self._cv.notify_all()

    def set_orders(self, round_: int, orders: dict[str, tuple[list[int], str]]) -> None:
        """requester -> (experts, ticket), from this peer's plan."""
        with self._cv:
            self._orders[round_] = {r: (set(e), t) for r, (e, t) in orders.items()}
            self._served.setdefault(round_, set())
            self._cv.notify_all()

    def take(
        self,
        round_: int,
        requester: str,
        experts: list[int],
        ticket: str,
        wait_seconds: float | None = None,
        cancelled: threading.Event | None = None,
    ) -> list[bytes]:
        """The serialized chunks to stream for one request.

        Only the round this peer works on (or one whose snapshot it still holds) is served; any
        other round is refused at once, so that requests for rounds far ahead cannot park server
        threads. For this round it waits for its plan, up to min(`wait_seconds`, wait_timeout)
        (the service passes the call's remaining deadline), and stops as soon as `cancelled` is
        set (the service sets it, then calls wake(), when the client goes away).
        Unknown requester, wrong ticket and wrong experts get one answer, DENIED, that says
        nothing about the plan: an unauthenticated prober learns nothing of who fetches what.
        """
        # Bounds first: nothing below looks at an oversized id or list.
        if len(requester) > MAX_REQUESTER_CHARS or len(ticket) > MAX_TICKET_CHARS:
            raise Refused(Reason.NOT_ALLOWED, DENIED)
        if len(experts) > self.max_experts:
            raise Refused(Reason.BAD_REQUEST, f"more than {self.max_experts} experts asked")
        wait = self.wait_timeout if wait_seconds is None else min(wait_seconds, self.wait_timeout)
        with self._cv:

            def gone() -> bool:  # this peer will never serve this round (over, or moved on)
                if round_ <= self._finished:
                    return True
                return round_ != self._current and round_ not in self._snapshots

            def stop() -> bool:
                return cancelled is not None and cancelled.is_set()

            if not self.has_experts(round_) or gone():
                raise Refused(Reason.NOTHING_THERE, f"no experts of round {round_} are served here")
            # The requester may get its plan before this peer has read its own: wait for it
            # (or for this peer to leave the round, or for the caller to go away).
            self._cv.wait_for(lambda: round_ in self._orders or gone() or stop(), max(0.0, wait))
            if stop():
                raise Refused(Reason.CANCELLED, "the call was cancelled")
            if round_ not in self._orders:
                raise Refused(Reason.NOTHING_THERE, f"no plan for round {round_} here yet")
            entry = self._orders[round_].get(requester)
            # Compared even for an unknown requester, so that timing does not tell them apart.
            planned, expected_ticket = entry if entry is not None else (set(), _NO_TICKET)
            if not (
                hmac.compare_digest(ticket.encode(), expected_ticket.encode())
                and entry is not None
                and set(experts) == planned
            ):
                raise Refused(Reason.NOT_ALLOWED, DENIED)
            # A holder of the ticket may learn that it was used (a retry after a broken stream).
            if requester in self._served[round_]:
                raise Refused(Reason.DONE_ALREADY, "this ticket was already used")
            snapshot = self._snapshots.get(round_)
            if snapshot is None:
                raise Refused(Reason.NOTHING_THERE, f"no expert snapshot for round {round_}")
            return [chunk for m in sorted(planned) for chunk in snapshot[m]]

    def wake(self) -> None:
        """Re-check every waiting take() (the service calls it after setting a `cancelled`)."""
        with self._cv:
            self._cv.notify_all()

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

    def void(self, gone: set[str]) -> None:
        """Void the orders of these peers (they left the run): nobody waits for them any more."""
        if not gone:
            return
        with self._cv:
            for orders in self._orders.values():
                for peer in gone & set(orders):
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
