"""`fedmoe peer --advertise auto[:PORT]`: advertise this host's own address.

Meant for replicas that share one command line (`docker compose up --scale peer=N`): none knows
its name in advance. The address is the one this host uses to reach the coordinator: the source
address the kernel picks for a UDP socket "connected" to it (connect() on UDP sends nothing; it
only chooses a route). On a bridge network that is the container's address on it, which is the
one the other peers reach too. The coordinator still checks it like any advertised address.
"""

from __future__ import annotations

import ipaddress
import socket

from fedmoe.common.netaddr import check_advertise, split_host_port

AUTO = "auto"


def auto_advertise_port(advertise: str) -> int | None:
    """None if `advertise` is not auto; else the port to advertise (0: the listening port)."""
    if advertise != AUTO and not advertise.startswith(AUTO + ":"):
        return None
    text = advertise[len(AUTO) + 1 :]
    if advertise == AUTO:
        return 0
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and 0 < int(text) <= 65535):
        raise SystemExit(
            f"peer: --advertise {advertise[:40]!r}: use auto (the listening port) or auto:PORT "
            "with PORT in 1..65535"
        )
    return int(text)


def own_address(coordinator: str, port: int) -> str:
    """HOST:PORT with HOST this host's address towards `coordinator` (SystemExit if none)."""
    host = _route_source(coordinator) or _hostname_address()
    if host is None:
        raise SystemExit(
            "peer: --advertise auto found no address of this host: give --advertise HOST:PORT"
        )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        return check_advertise(address)
    except ValueError as e:
        raise SystemExit(f"peer: --advertise auto: {e}: give --advertise HOST:PORT") from e


def _route_source(coordinator: str) -> str | None:
    """The source address of a route to the coordinator (None if it cannot be resolved)."""
    try:
        host, port = split_host_port(coordinator)
        infos = socket.getaddrinfo(host, port or 1, type=socket.SOCK_DGRAM)
    except (ValueError, OSError):
        return None
    for family, kind, proto, _, target in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.connect(target)  # UDP: picks a route, sends nothing
                source = str(s.getsockname()[0]).split("%", 1)[0]  # no IPv6 zone
        except OSError:
            continue
        if not ipaddress.ip_address(source).is_unspecified:
            return source
    return None


def _hostname_address() -> str | None:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None
