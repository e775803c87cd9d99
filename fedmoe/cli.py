"""The `fedmoe` command: coordinator, peer, local (a whole run on this machine), report."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from common.config import (
    AGGREGATIONS,
    ALGORITHMS,
    DEFAULTS,
    EXPERT_WIRE_DTYPES,
    ConfigError,
    make_config,
)
from common.data import DATASETS

# Run flags: (flag, config key, type, help). Shared by `coordinator` and `local`.
RUN_FLAGS: list[tuple[str, str, type, str]] = [
    ("--rounds", "rounds", int, "training rounds R"),
    ("--seed", "seed", int, "seed of the data split and the model initialisation"),
    (
        "--alpha",
        "alpha",
        float,
        "Dirichlet concentration of the label split (smaller = more skewed)",
    ),
    ("--embed-dim", "embed_dim", int, "embedding size d"),
    ("--experts", "num_experts", int, "experts per peer M"),
    ("--top-k", "top_k", int, "experts used per sample"),
    ("--expert-hidden", "expert_hidden", int, "hidden width of each expert MLP"),
    ("--balance-coef", "balance_coef", float, "weight of the load-balancing loss (0 = off)"),
    ("--local-epochs", "local_epochs", int, "local epochs per round E"),
    ("--batch-size", "batch_size", int, "local mini-batch size"),
    ("--lr", "lr", float, "SGD learning rate"),
    ("--momentum", "momentum", float, "SGD momentum"),
    (
        "--neighbors",
        "neighbors",
        int,
        "P: experts kept besides itself in Eq. 9 (0 = no aggregation)",
    ),
    ("--temperature", "temperature", float, "tau of the Eq. 10 softmax"),
    ("--sync-every", "sync_every", int, "I: aggregate experts every I rounds"),
    ("--chunk-bytes", "chunk_bytes", int, "tensor chunk size on the wire"),
    (
        "--min-peers",
        "min_peers",
        int,
        "quorum that may close a round at its deadline (default: majority)",
    ),
    ("--round-timeout", "round_timeout", float, "seconds before a round closes with a quorum"),
    ("--peer-timeout", "peer_timeout", float, "seconds of silence before a peer is left out"),
    (
        "--clients-per-round",
        "clients_per_round",
        int,
        "C: peers sampled per round, seeded (0 = all, the paper's setting)",
    ),
    ("--trim-fraction", "trim_fraction", float, "trimmed-mean: fraction cut at each end"),
    (
        "--clip-norm",
        "clip_norm",
        float,
        "clip each embedding upload's change to this L2 norm (0 = off)",
    ),
    (
        "--max-tensor-norm",
        "max_tensor_norm",
        float,
        "refuse any received tensor with a larger L2 norm (or NaN/Inf)",
    ),
]


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peers", type=int, default=DEFAULTS["peers"], help="number of peers N")
    p.add_argument("--algorithm", choices=sorted(ALGORITHMS), default=DEFAULTS["algorithm"])
    p.add_argument("--dataset", choices=DATASETS, default=DEFAULTS["dataset"])
    p.add_argument(
        "--data-dir", default=None, help="dataset root (cifar10: holds cifar-10-batches-py/)"
    )
    for flag, key, kind, text in RUN_FLAGS:
        p.add_argument(
            flag, dest=key, type=kind, default=None, help=f"{text} (default {DEFAULTS[key]})"
        )
    p.add_argument(
        "--no-intra-peer",
        dest="intra_peer",
        action="store_false",
        default=None,
        help="ablation: plans never mix a peer's own other experts",
    )
    p.add_argument("--expert-wire-dtype", choices=sorted(EXPERT_WIRE_DTYPES), default=None)
    p.add_argument(
        "--aggregation",
        choices=AGGREGATIONS,
        default=None,
        help="how the coordinator combines embedding uploads (default mean: FedAvg)",
    )
    p.add_argument("--out", type=Path, required=True, help="run directory to write")
    add_security_args(p)


class _RefuseToken(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        parser.error(
            "a token on the command line is visible to every user (ps, shell history): "
            "use --token-file FILE or the FEDMOE_TOKEN environment variable"
        )


def add_security_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token-file", default=None, help="file holding the run's join token")
    p.add_argument("--token", action=_RefuseToken, help=argparse.SUPPRESS)
    p.add_argument("--tls", action="store_true", help="mutual TLS on every channel")
    p.add_argument("--certs", default=None, help="directory from `fedmoe certs` (with --tls)")
    p.add_argument("--cert-name", default=None, help="this node's certificate name in --certs")
    p.add_argument("--state-dir", type=Path, default=None, help="checkpoint directory (resume)")
    p.add_argument(
        "--wire-iface",
        default=None,
        help="interfaces whose kernel counters give wire bytes: auto (own netns/container), "
        "off, or NAME[,NAME] (default: auto, or FEDMOE_WIRE_IFACE)",
    )


def tls_from_args(args: argparse.Namespace, default_name: str):  # -> TlsFiles | None
    if not args.tls:
        return None
    from common.tls import load_tls

    if not args.certs:
        raise SystemExit("--tls needs --certs DIR (make one with `fedmoe certs DIR`)")
    return load_tls(args.certs, args.cert_name or default_name)


def advertise_allow_from_args(args: argparse.Namespace) -> tuple:
    from common.netaddr import parse_cidrs

    try:
        return tuple(parse_cidrs(args.advertise_allow))
    except ValueError as e:
        raise SystemExit(f"coordinator: --advertise-allow: {e}") from e


# One process may host many peers; 1024 is also the most peers a run may have.
MAX_INDEX = 1023
_INDEX_ITEM = re.compile(r"(\d{1,6})(?:\s*-\s*(\d{1,6}))?", re.ASCII)


def parse_indices(spec: str) -> list[int]:
    """`--index` of `fedmoe peer`: "3", "0-24", "0,3,7", "0-3,8" -> sorted distinct indices."""
    indices: set[int] = set()
    for raw in spec.split(","):
        item = raw.strip()
        match = _INDEX_ITEM.fullmatch(item)
        if match is None:
            raise argparse.ArgumentTypeError(
                f"bad peer index {item!r} in {spec!r}: use K, A-B, or a comma-separated list "
                "of them (e.g. 0-3,8)"
            )
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        if end < start:
            raise argparse.ArgumentTypeError(f"bad peer index range {item!r}: {end} < {start}")
        if end > MAX_INDEX:
            raise argparse.ArgumentTypeError(f"peer index {end} is too large (at most {MAX_INDEX})")
        twice = indices.intersection(range(start, end + 1))
        if twice:
            raise argparse.ArgumentTypeError(f"peer index {min(twice)} is given twice in {spec!r}")
        indices.update(range(start, end + 1))
    return sorted(indices)


def config_from_args(args: argparse.Namespace):  # -> pb.RunConfig
    keys = [key for _, key, _, _ in RUN_FLAGS] + ["intra_peer", "expert_wire_dtype", "aggregation"]
    values = {k: getattr(args, k) for k in keys}
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else ""
    return make_config(
        algorithm=args.algorithm,
        peers=args.peers,
        dataset=args.dataset,
        data_dir=data_dir,
        **values,
    )


def check_local_data(cfg) -> None:  # type: ignore[no-untyped-def]
    """`fedmoe local` has every peer's data on this machine: check that it is there and that
    the split works (each peer would otherwise find out only after it joined)."""
    from pathlib import Path

    from common.data import DataError, load_peer_data

    if cfg.dataset == "cifar10":
        if not cfg.data_dir:
            raise ConfigError("--dataset cifar10 needs --data-dir DIR (DIR/cifar-10-batches-py/)")
        if not (Path(cfg.data_dir) / "cifar-10-batches-py").is_dir():
            return  # the peers may download it where the network allows; they say if not
    try:
        load_peer_data(cfg.dataset, cfg.data_dir or None, cfg.peers, 0, cfg.alpha, cfg.seed)
    except DataError as e:
        raise ConfigError(str(e)) from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmoe", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("coordinator", help="run the coordinator of a training run")
    c.add_argument(
        "--listen", default="127.0.0.1:50051", help="HOST:PORT to serve on (port 0: any)"
    )
    c.add_argument(
        "--advertise-allow",
        default="",
        help="comma-separated CIDRs peers' advertised addresses must lie in (production)",
    )
    add_run_args(c)

    p = sub.add_parser(
        "peer", help="run one peer (or several in one process); exits 0 when the run is over"
    )
    p.add_argument("--coordinator", required=True, help="coordinator HOST:PORT")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT for the expert service")
    p.add_argument("--advertise", default=None, help="HOST:PORT other peers use to reach this one")
    p.add_argument(
        "--index",
        type=parse_indices,
        required=True,
        help="peer index K in [0, N); several peers in this process: A-B, K,K,.. or both "
        "(e.g. 0-24 or 0-3,8)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--data-dir", default=None, help="dataset root on this machine")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait on any call")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_security_args(p)

    loc = sub.add_parser("local", help="coordinator + N peers as separate processes on loopback")
    add_run_args(loc)
    loc.add_argument(
        "--procs",
        type=int,
        default=None,
        help="peer processes to spread the N peers over (contiguous index ranges; "
        "default: one per peer, or one per GPU with --gpus)",
    )
    loc.add_argument(
        "--gpus",
        default=None,
        help="comma-separated GPU ids: one peer process per GPU (with --procs: assigned to "
        "the processes round-robin)",
    )

    k = sub.add_parser("certs", help="make a development CA and per-node certificates")
    k.add_argument("dir", type=Path)
    k.add_argument("--peers", type=int, default=4, help="make peer-0 .. peer-(N-1)")
    k.add_argument("--node", action="append", default=[], help="extra node name")
    k.add_argument(
        "--host", action="append", default=[], help="DNS name or IP the nodes are reached at"
    )

    r = sub.add_parser("report", help="print the per-round table of a run directory")
    r.add_argument("run_dir", type=Path)
    r.add_argument("--json", action="store_true", help="print summary.json instead")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "coordinator":
            from coordinator.main import run_coordinator

            return run_coordinator(
                config_from_args(args),
                args.listen,
                args.out,
                args.token_file,
                args.state_dir,
                tls_from_args(args, "coordinator"),
                args.wire_iface,
                advertise_allow_from_args(args),
            )
        if args.command == "peer":
            from peer.main import run_peers

            if args.cert_name and len(args.index) > 1:
                raise SystemExit(
                    "peer: --cert-name names one certificate; peers hosted together each use "
                    "their own (peer-K) from --certs"
                )
            # Under mutual TLS the coordinator binds a certificate name to the index it joins
            # as, so every hosted peer presents its own.
            tls = {k: tls_from_args(args, f"peer-{k}") for k in args.index} if args.tls else None
            return run_peers(
                args.coordinator,
                args.listen,
                args.advertise,
                args.index,
                args.device,
                args.data_dir,
                args.timeout,
                args.threads,
                args.token_file,
                args.state_dir,
                tls,
                args.wire_iface,
            )
        if args.command == "local":
            from fedmoe.local import run_local

            # Refuse a bad configuration, or data that cannot be split, before starting anything.
            check_local_data(config_from_args(args))
            return run_local(args, sys.argv[2:] if argv is None else argv[1:])
        if args.command == "certs":
            from common.tls import make_certs

            nodes = ["coordinator", *(f"peer-{k}" for k in range(args.peers)), *args.node]
            hosts = ["localhost", "127.0.0.1", *args.host]
            try:
                paths = make_certs(args.dir, nodes, hosts)
            except ValueError as e:  # e.g. a node name that would escape DIR
                print(f"fedmoe certs: {e}", file=sys.stderr)
                return 2
            for path in paths:
                print(path)
            return 0
        from fedmoe.report import print_report

        return print_report(args.run_dir, as_json=args.json)
    except ConfigError as e:
        print(f"fedmoe: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
