"""FedAvg: sample-weighted mean of whatever the peers uploaded (McMahan et al., 2017)."""

from __future__ import annotations

import numpy as np

from fedmoe.coordinator.strategies.base import Combine, PeerUpdate, RoundOutcome


def weighted_average(updates: list[PeerUpdate], prefix: str = "") -> dict[str, np.ndarray]:
    """Mean of every tensor whose name starts with `prefix`, weighted by sample counts."""
    if not updates:
        return {}
    total = sum(u.num_samples for u in updates)
    if total <= 0:
        raise ValueError("cannot average: no peer reported any training samples")
    names = [n for n in updates[0].tensors if n.startswith(prefix)]
    out = {}
    for name in names:
        acc = np.zeros(updates[0].tensors[name].shape, dtype=np.float64)
        for u in updates:
            acc += (u.num_samples / total) * u.tensors[name].astype(np.float64)
        out[name] = acc.astype(np.float32)
    return out


class FedAvg:
    """The whole MoE (embedding, gate, experts) averaged through the coordinator."""

    def __init__(self, combine: Combine = weighted_average) -> None:
        self.combine = combine

    def aggregate(self, round_: int, updates: list[PeerUpdate]) -> RoundOutcome:
        return RoundOutcome(shared=self.combine(updates, ""))


class Local:
    """No communication: each peer trains alone (the lower baseline)."""

    def aggregate(self, round_: int, updates: list[PeerUpdate]) -> RoundOutcome:
        return RoundOutcome()
