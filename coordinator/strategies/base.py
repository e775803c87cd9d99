"""The strategy interface: how the coordinator turns a round's uploads into what goes back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fedmoe.common.plan import (
    Term,  # shared with the peer (peer/expert_merge.py): see common/plan.py
)


@dataclass(frozen=True)
class PeerUpdate:
    peer_id: str
    num_samples: int
    tensors: dict[str, np.ndarray]


@dataclass
class RoundOutcome:
    # Tensors every peer receives (the averaged embedding, or the whole model for fedavg).
    shared: dict[str, np.ndarray] = field(default_factory=dict)
    sync: bool = False
    # peer_id -> own expert m -> terms (rows of the aggregation matrix A).
    plans: dict[str, dict[int, list[Term]]] = field(default_factory=dict)


# How a round's uploads of the shared part (tensors named `prefix`...) become one aggregate:
# FedAvg's sample-weighted mean by default, or a robust rule (coordinator/strategies/robust.py).
Combine = Callable[[list["PeerUpdate"], str], dict[str, np.ndarray]]


class Strategy(Protocol):
    def aggregate(self, round_: int, updates: list[PeerUpdate]) -> RoundOutcome: ...
