"""The coordinator's round book as pure logic, with a fake clock: quorum and deadline, silent
members, idempotent retries, rejoins, and rounds nobody can report."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from common.config import make_config
from common.model_schema import model_schema
from coordinator.rounds import Refused, RoundBook
from coordinator.strategies import make_strategy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_book(peers: int = 3, **cfg: Any) -> tuple[RoundBook, Clock, list[tuple[int, list]]]:
    config = make_config(
        peers=peers,
        rounds=3,
        dataset="synthetic",
        embed_dim=4,
        num_experts=2,
        top_k=1,
        expert_hidden=3,
        sync_every=1,
        round_timeout=60,
        peer_timeout=10,
        **cfg,
    )
    written: list[tuple[int, list]] = []
    clock = Clock()
    book = RoundBook(
        config, make_strategy(config), lambda r, recs: written.append((r, recs)), None, clock
    )
    return book, clock, written


def upload(book: RoundBook) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        n: rng.standard_normal(s).astype(np.float32)
        for n, s in model_schema(book.cfg).items()
        if n.startswith(("embedding.", "gate."))
    }


def record(r: int, peer: str) -> dict[str, Any]:
    return {"round": r, "peer": peer, "accuracy": 0.5}


def test_round_closes_when_every_live_member_uploaded() -> None:
    book, _, _ = make_book()
    members = [book.join(k, f"h{k}:1") for k in range(3)]
    for m in members[:2]:
        book.submit(m, 1, 10, upload(book))
    assert book.closed_round == 0
    book.submit(members[2], 1, 10, upload(book))
    assert book.closed_round == 1 and book.participants[1] == ["peer-0", "peer-1", "peer-2"]


def test_silent_member_is_left_out_and_quorum_closes_the_round() -> None:
    book, clock, _ = make_book(min_peers=2)
    a, b, c = (book.join(k, f"h{k}:1") for k in range(3))
    book.submit(a, 1, 10, upload(book))
    book.submit(b, 1, 10, upload(book))
    clock.now += 11  # c says nothing for longer than the peer timeout
    book.heartbeat(a), book.heartbeat(b)
    book.tick()
    assert not book.members["peer-2"].alive and book.closed_round == 1
    assert book.participants[1] == ["peer-0", "peer-1"]
    with pytest.raises(Refused, match="already closed"):  # c comes back too late
        book.submit(c, 1, 10, upload(book))


def test_deadline_closes_with_a_quorum_even_if_a_live_member_is_slow() -> None:
    book, clock, _ = make_book(min_peers=2)
    a, b, c = (book.join(k, f"h{k}:1") for k in range(3))
    book.submit(a, 1, 10, upload(book))
    clock.now += 59
    for m in (a, b, c):
        book.heartbeat(m)
    book.tick()
    assert book.closed_round == 0  # one upload is below the quorum of 2
    book.submit(b, 1, 10, upload(book))
    clock.now += 2
    book.tick()
    assert book.closed_round == 1 and book.participants[1] == ["peer-0", "peer-1"]


def test_retried_upload_after_a_lost_ack_is_accepted_once() -> None:
    book, _, _ = make_book(peers=2)
    a, b = book.join(0, "h0:1"), book.join(1, "h1:1")
    book.submit(a, 1, 10, upload(book))
    book.submit(b, 1, 10, upload(book))  # closes the round
    book.submit(b, 1, 10, upload(book))  # the same upload again: no error, no second round
    assert book.closed_round == 1 and book.participants[1] == ["peer-0", "peer-1"]


def test_round_written_when_all_participants_reported_and_reports_are_idempotent() -> None:
    book, _, written = make_book(peers=2)
    a, b = book.join(0, "h0:1"), book.join(1, "h1:1")
    for m in (a, b):
        book.submit(m, 1, 10, upload(book))
    book.report(a, 1, record(1, "peer-0"))
    book.report(a, 1, record(1, "peer-0"))  # a retry
    assert written == []
    book.report(b, 1, record(1, "peer-1"))
    assert [r for r, _ in written] == [1] and len(written[0][1]) == 2
    assert book.reported(1) == ["peer-0", "peer-1"]


def test_round_whose_only_participant_died_is_passed_over() -> None:
    book, clock, written = make_book(peers=2, min_peers=1)
    a, b = book.join(0, "h0:1"), book.join(1, "h1:1")
    book.submit(a, 1, 10, upload(book))
    clock.now += 61  # deadline: round 1 closes with a alone
    book.heartbeat(b)
    book.tick()
    assert book.participants[1] == ["peer-0"]
    clock.now += 11  # a dies before reporting round 1; b is alive but not a participant
    book.heartbeat(b)
    book.tick()
    assert book.reported_round == 1 and written == []
    assert any(e["event"] == "no report" and e["round"] == 1 for e in book.events)


def test_rejoined_participant_is_not_waited_for_in_its_unfinished_round() -> None:
    book, _, written = make_book(peers=2)
    a, b = book.join(0, "h0:1"), book.join(1, "h1:1")
    for m in (a, b):
        book.submit(m, 1, 10, upload(book))
    book.report(a, 1, record(1, "peer-0"))
    book.join(1, "h1:2", b.secret)  # b restarted after round 1 closed: it will never report round 1
    assert "peer-1" in book.reported(1)  # sources stop waiting for its fetches
    book.tick()
    assert [r for r, _ in written] == [1] and [x["peer"] for x in written[0][1]] == ["peer-0"]
    assert book.membership_summary()["peer-1"]["joins"] == 2


def test_sessions_identify_members_and_bad_ones_are_refused() -> None:
    book, _, _ = make_book()
    a = book.join(0, "h0:1")
    assert book.authenticate(a.session) is a
    with pytest.raises(Refused, match="unknown or expired session"):
        book.authenticate("forged")
    old = a.session
    book.join(0, "h0:2", a.secret)  # rejoin: the old session is void
    with pytest.raises(Refused):
        book.authenticate(old)


def test_upload_must_match_the_models_schema() -> None:
    book, _, _ = make_book()
    a = book.join(0, "h0:1")
    tensors = upload(book)
    tensors["embedding.0.weight"] = np.zeros((4, 5), np.float32)
    with pytest.raises(Refused, match=r"has shape \[4, 5\], the model has \[4, 32\]"):
        book.submit(a, 1, 10, tensors)
    partial = upload(book)
    del partial["gate.proxies"]
    with pytest.raises(Refused, match="lacks tensors"):
        book.submit(a, 1, 10, partial)
