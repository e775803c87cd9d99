"""The `fedmoe` command: coordinator, peer, local (a whole run on this machine), status (of a
live run), report, sweep (many local runs from an experiment file)."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from fedmoe.common.config import OPTIONS, ConfigError, Option, algorithm_name, make_config
from fedmoe.common.config_file import Key, load_config_file
from fedmoe.status import add_status_args


def _flag_type(option: Option):  # type: ignore[no-untyped-def]
    """How a run flag's text becomes its value: ints within their proto field's range, so that
    a value the wire cannot carry is a flag error (`--neighbors -1`), not a traceback."""
    if option.type is not int:
        return option.type
    highest = option.max_value()

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative (got {value})")
        if highest is not None and value > highest:
            raise argparse.ArgumentTypeError(f"must be at most {highest} (got {value})")
        return value

    parse.__name__ = "int"
    return parse


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The run options (common/config.py OPTIONS) as flags, shared by `coordinator` and `local`.

    Every flag defaults to None, "not given": make_config fills in the defaults."""
    for option in OPTIONS:
        if option.type is bool:
            p.add_argument(
                option.flag,
                dest=option.key,
                action="store_const",
                const=not option.default,
                default=None,
                help=option.help,
            )
            continue
        p.add_argument(
            option.flag,
            dest=option.key,
            type=_flag_type(option),
            metavar=None if option.allowed() else option.flag[2:].upper().replace("-", "_"),
            choices=option.allowed() or None,
            default=None,
            help=f"{option.help} (default {option.default})"
            if option.default != ""
            else option.help,
        )
    # Required by `coordinator` (checked once --config is read); `local` makes a fresh one.
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run directory to write (local: default runs/<algorithm>-<YYYYmmdd-HHMMSS>)",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="TOML or JSON file of flags (keys as in a run's config.json, or flag names); "
        "flags given here win over it",
    )
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


def security_argv(args: argparse.Namespace) -> list[str]:
    """The flags of add_security_args that were given, but --token-file (`fedmoe local` hands
    its coordinator the file it made) and the refused --token: the rest of what it passes on."""
    argv = ["--tls"] if args.tls else []
    for flag, value in (
        ("--certs", args.certs),
        ("--cert-name", args.cert_name),
        ("--state-dir", args.state_dir),
        ("--wire-iface", args.wire_iface),
    ):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def tls_from_args(args: argparse.Namespace, default_name: str):  # -> TlsFiles | None
    if not args.tls:
        return None
    from fedmoe.common.tls import load_tls

    if not args.certs:
        raise SystemExit("--tls needs --certs DIR (make one with `fedmoe certs DIR`)")
    return load_tls(args.certs, args.cert_name or default_name)


def advertise_allow_from_args(args: argparse.Namespace) -> tuple:
    from fedmoe.common.netaddr import parse_cidrs

    try:
        return tuple(parse_cidrs(args.advertise_allow))
    except ValueError as e:
        raise SystemExit(f"coordinator: --advertise-allow: {e}") from e


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in 0..65535 (got {value})")
    return value


def add_telemetry_args(p: argparse.ArgumentParser, ports: str, tensorboard: bool) -> None:
    """--metrics-port/--metrics-listen (Prometheus, common/telemetry.py) and --tensorboard.
    `ports` says, in the help, where this command's processes serve."""
    p.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help=f"serve Prometheus metrics (fedmoe_*) at http://HOST:PORT/metrics; {ports}",
    )
    p.add_argument(
        "--metrics-listen",
        default="127.0.0.1",
        metavar="HOST",
        help="address the metrics endpoint binds (default 127.0.0.1; it has no authentication, "
        "so any other address is a deliberate choice)",
    )
    if tensorboard:
        p.add_argument(
            "--tensorboard",
            type=Path,
            default=None,
            metavar="DIR",
            help="write per-round scalars (accuracy, bytes, seconds) as TensorBoard event files "
            "to DIR, flushed each round: `tensorboard --logdir DIR`",
        )


