"""The `fedmoe` command: coordinator, peer, local (a whole run on this machine), report."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from common.config import ALGORITHMS, DEFAULTS, EXPERT_WIRE_DTYPES, ConfigError, make_config
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
    p.add_argument("--out", type=Path, required=True, help="run directory to write")
    p.add_argument(
        "--round-timeout", type=float, default=1800.0, help="seconds a round may take at most"
    )


def config_from_args(args: argparse.Namespace):  # -> pb.RunConfig
    keys = [key for _, key, _, _ in RUN_FLAGS] + ["intra_peer", "expert_wire_dtype"]
    values = {k: getattr(args, k) for k in keys}
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else ""
    return make_config(
        algorithm=args.algorithm,
        peers=args.peers,
        dataset=args.dataset,
        data_dir=data_dir,
        **values,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmoe", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("coordinator", help="run the coordinator of a training run")
    c.add_argument(
        "--listen", default="127.0.0.1:50051", help="HOST:PORT to serve on (port 0: any)"
    )
    add_run_args(c)

    p = sub.add_parser("peer", help="run one peer; exits 0 when the run is over")
    p.add_argument("--coordinator", required=True, help="coordinator HOST:PORT")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT for the expert service")
    p.add_argument("--advertise", default=None, help="HOST:PORT other peers use to reach this one")
    p.add_argument("--index", type=int, required=True, help="peer index K in [0, N)")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--data-dir", default=None, help="dataset root on this machine")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait on any call")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    loc = sub.add_parser("local", help="coordinator + N peers as separate processes on loopback")
    add_run_args(loc)
    loc.add_argument("--gpus", default=None, help="comma-separated GPU ids, assigned round-robin")

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
                config_from_args(args), args.listen, args.out, args.round_timeout
            )
        if args.command == "peer":
            from peer.main import run_peer

            return run_peer(
                args.coordinator,
                args.listen,
                args.advertise,
                args.index,
                args.device,
                args.data_dir,
                args.timeout,
                args.threads,
            )
        if args.command == "local":
            from fedmoe.local import run_local

            config_from_args(args)  # refuse a bad configuration before starting anything
            return run_local(args, sys.argv[2:] if argv is None else argv[1:])
        from fedmoe.report import print_report

        return print_report(args.run_dir, as_json=args.json)
    except ConfigError as e:
        print(f"fedmoe: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
