"""`--tensorboard DIR`: the coordinator's per-round scalars as TensorBoard event files.

Written as each round's records reach metrics.jsonl and flushed at once, so that
`tensorboard --logdir DIR` follows a live run. The numbers are the records' own:

- accuracy/mean, accuracy/peer-K, global_accuracy/mean, global_accuracy/peer-K
- bytes/coordinator = sum of coordinator_sent + coordinator_received over the round's reports
- bytes/p2p = sum of p2p_sent (each expert byte counted once: by its sender)
- round_seconds (the slowest peer's round), phase_seconds/PHASE (mean over the reports)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedmoe.common.accounting import PHASES


def round_scalars(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The scalars of one round's records (one per reporting peer), by tag."""
    n = len(records)
    out: dict[str, float] = {
        "accuracy/mean": sum(r["accuracy"] for r in records) / n,
        "global_accuracy/mean": sum(r["global_accuracy"] for r in records) / n,
        "bytes/coordinator": float(
            sum(
                r["bytes"]["coordinator_sent"] + r["bytes"]["coordinator_received"] for r in records
            )
        ),
        "bytes/p2p": float(sum(r["bytes"]["p2p_sent"] for r in records)),
        "round_seconds": max(float(r["seconds"]) for r in records),
    }
    for rec in records:
        out[f"accuracy/{rec['peer']}"] = rec["accuracy"]
        out[f"global_accuracy/{rec['peer']}"] = rec["global_accuracy"]
    # A phase a peer did not run this round took it no time.
    ran = {p for r in records for p in (r.get("phase_seconds") or {})}
    for phase in (p for p in PHASES if p in ran):
        total = sum(float((r.get("phase_seconds") or {}).get(phase, 0.0)) for r in records)
        out[f"phase_seconds/{phase}"] = total / n
    return out


class RoundBoard:
    """One SummaryWriter for the run; `write_round` after each round's records are written."""

    def __init__(self, logdir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(logdir))

    def write_round(self, round_: int, records: Sequence[Mapping[str, Any]]) -> None:
        if not records:
            return
        for tag, value in round_scalars(records).items():
            self.writer.add_scalar(tag, value, global_step=round_)
        self.writer.flush()  # live: a round's scalars show up when the round is written

    def close(self) -> None:
        self.writer.close()