def metrics_from_args(args: argparse.Namespace):  # -> MetricsEndpoint | None
    if args.metrics_port is None:
        return None
    from fedmoe.common.telemetry import MetricsEndpoint

    try:
        return MetricsEndpoint(args.metrics_listen.strip("[]"), args.metrics_port)
    except ValueError as e:
        raise SystemExit(f"fedmoe: --metrics-listen: {e}") from e


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


AUTO_INDEX = "auto"


def parse_index_arg(spec: str) -> list[int] | str:
    """`--index`: "auto" (the coordinator assigns it) or a spec for `parse_indices`."""
    return AUTO_INDEX if spec.strip() == AUTO_INDEX else parse_indices(spec)


def resolve_auto_index(args: argparse.Namespace) -> bool:
    """True for `--index auto` (args.index becomes []). Under mutual TLS the coordinator binds
    certificate peer-K to index K, so auto means K of --cert-name (args.index becomes [K])."""
    if args.index != AUTO_INDEX:
        return False
    if not args.tls:
        args.index = []
        return True
    name = args.cert_name or ""
    digits = name[5:] if name.startswith("peer-") else ""
    if not (digits.isascii() and digits.isdigit()) or int(digits) > MAX_INDEX:
        raise SystemExit(
            "peer: --index auto with --tls: the certificate decides the index; give "
            "--cert-name peer-K (or --index K)"
        )
    args.index = [int(digits)]
    return False


# Run options naming local paths: made absolute where the command runs, since the processes
# it starts (and a config.json read later) must not depend on the working directory.
PATH_OPTIONS = ("data_dir", "model_weights", "embedding_init")


def absolute_paths(values: dict) -> dict:  # type: ignore[type-arg]
    return {k: str(Path(v).resolve()) if k in PATH_OPTIONS and v else v for k, v in values.items()}


def config_from_args(args: argparse.Namespace):  # -> pb.RunConfig
    """The RunConfig of the run flags given (add_run_args); ConfigError if it cannot run."""
    values = {option.key: getattr(args, option.key) for option in OPTIONS}
    return make_config(**absolute_paths(values))


def check_plugins(cfg, with_weights: bool = False) -> None:  # type: ignore[no-untyped-def]
    """Import and try the --model / --dataset plug-ins here, before any process starts: the
    coordinator needs them for its tensor schema, so a spec that cannot be imported or gives
    the wrong shapes is refused now, with its message, rather than in every peer.
    `with_weights` (`fedmoe local`: the peers run here) also loads --model-weights."""
    from fedmoe.common.config import config_to_dict
    from fedmoe.common.data import DATASET_SPECS, DataError, dataset_spec
    from fedmoe.common.model_schema import model_schema
    from fedmoe.common.plugins import PluginError

    if not cfg.model and cfg.dataset in DATASET_SPECS:
        return  # nothing of the user's to import
    try:
        model_schema(cfg)
        if with_weights and cfg.model_weights:
            from fedmoe.common.model_plugin import build_plugin_embedding

            shape, _ = dataset_spec(cfg.dataset, cfg.data_dir or None, cfg.seed)
            build_plugin_embedding(cfg.model, shape, cfg.embed_dim, config_to_dict(cfg))
    except (PluginError, DataError) as e:
        raise ConfigError(str(e)) from e


