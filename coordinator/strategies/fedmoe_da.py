"""FedMoE-DA: domain-aware fine-grained expert aggregation (DESIGN.md §1.2, Eq. 8-11).

The coordinator averages the embedding (FedAvg) every round and, on sync rounds, turns the gate
proxies into each peer's plan: which experts (peer, index) to mix into each of its own experts and
with what weight. The experts themselves never come here; peers fetch them from each other.

The pool has K = N*M proxies. The production path (`plan_blockwise`) never holds the K x K
correlation: it walks the rows in blocks and keeps only each row's selected columns, so memory is
O(K * P) plus one block. `correlation` and `aggregation_weights` are the dense reference (Eq. 8-10
written as plainly as possible) that the tests hold the block-wise plan against.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from fedmoe.coordinator.strategies.base import Combine, PeerUpdate, RoundOutcome, Term
from fedmoe.coordinator.strategies.fedavg import weighted_average

try:  # installed with scikit-learn; without it BLAS keeps its default threads
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

GATE = "gate.proxies"
# Default block: about 2^20 correlations (8 MiB of float64) per block, whatever K is.
BLOCK_ELEMENTS = 1 << 20
# Rows of every BLAS product of cosines (see _Pool.cosines); default blocks are a multiple.
GEMM_ROWS = 64
# Up to this many neighbours the threshold is found by repeated row maxima, past it by partition.
POP_LIMIT = 16


@dataclass(frozen=True)
class _Pool:
    """Unit proxies prepared once per plan, shared by the dense and the block-wise path so that
    both compute every cosine with the very same operations (ties must stay ties)."""

    unique: np.ndarray  # U x d distinct unit proxies (U <= K)
    unique_t: np.ndarray  # d x U, C-contiguous: every product is a plain gemm (never syrk)
    inverse: np.ndarray | None  # K -> row of `unique`; None when there are no duplicates

    @property
    def size(self) -> int:
        return len(self.inverse) if self.inverse is not None else len(self.unique)

    def cosines(self, start: int, stop: int) -> np.ndarray:
        """Eq. 8 for pool rows start..stop-1 against the whole pool ((stop-start) x K), clipped
        to [-1, 1], the diagonal exactly 1.

        Row i's values must not depend on the block it is computed in (the dense reference is
        one big block), and BLAS does not promise that: gemv for one row, other kernels for small
        products or for the rows of an edge tile, each summing in its own order. So the products
        are always the same tiles: pool rows [64t, 64t + 64) (the last padded with zero rows)
        times d x U. Row i is always computed by the very same call on the very same data; a
        block not aligned to the tiles computes some tile rows it does not keep.
        """
        first = start // GEMM_ROWS * GEMM_ROWS
        last = -(-stop // GEMM_ROWS) * GEMM_ROWS
        pool_rows = np.arange(first, min(last, self.size))
        src = pool_rows if self.inverse is None else self.inverse[pool_rows]
        left = np.zeros((last - first, self.unique.shape[1]), dtype=np.float64)
        left[: len(src)] = self.unique[src]
        out = np.empty((last - first, self.unique_t.shape[1]), dtype=np.float64)
        for t in range(0, last - first, GEMM_ROWS):
            np.matmul(left[t : t + GEMM_ROWS], self.unique_t, out=out[t : t + GEMM_ROWS])
        block = out[start - first : stop - first]
        if self.inverse is not None:  # duplicates share one column: their ties are exact
            block = block[:, self.inverse]
        np.clip(block, -1.0, 1.0, out=block)
        block[np.arange(stop - start), np.arange(start, stop)] = 1.0  # itself, always selected
        return block


@contextmanager
def _blas_single_thread() -> Iterator[None]:
    """Run BLAS on one thread while planning (dense reference and block-wise alike).

    The coordinator's cores belong to gRPC; OpenBLAS' threads spin against them (a 1000 x 8
    plan took 0.6-1.35 s with the default threads on a loaded 2-core machine, 0.16-0.22 s on
    one). It also keeps the split of each product over threads out of the summation order.
    """
    if threadpool_limits is None:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _pool(proxies: np.ndarray) -> _Pool:
    p = np.asarray(proxies, dtype=np.float64)
    # Norms column by column: every row is summed in the same order, so identical proxies get
    # bit-identical unit vectors (a vectorised row reduction need not guarantee that).
    squares = np.zeros(p.shape[0], dtype=np.float64)
    for j in range(p.shape[1]):
        squares += p[:, j] * p[:, j]
    norms = np.sqrt(squares)[:, None]
    # A zero proxy has no direction: its unit vector is 0, so its cosine with others is 0.
    unit = np.divide(p, norms, out=np.zeros_like(p), where=norms > 0)
    unique, inverse = np.unique(unit, axis=0, return_inverse=True)
    if len(unique) == len(unit):
        unique, inv = unit, None  # no duplicates: keep pool order, skip the column gather
    else:
        inv = inverse.reshape(-1).astype(np.intp)
    return _Pool(unique, np.ascontiguousarray(unique.T), inv)


def correlation(proxies: np.ndarray) -> np.ndarray:
    """Eq. 8: cosine similarity of every pair of proxies (rows of `proxies`, K x d). Dense.

    A zero proxy has no direction: its cosine with others is 0. The diagonal is exactly 1 so that
    an expert always selects itself despite rounding.
    """
    pool = _pool(proxies)
    with _blas_single_thread():
        return pool.cosines(0, pool.size)


def aggregation_weights(
    r: np.ndarray,
    neighbors: int,
    temperature: float,
    owners: np.ndarray | None = None,
    intra_peer: bool = True,
) -> np.ndarray:
    """Eq. 9-10: the aggregation matrix A (K x K), each row summing to 1. Dense reference.

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


