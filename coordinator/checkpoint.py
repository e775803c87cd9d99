"""Coordinator durability: the round book's state in `--state-dir`, written atomically.

Layout:
  state.json                    round counters, membership (with sessions: keep the dir private),
                                plans of the last closed rounds, pending metrics reports
  members.jsonl                 joins since state.json was written, one line each (appended and
                                fsynced: a Join never rewrites the whole state)
  shared-<round>.npz            the aggregate of a closed round (the embedding, or the whole model)
  updates/<round>/<peer>.npz    uploads of the open round, saved before they are acknowledged

Every file is written to a temporary name, fsynced and renamed, so a kill -9 at any instant leaves
either the old or the new version. Arrays are read back with `allow_pickle=False`.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from common.proto import pb
from coordinator.rounds import ClosedRound, Member, RoundBook
from coordinator.strategies import PeerUpdate, RoundOutcome, Term

STATE = "state.json"
MEMBERS = "members.jsonl"
NUM_SAMPLES = "__num_samples__"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


class CoordinatorCheckpoint:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        # Aggregates written by this process. A file left by an earlier process may belong to a
        # round that re-closed differently after a restart, so it is always written again.
        self._written: set[int] = set()

    def exists(self) -> bool:
        return (self.dir / STATE).is_file()

    def load_config(self) -> pb.RunConfig:
        state = json.loads((self.dir / STATE).read_text())
        return pb.RunConfig.FromString(base64.b64decode(state["config"]))

    # ------------------------------------------------------------------ Persistence protocol

    def save_update(self, round_: int, update: PeerUpdate) -> None:
        folder = self.dir / "updates" / str(round_)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {**update.tensors, NUM_SAMPLES: np.array(update.num_samples, dtype=np.int64)}
        _save_npz(folder / f"{update.peer_id}.npz", arrays)

    def drop_updates(self, round_: int) -> None:
        folder = self.dir / "updates" / str(round_)
        if folder.is_dir():
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()

    def save_member(self, member: Member) -> None:
        line = json.dumps(_member_to_dict(member), sort_keys=True) + "\n"
        fd = os.open(self.dir / MEMBERS, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def save_state(self, book: RoundBook) -> None:
        for r, closed in book.closed.items():
            if r not in self._written:
                _save_npz(self.dir / f"shared-{r}.npz", closed.outcome.shared)
                self._written.add(r)
        for old in self.dir.glob("shared-*.npz"):
            if int(old.stem.split("-")[1]) not in book.closed:
                old.unlink()
        state = {
            "version": 1,
            "config": base64.b64encode(book.cfg.SerializeToString()).decode(),
            "closed_round": book.closed_round,
            "reported_round": book.reported_round,
            "embedding_version": book.embedding_version,
            "members": [_member_to_dict(m) for m in book.members.values()],
            "participants": {str(r): p for r, p in book.participants.items()},
            "pending_reports": {str(r): v for r, v in book.pending_reports.items()},
            "closed": {
                str(r): {
                    "participants": c.participants,
                    "sync": c.outcome.sync,
                    "plans": {
                        peer: {
                            str(m): [[t.peer_id, t.expert, t.weight] for t in terms]
                            for m, terms in rows.items()
                        }
                        for peer, rows in c.outcome.plans.items()
                    },
                    "tickets": [[s, q, t] for (s, q), t in c.tickets.items()],
                }
                for r, c in book.closed.items()
            },
            "tensors_received": sorted(book.tensors_received),
            "events": list(book.events),
            "events_dropped": book.events_dropped,
        }
        data = json.dumps(state, sort_keys=True).encode()
        atomic_write(self.dir / STATE, lambda f: f.write(data))
        # Every member is in the new state: the journal of joins starts over.
        (self.dir / MEMBERS).unlink(missing_ok=True)

    # ------------------------------------------------------------------ resume

    def restore(self, book: RoundBook) -> None:
        """Load the last saved state into a fresh book (same config)."""
        state = json.loads((self.dir / STATE).read_text())
        now = book.clock()
        book.closed_round = state["closed_round"]
        book.reported_round = state["reported_round"]
        book.embedding_version = state["embedding_version"]
        members = list(state["members"])
        journal = self.dir / MEMBERS
        if journal.is_file():
            for line in journal.read_text().splitlines():
                try:
                    members.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by the crash: that join was never acknowledged
        for m in members:  # later lines win: a rejoin replaces the member's earlier record
            # Everyone gets a fresh peer_timeout to reconnect and heartbeat again.
            book.members[m["peer_id"]] = Member(
                m["peer_id"],
                m["index"],
                m["address"],
                m["session"],
                last_seen=now,
                alive=True,
                reported=set(m["reported"]),
                joins=m["joins"],
                secret_digest=m.get("secret_digest", ""),
                num_samples=m.get("num_samples", 0),
            )
        book.index_sessions()
        book.participants = {int(r): p for r, p in state["participants"].items()}
        book.pending_reports = {int(r): v for r, v in state["pending_reports"].items()}
        for r_str, c in state["closed"].items():
            r = int(r_str)
            outcome = RoundOutcome(
                shared=_load_npz(self.dir / f"shared-{r}.npz"),
                sync=c["sync"],
                plans={
                    peer: {
                        int(m): [Term(p, int(n), float(w)) for p, n, w in terms]
                        for m, terms in rows.items()
                    }
                    for peer, rows in c["plans"].items()
                },
            )
            tickets = {(s, q): t for s, q, t in c["tickets"]}
            book.closed[r] = ClosedRound(outcome, c["participants"], tickets, now)
        book.tensors_received = set(state["tensors_received"])
        book.events.extend(state["events"])
        book.events_dropped = state.get("events_dropped", 0)
        folder = self.dir / "updates" / str(book.closed_round + 1)
        if folder.is_dir():
            for f in sorted(folder.glob("*.npz")):
                arrays = _load_npz(f)
                n = int(arrays.pop(NUM_SAMPLES))
                book.updates[f.stem] = PeerUpdate(f.stem, n, arrays)
        book.round_opened_at = now
        book._event("coordinator restarted")


def _member_to_dict(m: Member) -> dict[str, Any]:
    return {
        "peer_id": m.peer_id,
        "index": m.index,
        "address": m.address,
        "session": m.session,
        "reported": sorted(m.reported),
        "joins": m.joins,
        "alive": m.alive,
        "secret_digest": m.secret_digest,
        "num_samples": m.num_samples,
    }
