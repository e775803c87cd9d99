"""The block-wise Eq. 8-10 plan against the dense reference, ties and edge cases included."""

from __future__ import annotations

import numpy as np
import pytest

from fedmoe.coordinator.strategies import FedMoEDA, PeerUpdate
from fedmoe.coordinator.strategies.fedmoe_da import (
    POP_LIMIT,
    _blas_single_thread,
    _pool,
    aggregation_weights,
    correlation,
    plan_blockwise,
)

# One row, smaller than K and not dividing it, the cosine tile (64) and across tiles, all at once.
BLOCKS = [1, 2, 3, 7, 64, 100, None, 10_000]


def dense(proxies: np.ndarray, p: int, tau: float, owners: np.ndarray, intra: bool) -> np.ndarray:
    return aggregation_weights(correlation(proxies), p, tau, owners, intra)


def assert_same_plan(
    proxies: np.ndarray, p: int, tau: float, owners: np.ndarray, intra: bool
) -> None:
    ref = dense(proxies, p, tau, owners, intra)
    for block in BLOCKS:
        got = plan_blockwise(proxies, p, tau, owners, intra, block)
        a = got.to_dense()
        # Same kept sets exactly (that is where ties matter), weights to rounding.
        np.testing.assert_array_equal(a > 0, ref > 0, err_msg=f"P={p} block={block}")
        np.testing.assert_allclose(a, ref, rtol=1e-12, atol=0)
        np.testing.assert_allclose(np.add.reduceat(got.weights, got.indptr[:-1]), 1.0)
        for k in range(len(ref)):  # columns ascending within every row, as flatnonzero
            cols, _ = got.row(k)
            np.testing.assert_array_equal(cols, np.flatnonzero(ref[k]))


def tie_heavy(rng: np.random.Generator, k: int, d: int) -> np.ndarray:
    """Duplicates, scaled copies (same direction), zero proxies and integer grids (exact ties
    between different directions)."""
    p = rng.integers(-2, 3, size=(k, d)).astype(np.float64)
    p[::4] = p[0]
    p[1::5] = 3.0 * p[1]
    p[2::7] = 0.0
    return p


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("intra", [True, False])
def test_blockwise_equals_dense_with_ties(seed: int, intra: bool) -> None:
    rng = np.random.default_rng(seed)
    k = 23
    proxies = tie_heavy(rng, k, 3)
    # Uneven peers (1 to 5 experts) so that rows have different candidate counts.
    owners = np.sort(rng.integers(0, 7, size=k))
    for p in [0, 1, 2, 5, k - 2, k - 1, k, k + 5, POP_LIMIT - 1, POP_LIMIT, POP_LIMIT + 1]:
        assert_same_plan(proxies, p, 0.1, owners, intra)


@pytest.mark.parametrize("intra", [True, False])
def test_blockwise_equals_dense_with_ties_over_several_tiles(intra: bool) -> None:
    rng = np.random.default_rng(9)
    proxies = tie_heavy(rng, 150, 4)
    owners = np.repeat(np.arange(30), 5)
    for p in [1, 3, 20]:
        assert_same_plan(proxies, p, 0.1, owners, intra)


@pytest.mark.parametrize("intra", [True, False])
def test_blockwise_equals_dense_random(intra: bool) -> None:
    rng = np.random.default_rng(7)
    proxies = rng.standard_normal((60, 5))
    owners = np.repeat(np.arange(15), 4)
    for p in [0, 1, 3, 20, 59, 100]:
        assert_same_plan(proxies, p, 0.5, owners, intra)