@dataclass(frozen=True)
class SparsePlan:
    """Rows of A in CSR form: row k's columns are indices[indptr[k]:indptr[k+1]] (ascending),
    with their weights; only non-zero weights are stored, as the dense rule's plan names them."""

    indptr: np.ndarray  # K + 1
    indices: np.ndarray
    weights: np.ndarray

    def row(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.indptr[k], self.indptr[k + 1]
        return self.indices[lo:hi], self.weights[lo:hi]

    def to_dense(self) -> np.ndarray:
        """K x K matrix, for tests on small pools only."""
        k_total = len(self.indptr) - 1
        a = np.zeros((k_total, k_total), dtype=np.float64)
        rows = np.repeat(np.arange(k_total), np.diff(self.indptr))
        a[rows, self.indices] = self.weights
        return a


def _select(values: np.ndarray, largest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 9 on a block: (rows, columns) of the entries at least row i's (largest[i]+1)-th
    largest (ties counted with multiplicity, as `sorted(row, reverse=True)[largest[i]]` in the
    dense rule), in row-major order with ascending columns. Excluded columns hold -inf: below
    every candidate, and largest[i] never reaches them. `values` is modified and restored.
    """
    top = int(largest.max())
    n = values.shape[1]
    threshold = np.empty(len(values), dtype=np.float64)
    if top >= POP_LIMIT:
        for rank in np.unique(largest):  # one value unless peers hold different numbers of experts
            sel = largest == rank
            kth = n - 1 - int(rank)  # ascending position of the (rank+1)-th largest
            threshold[sel] = np.partition(values[sel], kth, axis=1)[:, kth]
        rows, cols = np.nonzero(values >= threshold[:, None])
        return rows, cols
    # Small P: take the row maximum out top+1 times. Each pass is one sweep of the block, several
    # times cheaper than np.partition, and the popped entries are most of the kept set, which
    # spares a full np.nonzero sweep.
    local = np.arange(len(values))
    popped_cols = np.empty((top + 1, len(values)), dtype=np.intp)
    popped = np.empty((top + 1, len(values)), dtype=np.float64)
    for j in range(top + 1):
        popped_cols[j] = values.argmax(axis=1)
        popped[j] = values[local, popped_cols[j]]
        done = largest == j
        threshold[done] = popped[j, done]
        values[local, popped_cols[j]] = -np.inf
    # Entries tied with the threshold that were not popped are kept too.
    tied = np.flatnonzero(values.max(axis=1) >= threshold)
    tie_r, tie_c = np.nonzero(values[tied] >= threshold[tied, None])
    for j in range(top, -1, -1):  # backwards: a row that ran out popped one -inf twice
        values[local, popped_cols[j]] = popped[j]
    # Pops past a row's own rank are kept only if tied; an exhausted row's -inf pops never are.
    kept = popped >= threshold[None, :]
    rows = np.concatenate([np.broadcast_to(local, popped.shape)[kept], tied[tie_r]])
    cols = np.concatenate([popped_cols[kept], tie_c])
    order = np.lexsort((cols, rows))
    return rows[order], cols[order]


def _exclude_own_peer(
    block: np.ndarray,
    rows: np.ndarray,
    group_of: np.ndarray,
    group_size: np.ndarray,
    by_group: np.ndarray,
    group_start: np.ndarray,
) -> None:
    """Set row k's columns of the other experts of k's own peer to -inf, in place: below every
    threshold, so never kept (and their cosines are not needed afterwards). Works on the
    (row, column) pairs of the owners' groups, O(rows * M), never a rows x K mask."""
    sizes = group_size[group_of[rows]]
    pair_r = np.repeat(np.arange(len(rows)), sizes)
    offsets = np.arange(len(pair_r)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    pair_c = by_group[group_start[group_of[rows]][pair_r] + offsets]
    other = pair_c != rows[pair_r]  # itself stays a candidate
    block[pair_r[other], pair_c[other]] = -np.inf


def _select_rows(
    block: np.ndarray, rows: np.ndarray, neighbors: int, largest: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Kept (local row, column) pairs of a block, row-major with ascending columns."""
    if neighbors == 0:  # no aggregation: every expert keeps only itself
        return np.arange(len(rows)), rows
    return _select(block, largest[rows])


def plan_blockwise(
    proxies: np.ndarray,
    neighbors: int,
    temperature: float,
    owners: np.ndarray | None = None,
    intra_peer: bool = True,
    block_rows: int | None = None,
) -> SparsePlan:
    """Eq. 8-10 as `aggregation_weights(correlation(proxies), ...)`, without the K x K matrix.

    Rows are processed `block_rows` at a time (default: about BLOCK_ELEMENTS correlations per
    block); each row's threshold is its (P+1)-th largest candidate (see `_select`).
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if neighbors < 0:
        raise ValueError("neighbors must be non-negative")
    if not intra_peer and owners is None:
        raise ValueError("owners are needed to exclude intra-peer pairs")
    pool = _pool(proxies)
    k_total = pool.size
    if block_rows is None:
        block_rows = min(1024, BLOCK_ELEMENTS // max(k_total, 1)) // GEMM_ROWS * GEMM_ROWS
        block_rows = max(GEMM_ROWS, block_rows)
    if block_rows < 1:
        raise ValueError("block_rows must be positive")
    # Intra-peer exclusion: row k may not pick the other experts of its own peer. Group the pool
    # by owner once, so each block finds those (row, column) pairs in O(rows * M), not O(rows * K).
    exclude = not intra_peer and neighbors > 0
    group_of = np.zeros(k_total, dtype=np.intp)
    group_size = np.ones(1, dtype=np.intp)
    if exclude:
        _, inverse, group_size = np.unique(
            np.asarray(owners), return_inverse=True, return_counts=True
        )
        group_of = inverse.reshape(-1).astype(np.intp)
    by_group = np.argsort(group_of, kind="stable")
    group_start = np.concatenate([[0], np.cumsum(group_size)[:-1]])
    # Row k's threshold is its (largest[k]+1)-th largest candidate (Eq. 9, as the dense rule).
    largest = np.minimum(neighbors, k_total - group_size[group_of])

    indptr = np.zeros(k_total + 1, dtype=np.int64)
    indices_parts: list[np.ndarray] = []
    weight_parts: list[np.ndarray] = []
    with _blas_single_thread():
        for start in range(0, k_total, block_rows):
            stop = min(start + block_rows, k_total)
            rows = np.arange(start, stop)
            block = pool.cosines(start, stop)
            if exclude:
                _exclude_own_peer(block, rows, group_of, group_size, by_group, group_start)
            r_ix, c_ix = _select_rows(block, rows, neighbors, largest)
            # Softmax of r / tau over the kept set, as the dense rule (max first, then sum).
            logits = block[r_ix, c_ix] / temperature
            starts = np.concatenate([[0], np.cumsum(np.bincount(r_ix, minlength=len(rows)))[:-1]])
            w = np.exp(logits - np.maximum.reduceat(logits, starts)[r_ix])
            w /= np.add.reduceat(w, starts)[r_ix]
            nonzero = w > 0  # exp can underflow for a sharp tau: the dense plan drops those too
            indices_parts.append(c_ix[nonzero])
            weight_parts.append(w[nonzero])
            indptr[rows + 1] = np.bincount(r_ix[nonzero], minlength=len(rows))
    np.cumsum(indptr, out=indptr)
    return SparsePlan(
        indptr,
        np.concatenate(indices_parts) if indices_parts else np.zeros(0, dtype=np.intp),
        np.concatenate(weight_parts) if weight_parts else np.zeros(0, dtype=np.float64),
    )


def drop_light_terms(terms: list[Term], peer_id: str, expert: int, floor: float) -> list[Term]:
    """The row without terms weighing less than `floor`, renormalised to sum to 1; the expert's
    own term is always kept (it is the row's largest: cosine 1 with itself)."""
    kept = [t for t in terms if t.weight >= floor or (t.peer_id == peer_id and t.expert == expert)]
    total = sum(t.weight for t in kept)
    return [Term(t.peer_id, t.expert, t.weight / total) for t in kept]


class FedMoEDA:
    def __init__(
        self,
        neighbors: int,
        temperature: float,
        sync_every: int,
        intra_peer: bool = True,
        combine: Combine = weighted_average,
        min_term_weight: float = 0.0,
    ) -> None:
        self.combine = combine  # the embedding's aggregate (mean, or a robust rule)
        # Terms below this weight cost a whole expert's transfer for a negligible change: with
        # per-peer starts foreign terms weigh ~e^-10 at tau = 0.1 (docs/FIRST_SYNC.md).
        self.min_term_weight = min_term_weight
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
        plan = plan_blockwise(proxies, self.neighbors, self.temperature, owners, self.intra_peer)
        # Python objects only for the kept terms: O(K * P), never O(K^2).
        peer_ids = [u.peer_id for u in updates]
        source_peer = (plan.indices // num_experts).tolist()
        source_expert = (plan.indices % num_experts).tolist()
        weights = plan.weights.tolist()
        bounds = plan.indptr.tolist()
        for i, update in enumerate(updates):
            rows: dict[int, list[Term]] = {}
            for m in range(num_experts):
                k = i * num_experts + m
                rows[m] = [
                    Term(peer_ids[source_peer[t]], source_expert[t], weights[t])
                    for t in range(bounds[k], bounds[k + 1])
                ]
                if self.min_term_weight > 0:
                    rows[m] = drop_light_terms(rows[m], update.peer_id, m, self.min_term_weight)
            outcome.plans[update.peer_id] = rows
        return outcome
