"""Peer durability: the model after each completed round, in the peer's own `--state-dir`,
and the member secret that proves a restarted peer is the member that first took its index.

Written atomically (common/atomic.py: temporary file, fsync, rename); read with `weights_only=True`, which loads
tensors and plain containers only. A checkpoint of another run (different run id) is ignored.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedmoe.common.atomic import atomic_write, atomic_write_bytes
from fedmoe.common.auth import MAX_SECRET_CHARS


class PeerCheckpoint:
    def __init__(self, state_dir: Path, index: int) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / f"peer-{index}.pt"

    def save(self, run_id: str, round_: int, model: torch.nn.Module) -> None:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        data = {"run_id": run_id, "round": round_, "model": state}
        atomic_write(self.path, lambda f: torch.save(data, f))

    def load(self, run_id: str) -> tuple[int, dict[str, torch.Tensor]] | None:
        if not self.path.is_file():
            return None
        data = torch.load(self.path, map_location="cpu", weights_only=True)
        if data.get("run_id") != run_id:
            return None
        return int(data["round"]), data["model"]


# A member secret is a short token from the coordinator; anything longer is not one of ours.


class MemberSecret:
    """`<state-dir>/member-<index>.secret`: the JoinReply.member_secret, readable by us only."""

    def __init__(self, state_dir: Path, index: int) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / f"member-{index}.secret"

    def load(self) -> str:
        """The saved secret, or "" when there is none (a first join)."""
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return ""
        return text if 0 < len(text) <= MAX_SECRET_CHARS and text.isprintable() else ""

    def save(self, secret: str) -> None:
        # Created 0600 from the start (never briefly readable by others), fsynced, then renamed
        # over the old one, so that a crash leaves either the old secret or the new one.
        atomic_write_bytes(self.path, (secret + "\n").encode(), mode=0o600)


# Peer indices are at most 1023 (fedmoe/cli.py MAX_INDEX); four digits cover them.
MAX_INDEX_DIGITS = 4


class AssignedIndex:
    """`<state-dir>/assigned-index`: the index the coordinator gave an `--index auto` peer.

    With it (and `member-K.secret` beside it) a restarted auto peer rejoins as the same member.
    One auto peer per state dir: two sharing one would claim the same member.
    """

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "assigned-index"

    def load(self) -> int | None:
        """The saved index; None when there is none (a first join) or it is not an index."""
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"peer: cannot read {self.path}: {e}") from e
        if not (text.isascii() and text.isdigit() and len(text) <= MAX_INDEX_DIGITS):
            raise SystemExit(
                f"peer: {self.path} holds {text[:20]!r}, not a peer index: remove it to join "
                "as a new member"
            )
        return int(text)

    def save(self, index: int) -> None:
        atomic_write_bytes(self.path, f"{index}\n".encode(), mode=0o600)