def test_identical_and_zero_pools() -> None:
    owners = np.repeat(np.arange(3), 2)
    for proxies in (np.ones((6, 4)), np.zeros((6, 4))):
        for p in [0, 1, 2, 5, 9]:
            assert_same_plan(proxies, p, 0.1, owners, True)
            assert_same_plan(proxies, p, 0.1, owners, False)
    # All identical: every row is one big tie, so P = 1 keeps the whole pool, uniformly.
    a = plan_blockwise(np.ones((6, 4)), 1, 0.1, owners).to_dense()
    np.testing.assert_allclose(a, np.full((6, 6), 1 / 6))
    # All zero: cosines are 0 off the diagonal, 1 on it; P = 1 keeps every tie at 0 too.
    a = plan_blockwise(np.zeros((6, 4)), 1, 1.0, owners).to_dense()
    e = np.exp(-1.0)
    np.testing.assert_allclose(np.diag(a), 1 / (1 + 5 * e))


def test_sharp_temperature_drops_underflowed_weights_like_the_dense_plan() -> None:
    proxies = np.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.1]])
    ref = dense(proxies, 5, 1e-3, np.arange(3), True)
    assert (ref == 0).any()  # exp(-2 / 1e-3) underflows to 0
    assert_same_plan(proxies, 5, 1e-3, np.arange(3), True)


@pytest.mark.parametrize("k", [101, 1500])  # 1500: big enough for OpenBLAS to use threads
def test_block_cosines_match_the_dense_correlation_bit_for_bit(k: int) -> None:
    # What the block-wise plan rests on: a row's cosines do not depend on its block (BLAS alone
    # does not promise it: gemv for one row, edge tiles and small products sum in other orders).
    rng = np.random.default_rng(3)
    proxies = rng.standard_normal((k, 16))
    pool = _pool(proxies)
    full = correlation(proxies)
    with _blas_single_thread():
        for block in (1, 3, 8, 64, 131, 200):
            for start in range(0, k, block):
                stop = min(start + block, k)
                np.testing.assert_array_equal(pool.cosines(start, stop), full[start:stop])


def test_correlation_is_symmetric_with_exact_ties_for_duplicates() -> None:
    rng = np.random.default_rng(5)
    proxies = rng.standard_normal((40, 9))
    proxies[10] = proxies[3]
    proxies[20] = 4.0 * proxies[3]  # a power of two scales exactly: the same unit vector
    r = correlation(proxies)
    np.testing.assert_array_equal(np.diag(r), 1.0)
    others = np.setdiff1d(np.arange(40), [3, 10, 20])
    np.testing.assert_array_equal(r[3, others], r[10, others])
    np.testing.assert_array_equal(r[3, others], r[20, others])
    np.testing.assert_array_equal(r[others, 3], r[others, 20])


def test_argument_checks() -> None:
    p = np.ones((4, 2))
    with pytest.raises(ValueError, match="temperature"):
        plan_blockwise(p, 1, 0.0)
    with pytest.raises(ValueError, match="owners"):
        plan_blockwise(p, 1, 0.1, intra_peer=False)
    with pytest.raises(ValueError, match="block_rows"):
        plan_blockwise(p, 1, 0.1, block_rows=0)


def test_thousand_peers_by_eight_experts_plan_runs() -> None:
    rng = np.random.default_rng(0)
    n, m, d = 1000, 8, 16
    updates = [
        PeerUpdate(
            f"peer-{i}",
            10,
            {
                "gate.proxies": rng.standard_normal((d, m)).astype(np.float32),
                "embedding.w": np.ones(2, dtype=np.float32),
            },
        )
        for i in range(n)
    ]
    out = FedMoEDA(neighbors=2, temperature=0.1, sync_every=1).aggregate(1, updates)
    assert len(out.plans) == n
    for rows in (out.plans["peer-0"], out.plans["peer-999"]):
        assert sorted(rows) == list(range(m))
        for terms in rows.values():
            assert len(terms) >= 1  # itself; 3 unless a tie adds more
            assert abs(sum(t.weight for t in terms) - 1.0) < 1e-9
    own = out.plans["peer-5"][3]
    assert ("peer-5", 3) in [(t.peer_id, t.expert) for t in own]
