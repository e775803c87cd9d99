"""The run configuration: defaults, validation and conversions of the `RunConfig` message.

The coordinator builds it from its command line and hands it to every peer on join, so a peer
needs no flags beyond where to connect. Every run option is declared once, in OPTIONS below.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict

from fedmoe.common.plugins import SPEC_FORM, is_plugin_spec
from fedmoe.common.proto import pb

ALGORITHMS: dict[str, int] = {
    "fedmoe-da": pb.FEDMOE_DA,
    "fedavg": pb.FEDAVG,
    "moe-fedavg": pb.MOE_FEDAVG,
    "local": pb.LOCAL,
}
ALGORITHM_NAMES = {v: k for k, v in ALGORITHMS.items()}
EXPERT_WIRE_DTYPES = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "bfloat16": pb.BFLOAT16}
EMBEDDING_WIRE_DTYPES = {"float32": pb.FLOAT32, "bfloat16": pb.BFLOAT16}
MAX_PATH_CHARS = 4096  # a path longer than this is no path (PATH_MAX on Linux)
AGGREGATIONS = ("mean", "median", "trimmed-mean")
INITS = ("shared", "per-peer")
MAX_FINETUNE_EPOCHS = 100


# The built-in data sets by name (common/data.py DATASETS; a test checks the two agree).
DATASET_NAMES = ("digits", "cifar10", "synthetic", "cifar100", "fashion-mnist", "svhn")


Check = Callable[[Any, pb.RunConfig], bool]


@dataclass(frozen=True)
class Option:
    """One run option: a field of the RunConfig message, its flag, default and rule.

    The table below is the only place a run option is declared: DEFAULTS, make_config's type
    and range checks, validate(), the flags of `fedmoe coordinator` and `fedmoe local`
    (fedmoe/cli.py), the coordinator command line `fedmoe local` builds (config_to_argv) and
    config.json (config_to_dict) all come from it. tests/test_config.py checks it against the
    proto. A new option: a field in protos/fedmoe.proto and a row here.
    """

    key: str  # the RunConfig field
    flag: str  # its command-line flag; a bool option's flag sets it to `not default`
    type: type  # what the flag parses to: int (an unsigned field), float, str or bool
    default: Any
    help: str
    check: Check | None = None  # value, whole config -> ok? (besides choices and type range)
    rule: str = ""  # what `check` demands, after the flag in the error message
    # allowed values on the command line: a tuple, or a function giving it (imported late)
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] = ()
    enum: Mapping[str, int] | None = None  # command-line names -> values of a proto enum field

    def allowed(self) -> tuple[str, ...]:
        if self.enum is not None:
            return tuple(sorted(self.enum))
        return self.choices() if callable(self.choices) else self.choices

    def max_value(self) -> int | None:
        """The largest value an int option's proto field holds (None: not an int option)."""
        if self.type is not int:
            return None
        field_type = pb.RunConfig.DESCRIPTOR.fields_by_name[self.key].type
        return (1 << 64) - 1 if field_type == FieldDescriptor.TYPE_UINT64 else (1 << 32) - 1

    def name_of(self, value: Any) -> Any:
        """A field value as the command line and config.json spell it (an enum's name)."""
        if self.enum is None:
            return value
        return {v: k for k, v in self.enum.items()}.get(value, "unknown")

    def problem(self, cfg: pb.RunConfig) -> str | None:
        """Why this option's value in `cfg` cannot run (None: it can), naming the flag."""
        value = getattr(cfg, self.key)
        if self.enum is not None and value not in self.enum.values():
            return f"{self.flag} must be one of {', '.join(self.allowed())}"
        if self.enum is None and self.choices and value not in self.allowed():
            return f"{self.flag} must be one of {', '.join(self.allowed())}"
        if self.check is not None and not self.check(value, cfg):
            return f"{self.flag} {self.rule}"
        return None


def _between(lo: float, hi: float) -> Check:
    return lambda v, _: lo <= v <= hi


def _at_least(lo: float) -> Check:
    return lambda v, _: v >= lo


def _positive(v: Any, _: pb.RunConfig) -> bool:
    return bool(v > 0)