def check_local_data(cfg) -> None:  # type: ignore[no-untyped-def]
    """`fedmoe local` has every peer's data on this machine: check that it is there and that
    the split works (each peer would otherwise find out only after it joined)."""
    from pathlib import Path

    from fedmoe.common.data import DataError, load_peer_data

    if cfg.dataset == "cifar10":
        if not cfg.data_dir:
            raise ConfigError("--dataset cifar10 needs --data-dir DIR (DIR/cifar-10-batches-py/)")
        if not (Path(cfg.data_dir) / "cifar-10-batches-py").is_dir():
            return  # the peers may download it where the network allows; they say if not
    try:
        data = load_peer_data(
            cfg.dataset,
            cfg.data_dir or None,
            cfg.peers,
            0,
            cfg.alpha,
            cfg.seed,
            val_fraction=cfg.val_fraction,
        )
    except DataError as e:
        raise ConfigError(str(e)) from e
    if cfg.embedding_init:  # the peers here read the same file: refuse a bad one before them
        from fedmoe.peer.embedding_init import EmbeddingInitError
        from fedmoe.peer.trainer import build_model

        try:
            build_model(cfg, data, 0)
        except EmbeddingInitError as e:
            raise ConfigError(f"fedmoe local: {e}") from e


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
    c.add_argument(
        "--liveness-listen",
        default=None,
        metavar="HOST:PORT",
        help="answer heartbeats from a process of its own on HOST:PORT (port 0: any); peers "
        "reach it at the coordinator's host, and fall back to the coordinator (large N)",
    )
    add_run_args(c)
    add_telemetry_args(c, "port 0: any free port, printed as 'FEDMOE_METRICS URL'", True)

    p = sub.add_parser(
        "peer", help="run one peer (or several in one process); exits 0 when the run is over"
    )
    p.add_argument("--coordinator", required=True, help="coordinator HOST:PORT")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT for the expert service")
    p.add_argument(
        "--advertise",
        default=None,
        help="HOST:PORT other peers use to reach this one; auto:PORT (or auto: the listening "
        "port): this host's address towards the coordinator",
    )
    p.add_argument(
        "--index",
        type=parse_index_arg,
        required=True,
        help="peer index K in [0, N); several peers in this process: A-B, K,K,.. or both "
        "(e.g. 0-24 or 0-3,8); auto: one peer whose index the coordinator assigns at its "
        "join (kept in --state-dir for a restart)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda:N, or cuda:auto (peer K on GPU K mod the GPUs it sees)",
    )
    p.add_argument("--data-dir", default=None, help="dataset root on this machine")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait on any call")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_security_args(p)
    add_telemetry_args(
        p,
        'one endpoint for all peers of this process, labelled peer="peer-K"; port 0: any '
        "free port, logged as 'FEDMOE_METRICS URL'",
        False,
    )

    loc = sub.add_parser("local", help="coordinator + N peers as separate processes on loopback")
    add_run_args(loc)
    loc.add_argument(
        "--liveness",
        action="store_true",
        help="the coordinator answers heartbeats from a process of its own (for many peers)",
    )
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
    add_telemetry_args(
        loc,
        "the coordinator serves on PORT and peer process i on PORT+1+i; port 0: every process "
        "takes any free port, the coordinator's is printed and each peer process's is logged "
        "('FEDMOE_METRICS URL' in its log)",
        True,
    )

    k = sub.add_parser("certs", help="make a development CA and per-node certificates")
    k.add_argument("dir", type=Path)
    k.add_argument("--peers", type=int, default=4, help="make peer-0 .. peer-(N-1)")
    k.add_argument("--node", action="append", default=[], help="extra node name")
    k.add_argument(
        "--host", action="append", default=[], help="DNS name or IP the nodes are reached at"
    )

    s = sub.add_parser(
        "status", help="where a live run stands: rounds, peers, accuracy, bytes, ETA"
    )
    add_status_args(s)

    w = sub.add_parser(
        "sweep",
        help="an experiment file: lr tuned on validation accuracy, then every algorithm x "
        "setting x seed (resumable), results.json, results.md and plots",
    )
    from fedmoe.sweep.main import add_sweep_args

    add_sweep_args(w)

    r = sub.add_parser(
        "report",
        help="per-round table of run directories; --plot / --csv for figures and spreadsheets",
    )
    r.add_argument("run_dir", type=Path, nargs="+", help="run directories (several overlay)")
    r.add_argument("--json", action="store_true", help="print summary.json instead")
    r.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="OUT",
        help="write PNG plots: OUT a directory (accuracy.png, bytes.png, bytes_vs_accuracy.png, "
        "phases.png) or a file ending .png (all in one figure)",
    )
    r.add_argument(
        "--csv",
        type=Path,
        default=None,
        metavar="OUT.csv",
        help="write one row per (run, round): accuracy, bytes by class (each message once), "
        "cumulative bytes, wire bytes, seconds per phase",
    )
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]  # type: ignore[no-any-return]
    raise KeyError(name)


# Flags that are no key of a --config file: the file itself, and the refused --token.
_NOT_IN_FILES = frozenset({"help", "config", "token"})


