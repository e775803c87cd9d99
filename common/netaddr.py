"""Small helpers for host:port strings, and the check of addresses that peers advertise."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from fedmoe.common.logsafe import clip


def _parse_host_port(address: str) -> tuple[str, int, bool]:
    """The one parser of HOST:PORT and [IPv6]:PORT: (host without brackets, port, bracketed).

    ValueError's message follows the (clipped) address: "'x' is not HOST:PORT".
    """
    bracketed = address.startswith("[")
    if bracketed:
        end = address.find("]")
        if end < 0 or not address[end + 1 :].startswith(":"):
            raise ValueError(f"{clip(address)} is not [IPv6]:PORT")
        host, port_text = address[1:end], address[end + 2 :]
    else:
        host, _, port_text = address.rpartition(":")
    if not host or not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise ValueError(f"{clip(address)} is not HOST:PORT")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{clip(address)}: port must be at most 65535")
    return host, port, bracketed


def split_host_port(address: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT -> (host without brackets, port in 0..65535); ValueError if not."""
    host, port, _ = _parse_host_port(address)
    return host, port


def is_loopback_listen(address: str) -> bool:
    """True for a loopback host (also usable for a connect address)."""
    host, _ = split_host_port(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- advertise addresses

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_ADDRESS_CHARS = 255
MAX_ALLOW_NETWORKS = 64
_ADDRESS_CHARS = re.compile(r"[A-Za-z0-9.:\[\]-]+")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# A name made only of these labels is read as an IPv4 address by inet_aton/getaddrinfo
# ("2852039166", "0xa9.0xfe.43518", "127.1"): it could reach what the IP checks refuse.
_NUMERIC_LABEL = re.compile(r"(?:0[xX][0-9A-Fa-f]*|[0-9]+)")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # well-known NAT64 prefix: an IPv4 address inside


def _refused_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why this IP may not be advertised (None: it may)."""
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_link_local:  # 169.254.0.0/16 (cloud metadata 169.254.169.254) and fe80::/10
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip == _BROADCAST:
        return "the broadcast address"
    return None


def _embedded_v4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one leads to (v4-mapped, NAT64), if any."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _check_dns_name(host: str) -> str:
    if len(host) > 253:
        raise ValueError("the host name is longer than 253 characters")
    labels = host.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError("the host is neither an IP address nor a valid DNS name (RFC 1123)")
    if all(_NUMERIC_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise ValueError("the host looks like a numeric IPv4 form; write it as a dotted quad")
    return host.lower()


def check_advertise(address: str, allow: Sequence[Network] = ()) -> str:
    """Check an address a peer asks others to connect to; returns it normalised as host:port.

    Other peers dial whatever a member advertises, so a hostile member could point them at the
    cloud metadata service, another port of a machine, or a 4 MiB name. Accepted: HOST:PORT only,
    HOST an IP literal (IPv6 in brackets) or an RFC 1123 DNS name, PORT 1..65535; refused:
    link-local, multicast, unspecified and broadcast addresses. With a non-empty `allow` list
    only IP literals inside one of its networks are accepted: names are refused, since
    resolving an attacker's name would let it choose the address later. Loopback is allowed
    without an allow-list (local runs).
    """
    if len(address) > MAX_ADDRESS_CHARS:
        raise ValueError(f"advertise address is longer than {MAX_ADDRESS_CHARS} characters")
    bad = f"advertise address {clip(address)}"
    if not _ADDRESS_CHARS.fullmatch(address):
        raise ValueError(f"{bad} is not HOST:PORT (no scheme, path, user or spaces)")
    try:
        host, port, bracketed = _parse_host_port(address)
    except ValueError as e:
        raise ValueError(f"advertise address {e}") from None
    if not bracketed and ":" in host:
        raise ValueError(f"{bad}: write an IPv6 address in brackets, [ADDR]:PORT")
    if not 1 <= port <= 65535:
        raise ValueError(f"{bad}: port must be 1..65535")

    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if bracketed != isinstance(ip, ipaddress.IPv6Address):
        raise ValueError(f"{bad}: brackets hold an IPv6 address, and only one: [ADDR]:PORT")
    if ip is None:
        name = _check_dns_name(host)
        if allow:
            raise ValueError(f"{bad}: only IP addresses inside --advertise-allow are accepted")
        return f"{name}:{port}"
    inner = _embedded_v4(ip)
    for candidate in (ip, inner):
        why = _refused_ip(candidate) if candidate is not None else None
        if why is not None:
            raise ValueError(f"{bad} is {why}")
    if allow and not any(
        a in net for a in (ip, inner) if a is not None for net in allow if a.version == net.version
    ):
        raise ValueError(f"{bad} is outside the networks of --advertise-allow")
    shown = f"[{ip.compressed}]" if ip.version == 6 else str(ip)
    return f"{shown}:{port}"


def parse_cidrs(text: str) -> list[Network]:
    """Networks from a comma-separated list ("10.0.0.0/8, fd00::/8"); empty text: none."""
    if len(text) > 64 * MAX_ALLOW_NETWORKS:
        raise ValueError("the network list is too long")
    networks: list[Network] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            # Not strict: "10.0.0.5/24" means the /24 it lies in.
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{clip(item)} is not a network (CIDR such as 10.0.0.0/8)") from None
    if len(networks) > MAX_ALLOW_NETWORKS:
        raise ValueError(f"more than {MAX_ALLOW_NETWORKS} networks")
    return networks
