"""The run configuration: defaults, validation and conversions of the `RunConfig` message.

The coordinator builds it from its command line and hands it to every peer on join, so a peer
needs no flags beyond where to connect.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
from google.protobuf.json_format import MessageToDict

from common.proto import pb

ALGORITHMS: dict[str, int] = {
    "fedmoe-da": pb.FEDMOE_DA,
    "fedavg": pb.FEDAVG,
    "local": pb.LOCAL,
}
ALGORITHM_NAMES = {v: k for k, v in ALGORITHMS.items()}
EXPERT_WIRE_DTYPES = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "bfloat16": pb.BFLOAT16}

# Defaults. P, tau and I come from a sweep on the CIFAR-10 subset (README, "Choosing P, tau, I").
DEFAULTS: dict[str, Any] = {
    "algorithm": "fedmoe-da",
    "peers": 4,
    "rounds": 10,
    "seed": 0,
    "dataset": "digits",
    "data_dir": "",
    "alpha": 0.5,
    "embed_dim": 256,
    "num_experts": 8,
    "top_k": 2,
    "expert_hidden": 256,
    "balance_coef": 0.01,
    "local_epochs": 1,
    "batch_size": 32,
    "lr": 0.05,
    "momentum": 0.9,
    "neighbors": 2,
    "temperature": 0.1,
    "sync_every": 2,
    "intra_peer": True,
    "chunk_bytes": 1 << 20,
    "expert_wire_dtype": "float32",
    "min_peers": 0,  # 0: a majority of --peers
    "round_timeout": 1800.0,
    "peer_timeout": 20.0,
    "clients_per_round": 0,  # 0: every member takes part in every round (the paper's Algorithm 1)
    "aggregation": "mean",
    "trim_fraction": 0.2,
    "clip_norm": 0.0,  # 0: off
    "max_tensor_norm": 1e4,  # far above any honest tensor of these models (README, reliability)
}
AGGREGATIONS = ("mean", "median", "trimmed-mean")


class ConfigError(ValueError):
    pass


def make_config(**overrides: Any) -> pb.RunConfig:
    values = {**DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(values) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown configuration keys: {sorted(unknown)}")
    if values["algorithm"] not in ALGORITHMS:
        raise ConfigError(
            f"unknown algorithm {values['algorithm']!r}; choose one of {sorted(ALGORITHMS)}"
        )
    if values["expert_wire_dtype"] not in EXPERT_WIRE_DTYPES:
        raise ConfigError(f"expert wire dtype must be one of {sorted(EXPERT_WIRE_DTYPES)}")
    negative = sorted(
        k
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0
    )
    if negative:
        flags = ", ".join("--" + k.replace("_", "-") for k in negative)
        raise ConfigError(f"invalid run configuration: {flags} must not be negative")
    if not values["min_peers"]:
        per_round = values["clients_per_round"] or values["peers"]
        values["min_peers"] = min(per_round, values["peers"]) // 2 + 1
    cfg = pb.RunConfig(
        run_id=uuid.uuid4().hex[:12],
        algorithm=ALGORITHMS[values.pop("algorithm")],  # type: ignore[arg-type]
        expert_wire_dtype=EXPERT_WIRE_DTYPES[values.pop("expert_wire_dtype")],  # type: ignore[arg-type]
        **values,
    )
    validate(cfg)
    return cfg


def validate(cfg: pb.RunConfig) -> None:
    """Refuse configurations that cannot run, with the flag to fix in the message."""
    from common.data import DATASETS  # local: keeps this module light for the wire layer

    checks = [
        (cfg.algorithm in ALGORITHM_NAMES, "unknown algorithm"),
        (cfg.peers >= 1, "--peers must be at least 1"),
        (cfg.peers <= 1024, "--peers must be at most 1024"),
        (cfg.rounds >= 1, "--rounds must be at least 1"),
        (cfg.dataset in DATASETS, f"--dataset must be one of {', '.join(DATASETS)}"),
        (cfg.alpha > 0, "--alpha must be positive"),
        (cfg.embed_dim >= 1, "--embed-dim must be positive"),
        (cfg.num_experts >= 1, "--experts must be positive"),
        (1 <= cfg.top_k <= cfg.num_experts, "--top-k must be between 1 and --experts"),
        (cfg.expert_hidden >= 1, "--expert-hidden must be positive"),
        (cfg.balance_coef >= 0, "--balance-coef must be non-negative"),
        (cfg.local_epochs >= 1, "--local-epochs must be at least 1"),
        (cfg.batch_size >= 1, "--batch-size must be at least 1"),
        (cfg.lr > 0, "--lr must be positive"),
        (0 <= cfg.momentum < 1, "--momentum must be in [0, 1)"),
        (cfg.temperature > 0, "--temperature must be positive"),
        (cfg.sync_every >= 1, "--sync-every must be at least 1"),
        (4096 <= cfg.chunk_bytes <= (4 << 20), "--chunk-bytes must be in [4 KiB, 4 MiB]"),
        (
            1 <= cfg.min_peers <= round_size(cfg),
            "--min-peers must be between 1 and --peers (or --clients-per-round)",
        ),
        (cfg.clients_per_round <= cfg.peers, "--clients-per-round must be at most --peers"),
        (
            cfg.aggregation in AGGREGATIONS,
            f"--aggregation must be one of {', '.join(AGGREGATIONS)}",
        ),
        (0 <= cfg.trim_fraction < 0.5, "--trim-fraction must be in [0, 0.5)"),
        (cfg.clip_norm >= 0, "--clip-norm must be non-negative (0 = off)"),
        (cfg.max_tensor_norm > 0, "--max-tensor-norm must be positive"),
        (cfg.round_timeout > 0, "--round-timeout must be positive"),
        (cfg.peer_timeout > 0, "--peer-timeout must be positive"),
        (
            cfg.expert_wire_dtype in EXPERT_WIRE_DTYPES.values(),
            "expert wire dtype must be float32, float16 or bfloat16",
        ),
    ]
    errors = [msg for ok, msg in checks if not ok]
    if errors:
        raise ConfigError("invalid run configuration: " + "; ".join(errors))


def algorithm_name(cfg: pb.RunConfig) -> str:
    return ALGORITHM_NAMES[cfg.algorithm]


def is_sync_round(cfg: pb.RunConfig, round_: int) -> bool:
    """FedMoE-DA aggregates experts every `sync_every` rounds (rounds are numbered from 1)."""
    return cfg.algorithm == pb.FEDMOE_DA and round_ % cfg.sync_every == 0


def config_to_dict(cfg: pb.RunConfig) -> dict[str, Any]:
    out = MessageToDict(
        cfg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    out["algorithm"] = ALGORITHM_NAMES.get(cfg.algorithm, "unknown")
    out["expert_wire_dtype"] = {v: k for k, v in EXPERT_WIRE_DTYPES.items()}.get(
        cfg.expert_wire_dtype, "unknown"
    )
    for key in ("peers", "rounds", "seed", "chunk_bytes", "min_peers", "clients_per_round"):
        out[key] = int(out[key])
    return out


def round_size(cfg: pb.RunConfig) -> int:
    """How many members take part in each round."""
    return cfg.clients_per_round or cfg.peers


def participants(cfg: pb.RunConfig, round_: int) -> list[int]:
    """Indices of the peers that take part in `round_` (sorted).

    Sampled uniformly without replacement from all N indices, seeded by the run's seed and the
    round, so every peer computes the same set from the config alone and a rerun draws it again.
    Full participation (clients_per_round 0 or N) keeps everyone.
    """
    if not cfg.clients_per_round or cfg.clients_per_round >= cfg.peers:
        return list(range(cfg.peers))
    rng = np.random.default_rng([cfg.seed, round_, 0x5EED])
    return sorted(int(k) for k in rng.choice(cfg.peers, size=cfg.clients_per_round, replace=False))


def takes_part(cfg: pb.RunConfig, index: int, round_: int) -> bool:
    return not cfg.clients_per_round or index in participants(cfg, round_)


def upload_prefixes(cfg: pb.RunConfig, round_: int) -> tuple[str, ...]:
    """Which parameters a peer uploads to the coordinator in a round (DESIGN.md §1.3)."""
    if cfg.algorithm == pb.FEDAVG:
        return ("embedding.", "gate.", "experts.")
    if cfg.algorithm == pb.FEDMOE_DA:
        return ("embedding.", "gate.") if is_sync_round(cfg, round_) else ("embedding.",)
    return ()
