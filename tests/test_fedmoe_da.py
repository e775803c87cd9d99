"""Eq. 8-10 against small cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmoe.coordinator.rounds import serve_orders
from fedmoe.coordinator.strategies import FedMoEDA, PeerUpdate
from fedmoe.coordinator.strategies.fedmoe_da import aggregation_weights, correlation

S = 1 / math.sqrt(2)
# Four 2-d proxies: east, north-east, north, west.
PROXIES = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])


def softmax(values: list[float], tau: float) -> list[float]:
    e = [math.exp(v / tau) for v in values]
    return [x / sum(e) for x in e]


def test_correlation_is_cosine_with_unit_diagonal() -> None:
    r = correlation(PROXIES)
    expected = np.array(
        [[1, S, 0, -1], [S, 1, S, -S], [0, S, 1, 0], [-1, -S, 0, 1]], dtype=np.float64
    )
    np.testing.assert_allclose(r, expected, atol=1e-12)


def test_zero_proxy_correlates_only_with_itself() -> None:
    r = correlation(np.array([[0.0, 0.0], [1.0, 0.0]]))
    np.testing.assert_allclose(r, [[1, 0], [0, 1]])


def test_p1_keeps_ties_and_applies_softmax_over_kept_set() -> None:
    a = aggregation_weights(correlation(PROXIES), neighbors=1, temperature=0.5)
    # Row 0: values [1, S, 0, -1]; 2nd largest is S -> keep {0, 1}.
    np.testing.assert_allclose(a[0], [*softmax([1, S], 0.5), 0, 0])
    # Row 1: [S, 1, S, -S]; 2nd largest is S, tied twice -> keep {0, 1, 2}.
    w = softmax([S, 1, S], 0.5)
    np.testing.assert_allclose(a[1], [w[0], w[1], w[2], 0])
    # Row 3: [-1, -S, 0, 1]; 2nd largest is 0 -> keep {2, 3}.
    np.testing.assert_allclose(a[3], [0, 0, *softmax([0, 1], 0.5)])
    np.testing.assert_allclose(a.sum(axis=1), 1.0)


def test_p0_means_no_aggregation() -> None:
    # Even with an identical proxy (a tie at r = 1) P = 0 keeps only the expert itself.
    proxies = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    a = aggregation_weights(correlation(proxies), neighbors=0, temperature=0.1)
    np.testing.assert_allclose(a, np.eye(3))


@pytest.mark.parametrize("p", [3, 4, 100])
def test_p_at_least_pool_size_keeps_everything(p: int) -> None:
    r = correlation(PROXIES)
    a = aggregation_weights(r, neighbors=p, temperature=1.0)
    assert (a > 0).all()
    np.testing.assert_allclose(a[2], softmax(list(r[2]), 1.0))


def test_without_intra_peer_pairs_own_other_experts_are_excluded() -> None:
    owners = np.array([0, 0, 1, 1])
    a = aggregation_weights(correlation(PROXIES), 1, 0.5, owners=owners, intra_peer=False)
    # Row 0 may not pick expert 1 (same peer): candidates {0, 2, 3} -> keep {0, 2}.
    np.testing.assert_allclose(a[0], [*softmax([1, 0], 0.5)[:1], 0, softmax([1, 0], 0.5)[1], 0])
    assert a[1, 0] == 0


def test_strategy_builds_plans_and_serve_orders() -> None:
    # Two peers, two experts each; gate is d x M with the proxies as columns.
    updates = [
        PeerUpdate("peer-0", 10, {"gate.proxies": PROXIES[:2].T, "embedding.w": np.ones(2)}),
        PeerUpdate("peer-1", 30, {"gate.proxies": PROXIES[2:].T, "embedding.w": np.zeros(2)}),
    ]
    out = FedMoEDA(neighbors=1, temperature=0.5, sync_every=1).aggregate(1, updates)
    assert out.sync
    np.testing.assert_allclose(out.shared["embedding.w"], [0.25, 0.25])  # sample-weighted
    assert "gate.proxies" not in out.shared  # the gate stays personal
    row = out.plans["peer-0"][1]  # pool index 1 keeps {0, 1, 2}
    assert [(t.peer_id, t.expert) for t in row] == [("peer-0", 0), ("peer-0", 1), ("peer-1", 0)]
    # peer-1: row 2 (north) keeps {1, 2} -> needs peer-0 expert 1; row 3 (west) keeps {2, 3}.
    assert serve_orders(out) == {"peer-1": {"peer-0": [0]}, "peer-0": {"peer-1": [1]}}


def test_non_sync_round_averages_embedding_only() -> None:
    updates = [PeerUpdate("peer-0", 1, {"embedding.w": np.ones(2)})]
    out = FedMoEDA(neighbors=1, temperature=0.5, sync_every=2).aggregate(1, updates)
    assert not out.sync and out.plans == {}


def test_min_term_weight_drops_light_terms_and_renormalises() -> None:
    """--min-term-weight: terms below the floor are left out of the plan (so never fetched) and
    the row sums to 1 again; 0 is Eq. 10 as is; the expert's own term always stays."""
    updates = [
        PeerUpdate("peer-0", 10, {"gate.proxies": PROXIES[:2].T, "embedding.w": np.ones(2)}),
        PeerUpdate("peer-1", 30, {"gate.proxies": PROXIES[2:].T, "embedding.w": np.zeros(2)}),
    ]
    full = FedMoEDA(neighbors=1, temperature=0.5, sync_every=1).aggregate(1, updates)
    row = full.plans["peer-0"][1]  # weights of (peer-0, 0), (peer-0, 1), (peer-1, 0)
    w = [t.weight for t in row]
    assert w[0] == w[2] < w[1]
    floor = (w[0] + w[1]) / 2  # between the light pair and the own term
    light = FedMoEDA(neighbors=1, temperature=0.5, sync_every=1, min_term_weight=floor)
    cut = light.aggregate(1, updates)
    assert [(t.peer_id, t.expert, t.weight) for t in cut.plans["peer-0"][1]] == [("peer-0", 1, 1.0)]
    for rows in cut.plans.values():
        for terms in rows.values():
            assert math.isclose(sum(t.weight for t in terms), 1.0)
    # Nothing light left to fetch: peer-1's expert 0 is no longer ordered for peer-0's row 1.
    assert ("peer-1", 0) not in {(t.peer_id, t.expert) for t in cut.plans["peer-0"][1]}
    # A floor above every foreign weight but not the own one keeps exactly the own terms.
    own_only = FedMoEDA(neighbors=1, temperature=0.5, sync_every=1, min_term_weight=0.5)
    for peer, rows in own_only.aggregate(1, updates).plans.items():
        for m, terms in rows.items():
            assert all(t.weight >= 0.5 or (t.peer_id, t.expert) == (peer, m) for t in terms)
