"""MoE-FedAvg: the naive federated MoE that FedMoE-DA improves on (issue #10).

Every round each peer uploads its embedding and its M experts; the coordinator averages the
embedding and each expert slot-wise (expert m of every peer with expert m of every other, weighted
by sample counts, or combined by the robust rule of --aggregation / --clip-norm) and sends both
back. The gate is personal: never uploaded, never averaged. Slot m of one peer need not hold the
same domain as slot m of another; that mismatch is what FedMoE-DA's domain-aware plan addresses.
"""

from __future__ import annotations

from fedmoe.coordinator.strategies.base import Combine, PeerUpdate, RoundOutcome
from fedmoe.coordinator.strategies.fedavg import weighted_average

# What is averaged. Experts are named "experts.<m>.<param>", so a mean by name is slot-wise.
SHARED = ("embedding.", "experts.")


class MoEFedAvg:
    def __init__(self, combine: Combine = weighted_average) -> None:
        self.combine = combine

    def aggregate(self, round_: int, updates: list[PeerUpdate]) -> RoundOutcome:
        # The coordinator refuses gate uploads already (upload_prefixes); dropping anything else
        # here keeps a personal tensor out of the aggregate whatever reached us.
        shared = [
            PeerUpdate(
                u.peer_id,
                u.num_samples,
                {n: t for n, t in u.tensors.items() if n.startswith(SHARED)},
            )
            for u in updates
        ]
        # One combine over the whole upload: --clip-norm bounds an upload's change as a whole,
        # as for fedavg.
        return RoundOutcome(shared=self.combine(shared, ""))