# In the order of the RunConfig fields. P, tau and I come from a sweep on the CIFAR-10 subset
# (README, "Choosing P, tau, I").
OPTIONS: tuple[Option, ...] = (
    Option("algorithm", "--algorithm", str, "fedmoe-da", "training algorithm", enum=ALGORITHMS),
    Option(
        "peers", "--peers", int, 4, "number of peers N", _between(1, 1024), "must be in [1, 1024]"
    ),
    Option("rounds", "--rounds", int, 10, "training rounds R", _at_least(1), "must be at least 1"),
    Option("seed", "--seed", int, 0, "seed of the data split and the model initialisation"),
    # data
    Option(
        "dataset",
        "--dataset",
        str,
        "digits",
        "dataset: a built-in name, or a loader plug-in MODULE:FUNCTION (docs/PLUGINS.md)",
        lambda v, _: v in DATASET_NAMES or is_plugin_spec(v),
        "must be one of " + ", ".join(DATASET_NAMES) + f", or {SPEC_FORM}",
    ),
    Option("data_dir", "--data-dir", str, "", "dataset root (cifar10: holds cifar-10-batches-py/)"),
    Option(
        "alpha",
        "--alpha",
        float,
        0.5,
        "Dirichlet concentration of the label split (smaller = more skewed)",
        _positive,
        "must be positive",
    ),
    # model
    Option("embed_dim", "--embed-dim", int, 256, "embedding size d", _positive, "must be positive"),
    Option("num_experts", "--experts", int, 8, "experts per peer M", _positive, "must be positive"),
    Option(
        "top_k",
        "--top-k",
        int,
        2,
        "experts used per sample",
        lambda v, cfg: 1 <= v <= cfg.num_experts,
        "must be between 1 and --experts",
    ),
    Option(
        "expert_hidden",
        "--expert-hidden",
        int,
        256,
        "hidden width of each expert MLP",
        _positive,
        "must be positive",
    ),
    Option(
        "balance_coef",
        "--balance-coef",
        float,
        0.01,
        "weight of the load-balancing loss (0 = off)",
        _at_least(0),
        "must be non-negative",
    ),
    # local training
    Option(
        "local_epochs",
        "--local-epochs",
        int,
        1,
        "local epochs per round E",
        _at_least(1),
        "must be at least 1",
    ),
    Option(
        "batch_size",
        "--batch-size",
        int,
        32,
        "local mini-batch size",
        _at_least(1),
        "must be at least 1",
    ),
    Option("lr", "--lr", float, 0.05, "SGD learning rate", _positive, "must be positive"),
    Option(
        "momentum",
        "--momentum",
        float,
        0.9,
        "SGD momentum",
        lambda v, _: 0 <= v < 1,
        "must be in [0, 1)",
    ),
    # FedMoE-DA (Eq. 8-11)
    Option(
        "neighbors",
        "--neighbors",
        int,
        2,
        "P: experts kept besides itself in Eq. 9 (0 = no aggregation)",
    ),
    Option(
        "temperature",
        "--temperature",
        float,
        0.1,
        "tau of the Eq. 10 softmax",
        _positive,
        "must be positive",
    ),
    Option(
        "sync_every",
        "--sync-every",
        int,
        2,
        "I: aggregate experts every I rounds",
        _at_least(1),
        "must be at least 1",
    ),
    Option(
        "intra_peer",
        "--no-intra-peer",
        bool,
        True,
        "ablation: plans never mix a peer's own other experts",
    ),
    # transport
    Option(
        "chunk_bytes",
        "--chunk-bytes",
        int,
        1 << 20,
        "tensor chunk size on the wire",
        _between(4096, 4 << 20),
        "must be in [4 KiB, 4 MiB]",
    ),
    Option(
        "expert_wire_dtype",
        "--expert-wire-dtype",
        str,
        "float32",
        "dtype of the experts peers exchange",
        enum=EXPERT_WIRE_DTYPES,
    ),
    # fault tolerance
    Option(
        "min_peers",
        "--min-peers",
        int,
        0,  # 0: a majority of the round's members (make_config fills it in)
        "quorum that may close a round at its deadline (default: majority)",
        lambda v, cfg: 1 <= v <= round_size(cfg),
        "must be between 1 and --peers (or --clients-per-round)",
    ),
    Option(
        "round_timeout",
        "--round-timeout",
        float,
        1800.0,
        "seconds before a round closes with a quorum",
        _positive,
        "must be positive",
    ),
    Option(
        "peer_timeout",
        "--peer-timeout",
        float,
        20.0,
        "seconds of silence before a peer is left out",
        _positive,
        "must be positive",
    ),
    # scale
    Option(
        "clients_per_round",
        "--clients-per-round",
        int,
        0,  # 0: every member takes part in every round (the paper's Algorithm 1)
        "C: peers sampled per round, seeded (0 = all, the paper's setting)",
        lambda v, cfg: v <= cfg.peers,
        "must be at most --peers",
    ),
    # robustness
    Option(
        "aggregation",
        "--aggregation",
        str,
        "mean",
        "how the coordinator combines uploads (mean: FedAvg)",
        choices=AGGREGATIONS,
    ),
    Option(
        "trim_fraction",
        "--trim-fraction",
        float,
        0.2,
        "trimmed-mean: fraction cut at each end",
        lambda v, _: 0 <= v < 0.5,
        "must be in [0, 0.5)",
    ),
    Option(
        "clip_norm",
        "--clip-norm",
        float,
        0.0,  # 0: off
        "clip each upload's change to this L2 norm (0 = off)",
        _at_least(0),
        "must be non-negative (0 = off)",
    ),
    Option(
        "max_tensor_norm",
        "--max-tensor-norm",
        float,
        1e4,  # far above any honest tensor of these models (README, reliability)
        "refuse any received tensor with a larger L2 norm (or NaN/Inf)",
        _positive,
        "must be positive",
    ),
    # evidence (issue #10; docs/EVIDENCE_OPTIONS.md)
    Option(
        "val_fraction",
        "--val-fraction",
        float,
        0.1,
        "share of each peer's own training rows held out as its validation split (0 = none)",
        _between(0, 0.5),
        "must be in [0, 0.5]",
    ),
    Option(
        "init",
        "--init",
        str,
        "per-peer",
        "the personal parts (fedmoe-da: gate and experts; moe-fedavg: gate) start from a seed of "
        "each peer's own (per-peer), or from the run seed like the embedding (shared); fedavg "
        "and local always start shared (docs/FIRST_SYNC.md)",
        choices=INITS,
    ),
    Option(
        "finetune_epochs",
        "--finetune-epochs",
        int,
        0,
        "fedavg: evaluate a copy fine-tuned this many local epochs (0 = off)",
        _between(0, MAX_FINETUNE_EPOCHS),
        f"must be in [0, {MAX_FINETUNE_EPOCHS}]",
    ),
    Option(
        "min_term_weight",
        "--min-term-weight",
        float,
        0.0,
        "fedmoe-da: drop plan terms weighing less than this and renormalise the row, so that "
        "nothing is fetched for them (0 = Eq. 10 as is; an expert's own term is always kept)",
        _between(0.0, 0.5),
        "must be in [0, 0.5]",
    ),
    # pre-trained embedding (issue #10 item 7; docs/EMBEDDING_OPTIONS.md)
    Option(
        "embedding_init",
        "--embedding-init",
        str,
        "",
        "torch state_dict (torch.save) of the embedding network that every peer loads at round "
        "0; every peer process needs the file at this path (empty: the run seed's weights)",
        lambda v, _: len(v) <= MAX_PATH_CHARS and "\0" not in v,
        f"must be a path of at most {MAX_PATH_CHARS} characters",
    ),
    Option(
        "freeze_embedding",
        "--freeze-embedding",
        bool,
        False,
        "never train, upload or average the embedding loaded by --embedding-init",
    ),
    Option(
        "embedding_wire_dtype",
        "--embedding-wire-dtype",
        str,
        "float32",
        "dtype of the embedding on its way to and from the coordinator (peers train in float32)",
        enum=EMBEDDING_WIRE_DTYPES,
    ),
    # plug-ins (issue #14; docs/PLUGINS.md)
    Option(
        "model",
        "--model",
        str,
        "",
        "embedding network plug-in MODULE:FUNCTION (default: the built-in CNN/MLP); every "
        "process must be able to import it",
        lambda v, _: v == "" or is_plugin_spec(v),
        f"must be {SPEC_FORM}",
    ),
    Option(
        "model_weights",
        "--model-weights",
        str,
        "",
        "local file of pre-trained weights handed to the --model factory (config key "
        "model_weights; never downloaded)",
        lambda v, cfg: v == "" or cfg.model != "",
        "needs --model (the built-in networks load no weights)",
    ),
)
OPTION_BY_KEY = {o.key: o for o in OPTIONS}
DEFAULTS: dict[str, Any] = {o.key: o.default for o in OPTIONS}


