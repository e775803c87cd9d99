"""The run directory: config.json, metrics.jsonl (one record per peer per round), summary.json."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from fedmoe.common.accounting import bytes_moved
from fedmoe.common.atomic import atomic_write_json as write_json
from fedmoe.common.config import algorithm_name, config_to_dict
from fedmoe.common.proto import pb


def strict(data: Any) -> Any:
    """Make data strict JSON: a non-finite float (never expected: reports are range-checked)
    becomes null rather than the `NaN`/`Infinity` that strict parsers reject."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: strict(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict(v) for v in data]
    return data


def atomic_write_json(path: Path, data: Any) -> None:
    write_json(path, strict(data))


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


class RunResults:
    def __init__(
        self,
        out_dir: Path,
        cfg: pb.RunConfig,
        progress: TextIO = sys.stdout,
        resume_after: int | None = None,
    ) -> None:
        """`resume_after=R`: continue a run whose rounds 1..R are written (coordinator restart)."""
        self.out_dir = out_dir
        self.cfg = cfg
        self.progress = progress
        self.records: list[dict[str, Any]] = []
        self.started = time.time()
        out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = out_dir / "metrics.jsonl"
        if resume_after is None:
            self.metrics_path.write_text("")
            atomic_write_json(out_dir / "config.json", config_to_dict(cfg))
            return
        # Keep what the checkpoint says is complete; a round written after the last checkpoint
        # is dropped here and written again from the checkpoint's pending reports.
        if self.metrics_path.is_file():
            for line in self.metrics_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the crash
                if rec.get("round", 0) <= resume_after:
                    self.records.append(rec)
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records))
        os.replace(tmp, self.metrics_path)

    def write_round(self, round_: int, records: list[dict[str, Any]]) -> None:
        with open(self.metrics_path, "a") as f:
            for rec in records:
                f.write(json.dumps(strict(rec), sort_keys=True, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.extend(records)
        n = len(records)
        acc = sum(r["accuracy"] for r in records) / n
        gacc = sum(r["global_accuracy"] for r in records) / n
        moved = bytes_moved(r["bytes"] for r in records)
        coord, p2p = moved["coordinator"], moved["p2p"]
        secs = max(r["seconds"] for r in records)
        print(
            f"[{algorithm_name(self.cfg)}] round {round_}/{self.cfg.rounds}  "
            f"acc {acc:.4f}  global {gacc:.4f}  coordinator {_mb(coord)}  p2p {_mb(p2p)}  "
            f"{secs:.1f} s",
            file=self.progress,
            flush=True,
        )

    def summary(self, extra: dict[str, Any]) -> dict[str, Any]:
        final = [r for r in self.records if r["round"] == self.cfg.rounds]
        totals = {
            "coordinator_sent": 0,
            "coordinator_received": 0,
            "p2p_sent": 0,
            "p2p_received": 0,
        }
        for rec in self.records:
            for key in totals:
                totals[key] += rec["bytes"][key]

        def mean(key: str) -> float | None:
            return sum(r[key] for r in final) / len(final) if final else None

        def mean_present(key: str) -> float | None:
            values = [r[key] for r in final if r.get(key) is not None]
            return sum(values) / len(values) if values else None

        return {
            "algorithm": algorithm_name(self.cfg),
            "peers": self.cfg.peers,
            "rounds": self.cfg.rounds,
            "rounds_completed": max((r["round"] for r in self.records), default=0),
            "dataset": self.cfg.dataset,
            "run_id": self.cfg.run_id,
            "final_accuracy_mean": mean("accuracy"),
            "final_global_accuracy_mean": mean("global_accuracy"),
            # None when the run has no validation split (val_fraction 0)
            "final_val_accuracy_mean": mean_present("val_accuracy"),
            "final_accuracy_by_peer": {r["peer"]: r["accuracy"] for r in final},
            "bytes": bytes_moved([totals]),
            "bytes_by_direction": totals,
            "bytes_note": (
                "application bytes: protobuf-serialized size of every gRPC message, each message "
                "once (coordinator: sent plus received of every peer; p2p: what the peers sent, "
                "which bytes_by_direction.p2p_received counts again at the receiving end)"
            ),
            "seconds": round(time.time() - self.started, 3),
            "config": config_to_dict(self.cfg),
            **extra,
        }

    def write_summary(self, extra: dict[str, Any]) -> dict[str, Any]:
        data = self.summary(extra)
        atomic_write_json(self.out_dir / "summary.json", data)
        return data
