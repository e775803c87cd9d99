"""Robust aggregation rules: one dishonest upload cannot move the aggregate far."""

from __future__ import annotations

import numpy as np
import pytest

from fedmoe.coordinator.strategies import PeerUpdate, RobustCombine
from fedmoe.coordinator.strategies.fedavg import weighted_average


def updates(values: list[float], samples: list[int] | None = None) -> list[PeerUpdate]:
    samples = samples or [10] * len(values)
    return [
        PeerUpdate(f"peer-{i}", n, {"embedding.w": np.full((2, 3), v, np.float32)})
        for i, (v, n) in enumerate(zip(values, samples, strict=True))
    ]


def test_mean_is_fedavg() -> None:
    ups = updates([1.0, 2.0, 4.0], [1, 1, 2])
    out = RobustCombine("mean")(ups, "embedding.")
    np.testing.assert_allclose(
        out["embedding.w"], weighted_average(ups, "embedding.")["embedding.w"]
    )
    assert out["embedding.w"][0, 0] == pytest.approx(2.75)


def test_median_and_trimmed_mean_ignore_one_outlier() -> None:
    ups = updates([1.0, 1.1, 0.9, 1.05, 1e6])
    assert RobustCombine("median")(ups, "embedding.")["embedding.w"][0, 0] == pytest.approx(1.05)
    trimmed = RobustCombine("trimmed-mean", trim_fraction=0.2)(ups, "embedding.")
    assert trimmed["embedding.w"][0, 0] == pytest.approx((1.0 + 1.1 + 1.05) / 3)
    assert RobustCombine("mean")(ups, "embedding.")["embedding.w"][0, 0] > 1e5  # FedAvg is not


def test_clip_norm_bounds_each_change_to_the_previous_aggregate() -> None:
    combine = RobustCombine("mean", clip_norm=1.0)
    combine(updates([0.0, 0.0]), "embedding.")  # the first aggregate: the reference
    out = combine(updates([0.0, 100.0]), "embedding.")
    # peer-1's change (norm 100 * sqrt(6)) is scaled to norm 1: each entry 1/sqrt(6), halved
    assert out["embedding.w"][0, 0] == pytest.approx(0.5 / np.sqrt(6), rel=1e-5)


def test_unknown_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown aggregation"):
        RobustCombine("mode")