class ConfigError(ValueError):
    pass


def _wire_value(option: Option, value: Any) -> tuple[Any, str | None]:
    """A Python value of `option` as its RunConfig field holds it, or the reason it cannot be."""
    if option.enum is not None:
        if value not in option.enum:
            return None, f"{option.flag} must be one of {', '.join(option.allowed())}"
        return option.enum[value], None
    if option.type is bool:
        return (value, None) if isinstance(value, bool) else (None, f"{option.flag} is on or off")
    if option.type is str:
        return (value, None) if isinstance(value, str) else (None, f"{option.flag} is a string")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"{option.flag} must be a number"
    if option.type is float:
        return float(value), None
    if value != int(value):
        return None, f"{option.flag} must be a whole number"
    highest = option.max_value()
    assert highest is not None
    if value < 0:
        return None, f"{option.flag} must not be negative"
    if value > highest:
        return None, f"{option.flag} must be at most {highest}"
    return int(value), None


def make_config(**overrides: Any) -> pb.RunConfig:
    """A validated RunConfig from option values (keys of OPTIONS; None: the default)."""
    unknown = set(overrides) - set(OPTION_BY_KEY)
    if unknown:
        raise ConfigError(f"unknown configuration keys: {sorted(unknown)}")
    values = {**DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    fields: dict[str, Any] = {}
    errors = []
    for option in OPTIONS:
        fields[option.key], error = _wire_value(option, values[option.key])
        if error:
            errors.append(error)
    if errors:
        raise ConfigError("invalid run configuration: " + "; ".join(errors))
    if not fields["min_peers"]:
        per_round = fields["clients_per_round"] or fields["peers"]
        fields["min_peers"] = min(per_round, fields["peers"]) // 2 + 1
    cfg = pb.RunConfig(run_id=uuid.uuid4().hex[:12], **fields)
    validate(cfg)
    return cfg


def validate(cfg: pb.RunConfig) -> None:
    """Refuse configurations that cannot run, with the flag to fix in the message."""
    errors = [e for e in (option.problem(cfg) for option in OPTIONS) if e is not None]
    if cfg.finetune_epochs and cfg.algorithm != pb.FEDAVG:
        # FedMoE-DA already personalises (own gate and experts) and local never shares: the
        # FedAvg + fine-tuning baseline means fine-tuning the one global model.
        errors.append(
            f"--finetune-epochs is for --algorithm fedavg only (got {ALGORITHM_NAMES.get(cfg.algorithm, 'unknown')}): "
            "it makes the FedAvg + local fine-tuning baseline"
        )
    if cfg.freeze_embedding and not cfg.embedding_init:
        # Frozen random features would train every run on a fixed projection of the seed, an
        # easy slip (a forgotten flag) that still "works": ask for the weights explicitly.
        errors.append("--freeze-embedding needs --embedding-init PATH (the weights to freeze)")
    if cfg.freeze_embedding and cfg.embedding_wire_dtype not in (0, pb.FLOAT32):
        errors.append(
            "--embedding-wire-dtype has nothing to send with --freeze-embedding "
            "(a frozen embedding never travels): leave it at float32"
        )
    if errors:
        raise ConfigError("invalid run configuration: " + "; ".join(errors))


def algorithm_name(cfg: pb.RunConfig) -> str:
    return ALGORITHM_NAMES[cfg.algorithm]


def is_sync_round(cfg: pb.RunConfig, round_: int) -> bool:
    """FedMoE-DA aggregates experts every `sync_every` rounds (rounds are numbered from 1)."""
    return cfg.algorithm == pb.FEDMOE_DA and round_ % cfg.sync_every == 0


def config_to_dict(cfg: pb.RunConfig) -> dict[str, Any]:
    """config.json: every option by its key, enums by name (and the run id)."""
    out = MessageToDict(
        cfg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    for option in OPTIONS:
        if option.enum is not None:
            out[option.key] = option.name_of(getattr(cfg, option.key))
        elif option.type is int:  # MessageToDict writes 64-bit integers as strings
            out[option.key] = int(out[option.key])
    return out


def config_to_argv(cfg: pb.RunConfig) -> list[str]:
    """The flags that give `cfg` again (all but the run id): what `fedmoe local` hands its
    coordinator, so that it runs exactly the configuration the launcher checked."""
    argv: list[str] = []
    for option in OPTIONS:
        value = getattr(cfg, option.key)
        if option.type is bool:
            if value != option.default:
                argv.append(option.flag)
        else:
            argv += [option.flag, str(option.name_of(value))]
    return argv


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


def coordinated(cfg: pb.RunConfig) -> bool:
    """Whether rounds go through the coordinator (uploads, a close, a result) at all. With a
    frozen embedding a fedmoe-da round between syncs uploads no tensor, but it is still one:
    its empty upload keeps the quorum, the deadlines and the catch-up rules as they are."""
    return cfg.algorithm != pb.LOCAL


def upload_prefixes(cfg: pb.RunConfig, round_: int) -> tuple[str, ...]:
    """Which parameters a peer uploads to the coordinator in a round (DESIGN.md §1.3)."""
    if cfg.algorithm == pb.FEDAVG:
        prefixes: tuple[str, ...] = ("embedding.", "gate.", "experts.")
    elif cfg.algorithm == pb.MOE_FEDAVG:
        prefixes = ("embedding.", "experts.")  # the gate stays personal
    elif cfg.algorithm == pb.FEDMOE_DA:
        prefixes = ("embedding.", "gate.") if is_sync_round(cfg, round_) else ("embedding.",)
    else:
        return ()
    if cfg.freeze_embedding:  # every peer holds the same frozen weights: nothing to average
        prefixes = tuple(p for p in prefixes if p != "embedding.")
    return prefixes


def wire_dtype(cfg: pb.RunConfig, name: str) -> int:
    """The dtype tensor `name` travels in between a peer and the coordinator."""
    if name.startswith("embedding.") and cfg.embedding_wire_dtype:
        return int(cfg.embedding_wire_dtype)
    return pb.FLOAT32
