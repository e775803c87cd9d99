"""Advertise addresses: only host:port that other peers may safely dial is accepted."""

from __future__ import annotations

import ipaddress

import pytest

from fedmoe.common.netaddr import check_advertise, parse_cidrs


@pytest.mark.parametrize(
    ("address", "normalised"),
    [
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        ("10.1.2.3:1", "10.1.2.3:1"),
        ("192.168.0.7:65535", "192.168.0.7:65535"),
        ("localhost:7000", "localhost:7000"),
        ("Peer-3.Example.org:443", "peer-3.example.org:443"),
        ("[::1]:5000", "[::1]:5000"),
        ("[2001:DB8:0:0::1]:8080", "[2001:db8::1]:8080"),
        ("10.0.0.1:0080", "10.0.0.1:80"),
    ],
)
def test_accepted(address: str, normalised: str) -> None:
    assert check_advertise(address) == normalised


@pytest.mark.parametrize(
    ("address", "why"),
    [
        # link-local, the cloud metadata address included, in every spelling
        ("169.254.169.254:80", "link-local"),
        ("169.254.1.1:5000", "link-local"),
        ("[fe80::1]:5000", "link-local"),
        ("[::ffff:169.254.169.254]:80", "link-local"),
        ("[64:ff9b::a9fe:a9fe]:80", "link-local"),
        ("2852039166:80", "numeric"),
        ("0xa9fea9fe:80", "numeric"),
        ("0xa9.0xfe.0xa9.0xfe:80", "numeric"),
        ("169.254.43518:80", "numeric"),
        ("127.1:80", "numeric"),
        ("0251.0376.0251.0376:80", "numeric"),
        # multicast, unspecified, broadcast
        ("224.0.0.1:5000", "multicast"),
        ("[ff02::1]:5000", "multicast"),
        ("0.0.0.0:5000", "unspecified"),
        ("[::]:5000", "unspecified"),
        ("255.255.255.255:5000", "broadcast"),
        # ports
        ("10.0.0.1:0", "port"),
        ("10.0.0.1:65536", "port"),
        ("10.0.0.1:999999", "HOST:PORT"),
        ("10.0.0.1", "HOST:PORT"),
        ("10.0.0.1:", "HOST:PORT"),
        ("10.0.0.1:-1", "HOST:PORT"),
        (":5000", "HOST:PORT"),
        # not host:port
        ("http://10.0.0.1:5000", "HOST:PORT"),
        ("10.0.0.1:5000/path", "HOST:PORT"),
        ("user@10.0.0.1:5000", "HOST:PORT"),
        ("10.0.0.1 :5000", "HOST:PORT"),
        ("10.0.0.1:5000\n", "HOST:PORT"),
        ("[fe80::1%eth0]:5000", "HOST:PORT"),
        ("::1:5000", "brackets"),
        ("[10.0.0.1]:5000", "brackets"),
        ("[::1]5000", "[IPv6]:PORT"),
        ("[::1:5000", "[IPv6]:PORT"),
        # DNS names
        ("-bad.example:5000", "DNS name"),
        ("bad-.example:5000", "DNS name"),
        ("under_score.example:5000", "HOST:PORT"),
        ("a..b:5000", "DNS name"),
        ("example.com.:5000", "DNS name"),
        (f"{'a' * 64}.example:5000", "DNS name"),
        (".".join(["a" * 63] * 4) + ":5000", "longer than 255"),
        # size
        ("a" * 4_000_000 + ":5000", "longer than 255"),
    ],
)
def test_refused(address: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        check_advertise(address)
    message = str(info.value)
    assert why in message, message
    assert len(message) < 200  # the attacker's string is clipped


ALLOW = parse_cidrs("10.0.0.0/8, fd00::/8,192.168.5.0/24")


def test_allow_list_accepts_only_ip_literals_inside() -> None:
    assert check_advertise("10.2.3.4:5000", ALLOW) == "10.2.3.4:5000"
    assert check_advertise("[fd00::7]:5000", ALLOW) == "[fd00::7]:5000"
    assert check_advertise("[::ffff:10.0.0.9]:5000", ALLOW) == "[::ffff:a00:9]:5000"
    for outside in ("11.0.0.1:5000", "192.168.6.1:5000", "[fe00::1]:5000", "127.0.0.1:5000"):
        with pytest.raises(ValueError, match="outside"):
            check_advertise(outside, ALLOW)
    for name in ("localhost:5000", "peer.example.org:5000"):  # never resolved
        with pytest.raises(ValueError, match="only IP addresses"):
            check_advertise(name, ALLOW)


def test_allow_list_does_not_reopen_refused_classes() -> None:
    everything = parse_cidrs("0.0.0.0/0,::/0")
    assert check_advertise("8.8.8.8:53", everything) == "8.8.8.8:53"
    for refused in ("169.254.169.254:80", "224.0.0.1:1", "[fe80::1]:1", "0.0.0.0:1"):
        with pytest.raises(ValueError):
            check_advertise(refused, everything)


def test_parse_cidrs() -> None:
    assert parse_cidrs("") == []
    assert parse_cidrs(" , ") == []
    assert parse_cidrs("10.0.0.5/24") == [ipaddress.ip_network("10.0.0.0/24")]
    assert parse_cidrs("10.0.0.1") == [ipaddress.ip_network("10.0.0.1/32")]
    with pytest.raises(ValueError, match="not a network"):
        parse_cidrs("10.0.0.0/33")
    with pytest.raises(ValueError) as info:
        parse_cidrs("x" * 100_000)
    assert len(str(info.value)) < 200
    with pytest.raises(ValueError, match="more than"):
        parse_cidrs(",".join(f"10.0.{i}.0/24" for i in range(65)))
