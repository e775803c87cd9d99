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

import numpy as np

from fedmoe.common.atomic import atomic_write
from fedmoe.common.proto import pb
from fedmoe.coordinator.membership import Member
from fedmoe.coordinator.rounds import RoundBook
from fedmoe.coordinator.strategies import PeerUpdate

STATE = "state.json"
MEMBERS = "members.jsonl"
NUM_SAMPLES = "__num_samples__"


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
        line = json.dumps(member.to_dict(), sort_keys=True) + "\n"
        fd = os.open(self.dir / MEMBERS, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def save_state(self, book: RoundBook) -> None:
        shared = book.closed_shared()
        for r, arrays in shared.items():
            if r not in self._written:
                _save_npz(self.dir / f"shared-{r}.npz", arrays)
                self._written.add(r)
        for old in self.dir.glob("shared-*.npz"):
            if int(old.stem.split("-")[1]) not in shared:
                old.unlink()
        state = {
            "version": 2,
            "config": base64.b64encode(book.cfg.SerializeToString()).decode(),
            **book.snapshot(),
        }
        data = json.dumps(state, sort_keys=True).encode()
        atomic_write(self.dir / STATE, lambda f: f.write(data))
        # Every member is in the new state: the journal of joins starts over.
        (self.dir / MEMBERS).unlink(missing_ok=True)

    # ------------------------------------------------------------------ resume

    def restore(self, book: RoundBook) -> None:
        """Load the last saved state into a fresh book (same config)."""
        state = json.loads((self.dir / STATE).read_text())
        joined: list[dict] = []
        journal = self.dir / MEMBERS
        if journal.is_file():
            for line in journal.read_text().splitlines():
                try:
                    joined.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by the crash: that join was never acknowledged
        shared = {int(r): _load_npz(self.dir / f"shared-{r}.npz") for r in state["closed"]}
        updates = {}
        folder = self.dir / "updates" / str(state["closed_round"] + 1)
        if folder.is_dir():
            for f in sorted(folder.glob("*.npz")):
                arrays = _load_npz(f)
                n = int(arrays.pop(NUM_SAMPLES))
                updates[f.stem] = PeerUpdate(f.stem, n, arrays)
        book.restore(state, shared, updates, joined)
