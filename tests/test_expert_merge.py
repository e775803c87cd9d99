"""Eq. 11 on the peer: weighted sums of snapshots, renormalised over what arrived."""

from __future__ import annotations

import torch

from fedmoe.peer.expert_merge import Term, merge_experts


def expert(m: int, value: float) -> dict[str, torch.Tensor]:
    return {
        f"experts.{m}.fc1.weight": torch.full((2, 2), value),
        f"experts.{m}.fc1.bias": torch.full((2,), value),
    }


def test_merge_uses_snapshots_and_weights() -> None:
    own = {0: expert(0, 1.0), 1: expert(1, 3.0)}
    fetched = {("peer-1", 0): expert(0, 10.0)}
    rows = {
        0: [Term("peer-0", 0, 0.5), Term("peer-0", 1, 0.25), Term("peer-1", 0, 0.25)],
        1: [Term("peer-0", 1, 1.0)],
    }
    merged, missing = merge_experts(rows, "peer-0", own, fetched)
    assert missing == []
    # Row 0 mixes the snapshot of expert 1 (3.0), not a value updated earlier in the loop.
    assert torch.allclose(merged[0]["experts.0.fc1.weight"], torch.full((2, 2), 0.5 + 0.75 + 2.5))
    assert torch.allclose(merged[1]["experts.1.fc1.bias"], torch.full((2,), 3.0))


def test_missing_source_is_dropped_and_weights_renormalised() -> None:
    own = {0: expert(0, 1.0)}
    rows = {0: [Term("peer-0", 0, 0.6), Term("peer-1", 0, 0.2), Term("peer-2", 0, 0.2)]}
    merged, missing = merge_experts(rows, "peer-0", own, {("peer-2", 0): expert(0, 5.0)})
    assert missing == [("peer-1", 0)]
    expected = (0.6 * 1.0 + 0.2 * 5.0) / 0.8
    assert torch.allclose(merged[0]["experts.0.fc1.weight"], torch.full((2, 2), expected))
