"""Peer durability: the model after each completed round, in the peer's own `--state-dir`.

Written atomically (temporary file, fsync, rename); read with `weights_only=True`, which loads
tensors and plain containers only. A checkpoint of another run (different run id) is ignored.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class PeerCheckpoint:
    def __init__(self, state_dir: Path, index: int) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / f"peer-{index}.pt"

    def save(self, run_id: str, round_: int, model: torch.nn.Module) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        with open(tmp, "wb") as f:
            torch.save({"run_id": run_id, "round": round_, "model": state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def load(self, run_id: str) -> tuple[int, dict[str, torch.Tensor]] | None:
        if not self.path.is_file():
            return None
        data = torch.load(self.path, map_location="cpu", weights_only=True)
        if data.get("run_id") != run_id:
            return None
        return int(data["round"]), data["model"]
