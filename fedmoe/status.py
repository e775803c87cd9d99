"""`fedmoe status COORDINATOR`: where a live run stands, asked of its coordinator.

One GetStatus call, authenticated with the run's join token (the same --token-file or
FEDMOE_TOKEN as `fedmoe peer`, and the same --tls flags). A human table by default, `--json` for
machines. Any failure (unreachable, wrong token, a bad flag) is one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

# Seconds to wait for the coordinator before saying it is unreachable.
DEFAULT_TIMEOUT = 10.0


def add_status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("coordinator", help="the coordinator's HOST:PORT")
    p.add_argument("--json", action="store_true", help="print the status as one JSON object")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for an answer (default {DEFAULT_TIMEOUT:g})",
    )
    # The security flags of `fedmoe peer`, without the ones only a node needs.
    p.add_argument("--token-file", default=None, help="file holding the run's join token")
    p.add_argument("--tls", action="store_true", help="mutual TLS (as the run uses)")
    p.add_argument("--certs", default=None, help="directory from `fedmoe certs` (with --tls)")
    p.add_argument(
        "--cert-name",
        default="status",
        help="this client's certificate name in --certs (default status: make it with "
        "`fedmoe certs DIR --node status`)",
    )


class StatusError(Exception):
    """A failure worth one line: the message says what to check."""


def fetch_status(
    address: str, token: str, tls: Any = None, timeout: float = DEFAULT_TIMEOUT
) -> dict[str, Any]:
    """The coordinator's GetStatus reply as a dict (optional fields absent -> None)."""
    import grpc

    from fedmoe.common.auth import TOKEN_METADATA
    from fedmoe.common.grpc_options import CHANNEL_OPTIONS
    from fedmoe.common.netaddr import split_host_port
    from fedmoe.common.proto import pb, rpc
    from fedmoe.common.tls import channel

    try:
        split_host_port(address)
    except ValueError as e:
        raise StatusError(f"coordinator address: {e}") from None
    with channel(address, tls, CHANNEL_OPTIONS) as ch:
        stub = rpc.CoordinatorStub(ch)
        try:
            reply = stub.GetStatus(
                pb.StatusRequest(),
                metadata=((TOKEN_METADATA, token),),
                timeout=timeout,
                wait_for_ready=True,  # a coordinator still starting gets the whole timeout
            )
        except grpc.RpcError as e:
            raise StatusError(_explain(address, e, timeout)) from None
    return _reply_dict(reply)


def _explain(address: str, error: Any, timeout: float) -> str:
    import grpc

    from fedmoe.common.logsafe import clip_text

    code = error.code()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (
            f"the coordinator at {address} refused the token: check --token-file (or FEDMOE_TOKEN)"
        )
    if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
        return (
            f"could not reach the coordinator at {address} within {timeout:g} s "
            "(is the run still going? check the address, the firewall, and --tls)"
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"the coordinator at {address} does not answer status calls (an older fedmoe?)"
    # The server's words are the other side's: clipped, one line.
    return f"the coordinator at {address} said {code.name}: {clip_text(error.details() or '', 200)}"


def _reply_dict(reply: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in reply.DESCRIPTOR.fields:
        value = getattr(reply, field.name)
        if field.has_presence and not reply.HasField(field.name):
            value = None
        elif not isinstance(value, (str, int, float, bool)):
            value = list(value)  # a repeated field's container
        out[field.name] = value
    return out


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"  # digits rounds take well under a second
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _ids(ids: list[str], count: int) -> str:
    if not count:
        return "-"
    more = count - len(ids)
    return ", ".join(ids) + (f" (+{more} more)" if more > 0 else "")


def format_status(s: dict[str, Any]) -> str:
    """The human table."""
    if s["failure"]:
        state = f"failed: {s['failure']}"
    elif s["finished"]:
        state = "finished"
    else:
        state = "running"
    acc = s["last_accuracy"]
    accuracy = "-" if acc is None else f"{acc:.4f} (global {s['last_global_accuracy']:.4f})"
    rows = [
        ("run", f"{s['run_id']}  ({s['algorithm']}, {state})"),
        ("round", f"{s['reported_round']} reported, {s['open_round']} open, of {s['rounds']}"),
        ("peers", f"{s['alive_count']} alive of {s['peers']}"),
        ("alive", _ids(s["alive"], s["alive_count"])),
        ("missing", _ids(s["missing"], s["missing_count"])),
        ("accuracy", f"{accuracy}  (mean of round {s['reported_round']})"),
        (
            "bytes",
            f"coordinator {s['coordinator_bytes'] / 1e6:.2f} MB, "
            f"p2p {s['p2p_bytes'] / 1e6:.2f} MB  (rounds reported so far)",
        ),
        ("round time", _duration(s["mean_round_seconds"]) + " mean"),
        ("elapsed", _duration(s["elapsed_seconds"])),
        ("eta", _duration(s["eta_seconds"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run_status(args: argparse.Namespace) -> int:
    from fedmoe.common.auth import CredentialError, load_token

    try:
        # load_token may warn on stdout (a token file others can read): keep stdout for --json.
        with contextlib.redirect_stdout(sys.stderr):
            token = load_token(args.token_file)
            tls = _tls(args)
        if token is None:
            raise StatusError("no token: give --token-file FILE (or set FEDMOE_TOKEN)")
        if not args.timeout > 0:
            raise StatusError("--timeout must be positive")
        status = fetch_status(args.coordinator, token, tls, args.timeout)
    except (StatusError, CredentialError) as e:
        print(f"fedmoe status: {e}", file=sys.stderr)
        return 1
    except SystemExit as e:  # load_tls says what is missing this way
        print(f"fedmoe status: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, sort_keys=True))
    else:
        print(format_status(status))
    return 0


def _tls(args: argparse.Namespace) -> Any:
    if not args.tls:
        return None
    if not args.certs:
        raise StatusError("--tls needs --certs DIR (made by `fedmoe certs DIR`)")
    from fedmoe.common.tls import load_tls

    try:
        return load_tls(args.certs, args.cert_name)
    except ValueError as e:  # a certificate name that is no safe file name
        raise StatusError(f"--cert-name: {e}") from None
