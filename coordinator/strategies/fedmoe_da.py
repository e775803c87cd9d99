"""FedMoE-DA: domain-aware fine-grained expert aggregation (DESIGN.md §1.2, Eq. 8-11).

The coordinator averages the embedding (FedAvg) every round and, on sync rounds, turns the gate
proxies into each peer's plan: which experts (peer, index) to mix into each of its own experts and
with what weight. The experts themselves never come here; peers fetch them from each other.
"""

from __future__ import annotations

import numpy as np

from coordinator.strategies.base import Combine, PeerUpdate, RoundOutcome, Term
from coordinator.strategies.fedavg import weighted_average

GATE = "gate.proxies"


def correlation(proxies: np.ndarray) -> np.ndarray:
    """Eq. 8: cosine similarity of every pair of proxies (rows of `proxies`, K x d).

    A zero proxy has no direction: its cosine with others is 0. The diagonal is exactly 1 so that
    an expert always selects itself despite rounding.
    """
    norms = np.linalg.norm(proxies, axis=1, keepdims=True)
    unit = np.divide(proxies, norms, out=np.zeros_like(proxies, dtype=np.float64), where=norms > 0)
    r = np.clip(unit @ unit.T, -1.0, 1.0)
    np.fill_diagonal(r, 1.0)
    return r


def aggregation_weights(
    r: np.ndarray,
    neighbors: int,
    temperature: float,
    owners: np.ndarray | None = None,
    intra_peer: bool = True,
) -> np.ndarray:
    """Eq. 9-10: the aggregation matrix A (K x K), each row summing to 1.

    Row k keeps every candidate whose correlation is at least the (P+1)-th largest of the row
    (ties kept, itself always in), then softmax(r / tau) over the kept set. P = 0 keeps only the
    expert itself (no aggregation). With `intra_peer=False` the candidates of row k exclude the
    other experts of k's own peer (`owners[k]`), the "no intra-peer pairs" ablation.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    k_total = r.shape[0]
    a = np.zeros_like(r, dtype=np.float64)
    for k in range(k_total):
        candidates = np.ones(k_total, dtype=bool)
        if not intra_peer:
            if owners is None:
                raise ValueError("owners are needed to exclude intra-peer pairs")
            candidates = owners != owners[k]
            candidates[k] = True
        keep = np.zeros(k_total, dtype=bool)
        keep[k] = True
        if neighbors > 0:
            values = np.sort(r[k, candidates])[::-1]
            threshold = values[min(neighbors, len(values) - 1)]
            keep |= candidates & (r[k] >= threshold)
        logits = r[k, keep] / temperature
        w = np.exp(logits - logits.max())
        a[k, keep] = w / w.sum()
    return a


class FedMoEDA:
    def __init__(
        self,
        neighbors: int,
        temperature: float,
        sync_every: int,
        intra_peer: bool = True,
        combine: Combine = weighted_average,
    ) -> None:
        self.combine = combine  # the embedding's aggregate (mean, or a robust rule)
        self.neighbors = neighbors
        self.temperature = temperature
        self.sync_every = sync_every
        self.intra_peer = intra_peer

    def aggregate(self, round_: int, updates: list[PeerUpdate]) -> RoundOutcome:
        outcome = RoundOutcome(shared=self.combine(updates, "embedding."))
        if round_ % self.sync_every != 0:
            return outcome
        outcome.sync = True
        # Pool of N*M proxies in peer order; gate is d x M, so its columns are the proxies.
        proxies = np.concatenate([u.tensors[GATE].T for u in updates]).astype(np.float64)
        num_experts = updates[0].tensors[GATE].shape[1]
        owners = np.repeat(np.arange(len(updates)), num_experts)
        a = aggregation_weights(
            correlation(proxies), self.neighbors, self.temperature, owners, self.intra_peer
        )
        for i, update in enumerate(updates):
            rows: dict[int, list[Term]] = {}
            for m in range(num_experts):
                row = a[i * num_experts + m]
                rows[m] = [
                    Term(
                        updates[int(k) // num_experts].peer_id, int(k) % num_experts, float(row[k])
                    )
                    for k in np.flatnonzero(row)
                ]
            outcome.plans[update.peer_id] = rows
        return outcome
