"""Wire bytes: what this node's network interfaces really carried, from the kernel's counters.

Application bytes (common/accounting.py) are message sizes; wire bytes add everything below them
(gRPC framing, HTTP/2, TCP/IP and Ethernet headers, ACKs, retransmissions). They only mean
something when the node has interfaces of its own: a container, a network namespace or a
dedicated machine. `auto` uses every non-loopback interface when this process runs in a
container or in a network namespace other than the host's; elsewhere nothing is measured (a
shared host interface would count other programs' traffic). Name interfaces explicitly
(`--wire-iface eth0`, or FEDMOE_WIRE_IFACE) on a dedicated machine. A node that talks over
loopback is never measured by `auto`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SYS_NET = Path("/sys/class/net")
METHOD = "kernel interface counters: /sys/class/net/<iface>/statistics/{rx,tx}_bytes"


def _in_own_network() -> bool:
    if Path("/.dockerenv").exists():
        return True
    try:  # `ip netns exec` and similar: not the namespace of PID 1 (the host's init)
        return os.stat("/proc/self/ns/net").st_ino != os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return False


@dataclass
class InterfaceCounters:
    interfaces: list[str]

    def read(self) -> tuple[int, int]:
        """(received, sent) bytes summed over the interfaces."""
        rx = tx = 0
        for iface in self.interfaces:
            stats = SYS_NET / iface / "statistics"
            rx += int((stats / "rx_bytes").read_text())
            tx += int((stats / "tx_bytes").read_text())
        return rx, tx


def detect(setting: str | None, on_loopback: bool) -> InterfaceCounters | None:
    """`on_loopback`: this node talks over loopback, which no interface counter but lo sees."""
    setting = setting or os.environ.get("FEDMOE_WIRE_IFACE") or "auto"
    if setting == "off":
        return None
    if setting == "auto":
        if on_loopback or not _in_own_network() or not SYS_NET.is_dir():
            return None
        names = sorted(p.name for p in SYS_NET.iterdir() if p.name != "lo")
    else:
        names = [n.strip() for n in setting.split(",") if n.strip()]
        missing = [n for n in names if not (SYS_NET / n / "statistics").is_dir()]
        if missing:
            raise SystemExit(f"--wire-iface: no such interface {', '.join(missing)}")
    return InterfaceCounters(names) if names else None


class WireMeter:
    """Per-round deltas of the interface counters (None when nothing is measured)."""

    def __init__(self, counters: InterfaceCounters | None) -> None:
        self.counters = counters
        self._last = counters.read() if counters else (0, 0)
        self.total = [0, 0]

    @property
    def measured(self) -> bool:
        return self.counters is not None

    def lap(self) -> tuple[int, int] | None:
        """(received, sent) since the previous lap."""
        if self.counters is None:
            return None
        now = self.counters.read()
        delta = (now[0] - self._last[0], now[1] - self._last[1])
        self._last = now
        self.total[0] += delta[0]
        self.total[1] += delta[1]
        return delta
