"""The first-sync collapse (issue #10, docs/FIRST_SYNC.md) in one process.

The round loop of peer/runner.py without the network, built from the very same pieces
(build_model, LocalTrainer.train_round / expert_snapshot / load, FedMoEDA's plan,
merge_experts, weighted_average), so that variants compare quickly, one change at a time:

  python bench/first_sync.py --rounds 6 --seeds 0 1 2 3 4
  python bench/first_sync.py --rounds 6 --seeds 0 1 2 3 4 --set init=shared
  python bench/first_sync.py --rounds 6 --seeds 0 1 2 3 4 --set neighbors=0

Prints the mean personalised accuracy (over peers) after each round, per seed and averaged; with
--verbose also peer-0's plan at every sync: how many sources are other peers' experts of the same
index, the mean weight an expert keeps of itself, and the proxies' cosines.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from fedmoe.common.config import make_config
from fedmoe.common.data import clear_dataset_cache, load_peer_data
from fedmoe.common.plan import Term
from fedmoe.common.proto import pb
from fedmoe.coordinator.strategies.base import PeerUpdate
from fedmoe.coordinator.strategies.fedavg import weighted_average
from fedmoe.coordinator.strategies.fedmoe_da import FedMoEDA
from fedmoe.peer.expert_merge import merge_experts
from fedmoe.peer.trainer import LocalTrainer, build_model


def _value(text: str) -> object:
    if text in ("True", "False"):
        return text == "True"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _numpy(t: LocalTrainer, prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {n: v.numpy() for n, v in t.tensors(prefixes).items()}


def simulate(cfg: pb.RunConfig, verbose: bool = False) -> list[float]:
    """Mean personalised accuracy after each round, as the distributed run reports it."""
    trainers = []
    for i in range(cfg.peers):
        data = load_peer_data(
            cfg.dataset,
            cfg.data_dir or None,
            cfg.peers,
            i,
            cfg.alpha,
            cfg.seed,
            cache=True,
            val_fraction=cfg.val_fraction,  # as a peer does: the held-out rows are not trained on
        )
        trainers.append(LocalTrainer(build_model(cfg, data, i), data, cfg, "cpu", i))
    clear_dataset_cache()
    ids = [f"peer-{i}" for i in range(cfg.peers)]
    strategy = FedMoEDA(cfg.neighbors, cfg.temperature, cfg.sync_every, cfg.intra_peer)
    history = []
    for round_ in range(1, cfg.rounds + 1):
        for t in trainers:
            t.train_round(round_)
        if cfg.algorithm == pb.FEDAVG:
            whole = [
                PeerUpdate(ids[i], t.num_samples, _numpy(t, ("",))) for i, t in enumerate(trainers)
            ]
            shared = weighted_average(whole)
            for t in trainers:
                t.load({n: torch.from_numpy(v) for n, v in shared.items()})
        elif cfg.algorithm == pb.FEDMOE_DA:
            # Snapshots at the end of local training, as the peers publish them (Eq. 11).
            snapshots = [t.expert_snapshot() for t in trainers]
            updates = [
                PeerUpdate(ids[i], t.num_samples, _numpy(t, ("embedding.", "gate.")))
                for i, t in enumerate(trainers)
            ]
            outcome = strategy.aggregate(round_, updates)
            if outcome.sync:
                if verbose:
                    _describe(outcome.plans[ids[0]], ids[0], updates, cfg.num_experts)
                fetched = {
                    (ids[j], m): snapshots[j][m]
                    for j in range(cfg.peers)
                    for m in range(cfg.num_experts)
                }
                for i, t in enumerate(trainers):
                    merged, _ = merge_experts(outcome.plans[ids[i]], ids[i], snapshots[i], fetched)
                    t.load({n: v for p in merged.values() for n, v in p.items()})
            for t in trainers:  # merge, then the embedding: the runner's order
                t.load({n: torch.from_numpy(v) for n, v in outcome.shared.items()})
        history.append(statistics.mean(t.evaluate(t.data.local_test) for t in trainers))
    return history


def _describe(
    rows: dict[int, list[Term]], self_id: str, updates: list[PeerUpdate], num_experts: int
) -> None:
    foreign = [(m, t) for m, terms in rows.items() for t in terms if t.peer_id != self_id]
    namesakes = sum(t.expert == m for m, t in foreign)
    keeps = [
        t.weight for m, ts in rows.items() for t in ts if t.peer_id == self_id and t.expert == m
    ]
    g = np.concatenate([u.tensors["gate.proxies"].T for u in updates]).astype(np.float64)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    cos = g @ g.T
    n = len(updates)
    same = [
        cos[a * num_experts + m, b * num_experts + m]
        for a in range(n)
        for b in range(n)
        if a != b
        for m in range(num_experts)
    ]
    print(
        f"   {self_id}'s plan: {len(foreign)} sources on other peers, {namesakes} of them "
        f"namesakes (same index); mean self weight {np.mean(keeps):.3f}; cosine of namesakes "
        f"across peers {np.mean(same):.4f}",
        flush=True,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description="FedMoE-DA's first sync, in one process")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--set", action="append", default=[], help="config field=value (repeatable)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    overrides: dict[str, object] = {"rounds": args.rounds}
    for kv in args.set:
        key, value = kv.split("=", 1)
        overrides[key] = _value(value)
    per_round: list[list[float]] = []
    for seed in args.seeds:
        hist = simulate(make_config(**{**overrides, "seed": seed}), args.verbose)
        per_round.append(hist)
        print(f"seed {seed}: " + " ".join(f"{a:.3f}" for a in hist), flush=True)
    means = [statistics.mean(col) for col in zip(*per_round, strict=True)]
    print("mean:   " + " ".join(f"{a:.3f}" for a in means))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
