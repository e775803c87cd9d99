"""The aggregation plan both sides speak of: one term of Eq. 11, a source expert and its weight.

The coordinator's strategies compute plans out of these (coordinator/strategies/) and the peer
carries them out (peer/expert_merge.py). It lives in common/, which both sides import anyway
(the wire messages, the run config), so that neither side imports the other's code: a peer host
does not load the coordinator, and the coordinator does not load torch through the peer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Term:
    """One source expert of Eq. 11 and its weight: own expert m += weight * (peer_id, expert)."""

    peer_id: str
    expert: int
    weight: float