def _file_keys(sub: argparse.ArgumentParser) -> dict[str, Key]:
    """The keys a --config file may set besides the run options: the command's other flags,
    by their dest (`token_file`) or flag name (`token-file`), typed as argparse holds them."""
    run_keys = {o.key for o in OPTIONS}
    keys: dict[str, Key] = {}
    for action in sub._actions:
        if not action.option_strings or action.dest in _NOT_IN_FILES | run_keys:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            kind: type = bool
        elif action.type in (int, float):
            kind = action.type  # type: ignore[assignment]
        else:
            kind = str  # str and Path flags
        key = Key(action.dest, kind, tuple(action.choices or ()))
        keys[action.dest] = key
        keys.setdefault(action.option_strings[-1].lstrip("-"), key)
    return keys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with `--config FILE` under it: flags > the file > the defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is None:
        return args
    sub = _subparser(parser, args.command)
    try:
        values = load_config_file(args.config, _file_keys(sub))
    except ConfigError as e:
        sub.error(f"--config: {e}")
    # Defaults of the subcommand: a flag given on the command line still wins over them.
    sub.set_defaults(**values)
    return parser.parse_args(argv)


def run_report(args: argparse.Namespace) -> int:
    """`fedmoe report`: the text table of each directory, or --plot / --csv of them all."""
    from fedmoe.report import load_runs, print_report, write_csv

    try:
        if args.plot is None and args.csv is None:
            for k, run_dir in enumerate(args.run_dir):
                if len(args.run_dir) > 1:
                    print(f"== {run_dir}" if k == 0 else f"\n== {run_dir}")
                print_report(run_dir, as_json=args.json)
            return 0
        if args.json:
            raise SystemExit("report: --json prints summary.json; it does not go with --plot/--csv")
        runs = load_runs(args.run_dir)
        if args.csv is not None:
            write_csv(runs, args.csv)
            print(args.csv)
        if args.plot is not None:
            from fedmoe.plots import write_plots

            for path in write_plots(runs, args.plot):
                print(path)
        return 0
    except SystemExit as e:  # user errors (a bad directory or file): a message, not a traceback
        if isinstance(e.code, str):
            print(f"fedmoe {e.code}", file=sys.stderr)
            return 2
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "coordinator":
            from fedmoe.coordinator.main import run_coordinator

            if args.out is None:
                raise ConfigError("coordinator: --out DIR is required (or `out` in --config)")

            cfg = config_from_args(args)
            check_plugins(cfg)
            if args.liveness_listen:
                from fedmoe.common.netaddr import split_host_port

                try:
                    split_host_port(args.liveness_listen)
                except ValueError as e:
                    raise SystemExit(f"coordinator: --liveness-listen: {e}") from e
            return run_coordinator(
                cfg,
                args.listen,
                args.out,
                args.token_file,
                args.state_dir,
                tls_from_args(args, "coordinator"),
                args.wire_iface,
                advertise_allow_from_args(args),
                metrics=metrics_from_args(args),
                tensorboard=args.tensorboard,
                liveness_listen=args.liveness_listen,
            )
        if args.command == "peer":
            from fedmoe.peer.main import run_peers

            auto = resolve_auto_index(args)
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
                metrics=metrics_from_args(args),
                auto=auto,
            )
        if args.command == "local":
            from fedmoe.local import start

            return start(args, config_from_args(args))
        if args.command == "sweep":
            from fedmoe.sweep.main import run_sweep

            return run_sweep(args)
        if args.command == "status":
            from fedmoe.status import run_status

            return run_status(args)
        if args.command == "certs":
            from fedmoe.common.tls import make_certs

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
        return run_report(args)
    except ConfigError as e:
        print(f"fedmoe: {e}", file=sys.stderr)
        return 2


def _run_local_in_dir(args: argparse.Namespace, cfg, run_local) -> int:  # type: ignore[no-untyped-def]
    """`fedmoe local` in --out, or in a fresh runs/<algorithm>-<time>; says where, first and
    last (the table at the end can be long)."""
    from fedmoe.run_dir import fresh_run_dir

    if args.out is None:
        args.out = fresh_run_dir(algorithm_name(cfg))
    print(f"run directory: {args.out}", flush=True)
    code: int = run_local(args, cfg)
    print(f"run directory: {args.out}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
