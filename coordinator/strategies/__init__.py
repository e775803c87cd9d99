"""Aggregation strategies, one per file, behind `Strategy.aggregate(round, updates)`."""

from __future__ import annotations

from fedmoe.common.proto import pb
from fedmoe.coordinator.strategies.base import PeerUpdate, RoundOutcome, Strategy, Term
from fedmoe.coordinator.strategies.fedavg import FedAvg, Local
from fedmoe.coordinator.strategies.fedmoe_da import FedMoEDA
from fedmoe.coordinator.strategies.moe_fedavg import MoEFedAvg
from fedmoe.coordinator.strategies.robust import RobustCombine


def make_strategy(cfg: pb.RunConfig) -> Strategy:
    combine = RobustCombine(cfg.aggregation or "mean", cfg.trim_fraction, cfg.clip_norm)
    if cfg.algorithm == pb.FEDMOE_DA:
        return FedMoEDA(
            cfg.neighbors,
            cfg.temperature,
            cfg.sync_every,
            cfg.intra_peer,
            combine,
            min_term_weight=cfg.min_term_weight,
        )
    if cfg.algorithm == pb.FEDAVG:
        return FedAvg(combine)
    if cfg.algorithm == pb.MOE_FEDAVG:
        return MoEFedAvg(combine)
    return Local()


__all__ = [
    "FedAvg",
    "FedMoEDA",
    "Local",
    "MoEFedAvg",
    "RobustCombine",
    "PeerUpdate",
    "RoundOutcome",
    "Strategy",
    "Term",
]
