"""Robust rules for combining the members' uploads of the shared part (issue "hostile networks").

FedAvg's sample-weighted mean lets one dishonest member move the aggregate anywhere (huge values,
or all the weight through its sample count). The alternatives here bound that influence:

- `median`: coordinate-wise median of the uploads (unweighted; breaks down only past half).
- `trimmed-mean`: per coordinate, drop the `trim_fraction` largest and smallest values, average
  the rest (unweighted).
- `clip_norm` (any rule): each upload's change to the previous aggregate is scaled down to at most
  this L2 norm (over all its shared tensors together) before combining.
"""

from __future__ import annotations

import math

import numpy as np

from fedmoe.coordinator.strategies.base import PeerUpdate
from fedmoe.coordinator.strategies.fedavg import weighted_average


class RobustCombine:
    def __init__(self, rule: str = "mean", trim_fraction: float = 0.2, clip_norm: float = 0.0):
        if rule not in ("mean", "median", "trimmed-mean"):
            raise ValueError(f"unknown aggregation rule {rule!r}")
        self.rule = rule
        self.trim_fraction = trim_fraction
        self.clip_norm = clip_norm
        self._previous: dict[str, dict[str, np.ndarray]] = {}  # prefix -> last aggregate

    def __call__(self, updates: list[PeerUpdate], prefix: str) -> dict[str, np.ndarray]:
        if not updates:
            return {}
        names = [n for n in updates[0].tensors if n.startswith(prefix)]
        previous = self._previous.get(prefix)
        if self.clip_norm > 0 and previous is not None:
            updates = [self._clipped(u, names, previous) for u in updates]
        if self.rule == "mean":
            out = weighted_average(updates, prefix)
        else:
            out = {n: self._coordinatewise([u.tensors[n] for u in updates]) for n in names}
        self._previous[prefix] = out
        return out

    def _clipped(
        self, update: PeerUpdate, names: list[str], previous: dict[str, np.ndarray]
    ) -> PeerUpdate:
        deltas = {n: update.tensors[n].astype(np.float64) - previous[n] for n in names}
        norm = math.sqrt(sum(float(np.sum(d * d)) for d in deltas.values()))
        if norm <= self.clip_norm:
            return update
        scale = self.clip_norm / norm
        tensors = dict(update.tensors)
        for n, d in deltas.items():
            tensors[n] = (previous[n] + scale * d).astype(np.float32)
        return PeerUpdate(update.peer_id, update.num_samples, tensors)

    def _coordinatewise(self, arrays: list[np.ndarray]) -> np.ndarray:
        stacked = np.stack([a.astype(np.float64) for a in arrays])
        if self.rule == "median":
            return np.median(stacked, axis=0).astype(np.float32)
        cut = int(self.trim_fraction * len(arrays))
        kept = np.sort(stacked, axis=0)[cut : len(arrays) - cut]
        return kept.mean(axis=0).astype(np.float32)
