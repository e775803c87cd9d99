"""The coordinator's round book as pure logic, with a fake clock: quorum and deadline, silent
members, idempotent retries, rejoins, and rounds nobody can report."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedmoe.common.config import make_config
from fedmoe.common.model_schema import model_schema
from fedmoe.coordinator.rounds import Refused, RoundBook
from fedmoe.coordinator.strategies import make_strategy


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


# ---------------------------------------------------------------- participation, identity, bounds


def test_partial_participation_closes_when_the_sampled_members_uploaded() -> None:
    from fedmoe.common.config import participants

    book, _, written = make_book(peers=6, clients_per_round=2)
    members = {k: book.join(k, f"h{k}:1") for k in range(6)}
    sampled = participants(book.cfg, 1)
    assert len(sampled) == 2 and sampled == participants(book.cfg, 1)  # seeded: same again
    outsider = next(k for k in range(6) if k not in sampled)
    with pytest.raises(Refused, match="not sampled"):
        book.submit(members[outsider], 1, 10, upload(book))
    book.submit(members[sampled[0]], 1, 10, upload(book))
    assert book.closed_round == 0
    book.submit(members[sampled[1]], 1, 10, upload(book))
    assert book.closed_round == 1
    assert book.participants[1] == [f"peer-{k}" for k in sampled]
    with pytest.raises(Refused, match="did not take part"):
        book.report(members[outsider], 1, record(1, f"peer-{outsider}"))
    for k in sampled:
        book.report(members[k], 1, record(1, f"peer-{k}"))
    assert [r for r, _ in written] == [1] and len(written[0][1]) == 2
    assert book.dropped_peers() == []  # nobody missed a round it was sampled for


def test_rounds_sample_different_members() -> None:
    from fedmoe.common.config import make_config, participants

    cfg = make_config(peers=100, clients_per_round=10, seed=3)
    draws = [tuple(participants(cfg, r)) for r in range(1, 6)]
    assert len(set(draws)) == 5 and all(len(set(d)) == 10 for d in draws)
    assert participants(make_config(peers=100, seed=3), 1) == list(range(100))


def test_a_live_index_needs_the_member_secret() -> None:
    book, clock, _ = make_book()
    a = book.join(0, "h0:1")
    with pytest.raises(Refused, match="live member"):
        book.join(0, "evil:1")
    with pytest.raises(Refused, match="live member"):
        book.join(0, "evil:1", "guessed-" + a.secret[8:])
    again = book.join(0, "h0:2", a.secret)
    assert again.session != a.session and again.secret == a.secret
    clock.now += 11  # silent past peer_timeout: a restart without its state may take it over
    book.tick()
    taken = book.join(0, "h0:3")
    assert taken.secret != a.secret and taken.joins == 3


def test_sample_counts_are_bounded_and_fixed() -> None:
    book, _, _ = make_book()
    a = book.join(0, "h0:1")
    with pytest.raises(Refused, match="training samples"):
        book.submit(a, 1, (1 << 63) - 1, upload(book))
    book.submit(a, 1, 10, upload(book))
    with pytest.raises(Refused, match="declared"):
        book.submit(a, 2, 11, upload(book))


def test_uploads_need_finite_values_within_the_norm_bound() -> None:
    book, _, _ = make_book(max_tensor_norm=100.0)
    a = book.join(0, "h0:1")
    bad = upload(book)
    bad["embedding.0.weight"] = bad["embedding.0.weight"] * 1e3
    with pytest.raises(Refused, match="L2 norm"):
        book.submit(a, 1, 10, bad)
    bad["embedding.0.weight"][0, 0] = np.nan
    with pytest.raises(Refused, match="NaN"):
        book.submit(a, 1, 10, bad)


def test_waits_end_at_the_callers_deadline_or_cancellation() -> None:
    import threading
    import time

    book, _, _ = make_book()
    a, b = book.join(0, "h0:1"), book.join(1, "h1:1")
    book.join(2, "h2:1")
    book.submit(a, 1, 10, upload(book))
    t0 = time.monotonic()
    with pytest.raises(Refused, match="did not close"):
        book.wait_outcome(a, 1, wait_seconds=0.2)
    assert time.monotonic() - t0 < 5
    cancelled = threading.Event()
    threading.Timer(0.2, lambda: (cancelled.set(), book.wake())).start()
    with pytest.raises(Refused, match="cancelled"):
        book.wait_outcome(a, 1, wait_seconds=60, cancelled=cancelled)
    with pytest.raises(Refused, match="not opened"):
        book.wait_outcome(b, 2)


def test_event_log_is_bounded() -> None:
    from fedmoe.coordinator.rounds import MAX_EVENTS

    book, _, _ = make_book()
    a = book.join(0, "h0:1")
    for _ in range(MAX_EVENTS + 50):
        a = book.join(0, "h0:1", a.secret)
    assert len(book.events) == MAX_EVENTS and book.events_dropped >= 50


def test_join_journal_restores_members_without_rewriting_the_state(tmp_path) -> None:
    from fedmoe.coordinator.checkpoint import CoordinatorCheckpoint

    config = make_config(peers=2, rounds=2, dataset="synthetic", embed_dim=4, num_experts=2)
    ckpt = CoordinatorCheckpoint(tmp_path)
    book = RoundBook(config, make_strategy(config), lambda r, recs: None, ckpt)
    ckpt.save_state(book)
    state_before = (tmp_path / "state.json").stat().st_mtime_ns
    a = book.join(0, "h0:1")
    b = book.join(1, "h1:1")
    assert (tmp_path / "state.json").stat().st_mtime_ns == state_before  # appended, not rewritten
    restored = RoundBook(config, make_strategy(config), lambda r, recs: None, ckpt)
    ckpt.restore(restored)
    assert restored.authenticate(b.session).peer_id == "peer-1"
    assert restored.join(0, "h0:2", a.secret).joins == 2  # the secret survives a restart


def test_result_senders_are_bounded_and_a_stalled_slot_does_not_stop_delivery(monkeypatch):
    """At most SENDERS result streams send at once; when every slot is held (readers that
    stopped reading), the next sender goes on without one after SENDER_WAIT_SECONDS."""
    import threading

    from fedmoe.coordinator import service as svc

    monkeypatch.setattr(svc, "SENDER_WAIT_SECONDS", 0.05)
    service = svc.CoordinatorService.__new__(svc.CoordinatorService)
    service._sending = threading.BoundedSemaphore(svc.SENDERS)
    held = [service._sender() for _ in range(svc.SENDERS)]
    for h in held:
        h.__enter__()
    assert not service._sending.acquire(blocking=False)  # every slot taken
    with service._sender():  # waits SENDER_WAIT_SECONDS, then sends without a slot
        pass
    assert not service._sending.acquire(blocking=False)  # and gave back no slot it never had
    for h in held:
        h.__exit__(None, None, None)
    for _ in range(svc.SENDERS):  # every held slot was returned
        assert service._sending.acquire(blocking=False)
