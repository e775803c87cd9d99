"""Multi-host test topologies on one machine: network namespaces on a private, shaped link.

Each host is a netns `fm-<name>` with `lo` up and `eth0` = 10.213.77.<k>/24 (k = 1, 2, ... in the
order given). Nothing is routed anywhere else: the hosts have no default route, no IPv6, and the
root namespace gets no address, no route and no interface on 10.213.77.0/24, so test traffic can
only go host <-> host (or over a host's own loopback).

Two link backends (`link=`):

* "veth" (kernel): `eth0` is one end of a veth pair whose other end, `fm-<name>-h`, is a port of
  the bridge `fm-br0` (no IP address). Shaping is a qdisc on each host's eth0 egress, inside the
  host's namespace: `netem rate R delay D limit L` where the kernel has sch_netem, else
  `tbf rate R burst 128k limit L*1514` (rate only; tbf cannot delay).
* "wire" (user space): for kernels without sch_netem (this machine: CONFIG_NET_SCH_NETEM is not
  set; only tbf/htb exist, so there is no kernel way to add delay). `eth0` is a TAP device held
  by a small switch process (`netns.py _wire`, run inside the switch namespace) that forwards
  Ethernet frames between the hosts, MAC-learning, and shapes each host's egress exactly like the
  netem qdisc would: a FIFO served at `rate` (bytes counted as on the wire after segmentation:
  TSO super-frames pay one L2/L3/L4 header per MSS segment, as tc does for GSO packets), then a
  fixed `delay`, tail drop when more than `limit` MTU-sized segments wait for the serializer.
  TAP offloads (TSO/checksum via IFF_VNET_HDR) are on, so frames of up to 64 KB cross and the
  switch needs few syscalls.
* "auto" (default): "veth", unless a delay is asked for and the kernel has no netem: "wire".

Per-host rates (`host_rates={name: (egress, ingress)}`, veth only): a host's egress rate replaces
`rate` on its eth0; its ingress rate shapes what the bridge sends to it (a tbf on its bridge port
`fm-<name>-h`, in the switch namespace), so a host's downlink can be narrower than its senders'
uplinks (a server bottleneck). Either may be None (egress: `rate`; ingress: unshaped).

Both directions of every host link are shaped: A -> B leaves A's eth0 through A's shaper, B -> A
through B's. `delay` is one-way, so the round-trip time between two hosts is 2 x delay. `limit`
is the buffer in front of each shaped link, in packets of MTU size (default 1000, netem's
default); packets in the delay line (propagation) do not count (for netem, whose own limit covers
them too, rate x delay worth of packets is added).

Where the bridge lives. The bridge (veth) or the switch process (wire) lives in a dedicated
"switch" namespace `fm-sw`, not in the root namespace. Reason: with br_netfilter loaded (it is, on
this Docker host) and `net.bridge.bridge-nf-call-iptables=1` in the root namespace, bridged IPv4
frames of a root-namespace bridge traverse the root iptables FORWARD chain, whose policy is DROP
under Docker: host-to-host traffic would be silently dropped. That sysctl is per namespace and a
per-bridge `nf_call_iptables 0` cannot override a global 1, so a root bridge would need changes to
the root namespace's firewall or sysctls. Inside `fm-sw` we set bridge-nf-call-{iptables,
ip6tables,arptables}=0 (its iptables is empty anyway), touching nothing outside our namespaces.
`bridge_in_root=True` (`--bridge-in-root`, veth only) builds the bridge and the `-h` ports in the
root namespace (IPv6 address generation off, so they get no address at all); it refuses to start
while the root namespace's bridge-nf-call-iptables is 1 unless `force=True`.

Usage (needs root, iproute2):
  python scripts/netns.py up --hosts h1,h2 [--rate 100mbit] [--delay 20ms] [--link wire]
  python scripts/netns.py exec h2 -- CMD ...           # run CMD inside fm-h2
  python scripts/netns.py counters h1                  # eth0 rx/tx bytes in fm-h1
  python scripts/netns.py down                         # same as cleanup
  python scripts/netns.py run --hosts h1,h2 [...] -- CMD ...   # up, run CMD (root ns), down
  python scripts/netns.py check [--rate R] [--delay D] [--link L]   # 2-host TCP echo check
  python scripts/netns.py cleanup                      # remove every fm-* netns and link
`up` with link "wire" keeps a switch process running in fm-sw until `down`. In `run`, CMD sees
FM_NS_<NAME> (netns name) and FM_ADDR_<NAME> (address) for every host.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import json
import math
import os
import re
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

SUBNET = "10.213.77"
PREFIX_LEN = 24
IFNAMSIZ = 15  # Linux interface names: at most 15 characters
MTU_FRAME = 1514  # bytes of one full-size Ethernet frame (MTU 1500 + 14)
DEFAULT_LIMIT = 1000  # queue limit in MTU-size packets (netem's default)
_NAME_RE = re.compile(r"^[a-z0-9]+$")


class NetnsError(RuntimeError):
    pass


def _sh(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, text=True, capture_output=True)
    if check and p.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def _in_ns(ns: str, script: str) -> None:
    _sh(["ip", "netns", "exec", ns, "sh", "-c", script])


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def parse_rate(rate: str) -> float:
    """tc-style rate -> bits per second ("100mbit", "1gbit", "500kbit", "10mbps" = bytes)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(bit|bps)?", rate.strip().lower())
    if not m:
        raise ValueError(f"bad rate {rate!r}")
    mult = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2)]
    return float(m.group(1)) * mult * (8 if m.group(3) == "bps" else 1)


def parse_time(t: str) -> float:
    """tc-style time -> seconds ("20ms", "500us", "1s")."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|ms|msec|us|usec)?", t.strip().lower())
    if not m:
        raise ValueError(f"bad time {t!r}")
    unit = {None: 1e-6, "s": 1, "sec": 1, "ms": 1e-3, "msec": 1e-3, "us": 1e-6, "usec": 1e-6}
    return float(m.group(1)) * unit[m.group(2)]


_netem_cache: bool | None = None


def netem_available(prefix: str = "fm-") -> bool:
    """Does this kernel have sch_netem? Probed once on the loopback of a throwaway namespace."""
    global _netem_cache
    if _netem_cache is None:
        ns = f"{prefix}probe"
        _sh(["ip", "netns", "add", ns])
        try:
            r = _sh(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                    check=False)  # fmt: skip
            _netem_cache = r.returncode == 0
        finally:
            _sh(["ip", "netns", "del", ns], check=False)
    return _netem_cache


def list_netns(prefix: str = "fm-") -> list[str]:
    out = _sh(["ip", "-j", "netns", "list"], check=False).stdout.strip()
    names = [e["name"] for e in json.loads(out)] if out else []
    return [n for n in names if n.startswith(prefix)]


def list_root_links(prefix: str = "fm-") -> list[str]:
    out = _sh(["ip", "-j", "link", "show"]).stdout
    return [e["ifname"] for e in json.loads(out) if e["ifname"].startswith(prefix)]


def _ns_pids(ns: str) -> list[int]:
    return [int(p) for p in _sh(["ip", "netns", "pids", ns], check=False).stdout.split()]


def _kill_ns_pids(ns: str) -> None:
    """Processes still inside one of our namespaces (started by our tests): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 1.0)):
        pids = _ns_pids(ns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _ns_pids(ns):
            time.sleep(0.05)


def cleanup(prefix: str = "fm-", verbose: bool = False) -> list[str]:
    """Remove every netns and root-namespace link whose name starts with `prefix`."""
    if len(prefix) < 2 or not prefix.endswith("-"):
        raise NetnsError(f"refusing to clean up with prefix {prefix!r}")
    removed = []
    # Stop processes first, the switch namespace's first (its switch process owns the hosts'
    # TAPs), then delete the namespaces (with them their veths, bridge or TAPs).
    spaces = sorted(list_netns(prefix), key=lambda n: n != f"{prefix}sw")
    for ns in spaces:
        _kill_ns_pids(ns)
    for ns in spaces:
        _sh(["ip", "netns", "del", ns], check=False)
        removed.append(f"netns {ns}")
    for link in list_root_links(prefix):  # --bridge-in-root leftovers: bridge and -h ports
        if _sh(["ip", "link", "del", link], check=False).returncode == 0:
            removed.append(f"link {link}")
    if verbose:
        for r in removed:
            print(f"removed {r}")
    return removed


class Topology:
    """N hosts on one private, optionally shaped, link. Context manager: builds on enter and
    always removes everything it made on exit (also when building failed half way)."""

    def __init__(
        self,
        names: list[str],
        rate: str | None = None,
        delay: str | None = None,
        prefix: str = "fm-",
        limit: int | None = None,
        link: str = "auto",
        bridge_in_root: bool = False,
        force: bool = False,
        host_rates: dict[str, tuple[str | None, str | None]] | None = None,
    ) -> None:
        if not names:
            raise ValueError("need at least one host")
        if len(names) > 254:
            raise ValueError("at most 254 hosts in a /24")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate host names in {names}")
        for n in names:
            if not _NAME_RE.match(n):
                raise ValueError(f"host name {n!r}: use lowercase letters and digits only")
            if len(f"{prefix}{n}-h") > IFNAMSIZ:
                raise ValueError(
                    f"host name {n!r} too long: {prefix}{n}-h exceeds {IFNAMSIZ} characters"
                )
            if n in ("sw", "br0", "probe"):
                raise ValueError(f"host name {n!r} is reserved")
        if link not in ("auto", "veth", "wire"):
            raise ValueError(f"link must be auto, veth or wire, not {link!r}")
        if rate:
            parse_rate(rate)
        if delay:
            parse_time(delay)
        if bridge_in_root and link == "wire":
            raise ValueError("bridge_in_root applies to the veth link only")
        host_rates = dict(host_rates or {})
        for n, pair in host_rates.items():
            if n not in names:
                raise ValueError(f"host_rates names {n!r}, not a host of {names}")
            for r in pair:
                if r:
                    parse_rate(r)
        if host_rates and link == "wire":
            raise ValueError("host_rates apply to the veth link only")
        self.host_rates = host_rates
        self.names = list(names)
        self.rate, self.delay = rate, delay
        self.limit = limit or DEFAULT_LIMIT
        self.prefix = prefix
        self.link = link
        self.bridge = f"{prefix}br0"
        self.bridge_in_root = bridge_in_root
        self.switch_ns = f"{prefix}sw"
        self.force = force
        self.shaper = "none"  # what was applied, for reports
        self._made_ns: list[str] = []
        self._made_links: list[str] = []  # root-namespace links (bridge_in_root only)
        self._wire: subprocess.Popen | None = None
        self.persistent = False  # (CLI `up`) the wire switch does not watch our stdin

    # -- naming -----------------------------------------------------------------------------
    def netns(self, name: str) -> str:
        self._check(name)
        return f"{self.prefix}{name}"

    def port(self, name: str) -> str:
        self._check(name)
        return f"{self.prefix}{name}-h"

    def address(self, name: str) -> str:
        self._check(name)
        return f"{SUBNET}.{self.names.index(name) + 1}"

    def exec_prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns(name)]

    def _check(self, name: str) -> None:
        if name not in self.names:
            raise KeyError(f"no host {name!r} in this topology ({self.names})")

    # -- measurements -----------------------------------------------------------------------
    def counters(self, name: str) -> tuple[int, int]:
        """(rx_bytes, tx_bytes) of eth0 inside the host's namespace."""
        out = _sh(["ip", "-n", self.netns(name), "-s", "-j", "link", "show", "dev", "eth0"]).stdout
        stats = json.loads(out)[0]["stats64"]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])

    def describe(self) -> str:
        where = "root ns" if self.bridge_in_root else self.switch_ns
        kind = f"veth + bridge {self.bridge} in {where}" if self.link == "veth" else (
            f"TAP + user-space switch in {where}")  # fmt: skip
        return f"{kind}; shaping per host egress: {self.shaper}"

    # -- build / tear down ------------------------------------------------------------------
    def _ip_sw(self, *args: str) -> None:
        """`ip` in the namespace that holds the bridge."""
        pre = ["ip"] if self.bridge_in_root else ["ip", "-n", self.switch_ns]
        _sh([*pre, *args])

    def up(self) -> Topology:
        if self.link == "auto":
            self.link = "wire" if self.delay and not netem_available(self.prefix) else "veth"
            if self.host_rates and self.link == "wire":
                raise NetnsError("host_rates need the veth link, and a delay on it needs netem")
        ours = {self.netns(n) for n in self.names} | {self.switch_ns}
        taken = set(list_netns(self.prefix)) & ours
        taken |= set(list_root_links(self.prefix)) & (
            {self.port(n) for n in self.names} | {self.bridge}
        )
        if taken:
            raise NetnsError(
                f"already exists: {sorted(taken)}; run `python scripts/netns.py cleanup`"
            )
        if self.bridge_in_root and not self.force:
            if _read("/proc/sys/net/bridge/bridge-nf-call-iptables") == "1":
                raise NetnsError(
                    "root namespace has net.bridge.bridge-nf-call-iptables=1: bridged frames go "
                    "through the root iptables FORWARD chain (policy DROP under Docker). Use the "
                    "default switch namespace instead, or force=True if you know it passes."
                )
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _add_ns(self, ns: str) -> None:
        _sh(["ip", "netns", "add", ns])
        self._made_ns.append(ns)
        # No IPv6 at all (no link-local addresses, DAD, RS or MLD on the link).
        _in_ns(ns, "for k in all default; do echo 1 > /proc/sys/net/ipv6/conf/$k/disable_ipv6; "
                   "done 2>/dev/null; true")  # fmt: skip

    def _build(self) -> None:
        if not self.bridge_in_root:
            self._add_ns(self.switch_ns)
            # Per-namespace: bridged frames in fm-sw skip iptables (root ns untouched).
            _in_ns(self.switch_ns, "for k in iptables ip6tables arptables; do "
                   "f=/proc/sys/net/bridge/bridge-nf-call-$k; [ ! -e $f ] || echo 0 > $f; done")  # fmt: skip
        for name in self.names:
            self._add_ns(self.netns(name))
        if self.link == "veth":
            self._build_veth()
        else:
            self._build_wire()
        for name in self.names:
            ns = self.netns(name)
            _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            _sh(
                ["ip", "-n", ns, "addr", "add", f"{self.address(name)}/{PREFIX_LEN}", "dev", "eth0"]
            )
            _sh(["ip", "-n", ns, "link", "set", "eth0", "up"])
        self._wait_links()

    def _build_veth(self) -> None:
        if self.bridge_in_root:
            _sh(["ip", "link", "add", self.bridge, "type", "bridge", "stp_state", "0"])
            self._made_links.append(self.bridge)
            _sh(["ip", "link", "set", self.bridge, "addrgenmode", "none"])  # no IPv6 LL address
        else:
            self._ip_sw("link", "add", self.bridge, "type", "bridge", "stp_state", "0")
        self._ip_sw("link", "set", self.bridge, "up")
        qdisc = self._veth_qdisc()
        for name in self.names:
            ns, port = self.netns(name), self.port(name)
            # The pair is made where the bridge lives, with the host end straight in `ns`.
            self._ip_sw("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            if self.bridge_in_root:
                self._made_links.append(port)
                _sh(["ip", "link", "set", port, "addrgenmode", "none"])
            self._ip_sw("link", "set", port, "master", self.bridge)
            self._ip_sw("link", "set", port, "up")
            egress, ingress = self.host_rates.get(name, (None, None))
            own = self._veth_qdisc(egress) if egress else qdisc
            if own:
                _sh(["tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root", *own])
            if ingress:  # the bridge's egress towards this host: the host's downlink
                pre = ["tc"] if self.bridge_in_root else ["tc", "-n", self.switch_ns]
                _sh([*pre, "qdisc", "add", "dev", port, "root", *self._tbf(ingress)])
        if self.host_rates:
            base = "" if self.shaper == "none" else f"{self.shaper}; "
            self.shaper = f"{base}tbf per host (egress/ingress): " + ", ".join(
                f"{n} {e or self.rate or '-'}/{i or '-'}" for n, (e, i) in self.host_rates.items()
            )

    def _veth_qdisc(self, rate: str | None = None) -> list[str]:
        """The egress qdisc at `rate` (default: the topology's rate) and the delay."""
        rate = rate or self.rate
        if not (rate or self.delay):
            return []
        if netem_available(self.prefix):
            q = ["netem"]
            q += ["rate", rate] if rate else []
            q += ["delay", self.delay] if self.delay else []
            # netem's limit also covers packets in the delay line: add rate x delay of them,
            # so that `limit` means the buffer in front of the link, as for the wire switch.
            inflight = 0
            if rate and self.delay:
                inflight = math.ceil(parse_rate(rate) / 8 * parse_time(self.delay) / MTU_FRAME)
            q += ["limit", str(self.limit + inflight)]
        elif self.delay:
            raise NetnsError("no sch_netem in this kernel: a delay needs link='wire'")
        else:
            assert rate
            q = self._tbf(rate)
        if rate == self.rate:
            self.shaper = " ".join(q)
        return q

    def _tbf(self, rate: str) -> list[str]:
        # tbf: burst must hold a whole 64 KB TSO frame (else tbf segments it), limit in bytes.
        burst = max(131072, int(parse_rate(rate) / 8 / 1000))  # >= 1 ms at rate
        return ["tbf", "rate", rate, "burst", str(burst), "limit", str(self.limit * MTU_FRAME)]

    def _build_wire(self) -> None:
        cmd = ["ip", "netns", "exec", self.switch_ns, sys.executable, os.path.abspath(__file__),
               "--prefix", self.prefix, "_wire", "--hosts", ",".join(self.names),
               "--limit", str(self.limit)]  # fmt: skip
        cmd += ["--rate", self.rate] if self.rate else []
        cmd += ["--delay", self.delay] if self.delay else []
        if self.persistent:
            cmd += ["--detached"]
        self._wire = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL if self.persistent else subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, start_new_session=self.persistent,
        )  # fmt: skip
        assert self._wire.stdout is not None
        line = self._wire.stdout.readline().strip()
        if line != "ready":
            raise NetnsError(f"wire switch did not start (said {line!r})")
        self.shaper = "user-space FIFO " + " ".join(
            [f"rate {self.rate}" if self.rate else "unlimited"]
            + ([f"delay {self.delay}"] if self.delay else [])
            + [f"limit {self.limit}"]
        )

    def _wait_links(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for name in self.names:
            while True:
                out = _sh(
                    ["ip", "-n", self.netns(name), "-j", "link", "show", "dev", "eth0"]
                ).stdout
                if json.loads(out)[0].get("operstate") in ("UP", "UNKNOWN"):
                    break
                if time.monotonic() > deadline:
                    raise NetnsError(f"eth0 in {self.netns(name)} did not come up")
                time.sleep(0.05)

    def down(self) -> None:
        """Delete everything this object made; never raises on already-missing pieces."""
        if self._wire is not None:
            try:
                if self._wire.stdin:
                    self._wire.stdin.close()
                self._wire.wait(timeout=3)
            except (subprocess.TimeoutExpired, OSError):
                self._wire.kill()
                self._wire.wait()
            self._wire = None
        for ns in reversed([n for n in self._made_ns if n != self.switch_ns]):
            _kill_ns_pids(ns)
            _sh(["ip", "netns", "del", ns], check=False)
        if self.switch_ns in self._made_ns:
            _kill_ns_pids(self.switch_ns)
            _sh(["ip", "netns", "del", self.switch_ns], check=False)
        for link in reversed(self._made_links):
            _sh(["ip", "link", "del", link], check=False)  # may be gone with its veth peer
        self._made_ns.clear()
        self._made_links.clear()

    def __enter__(self) -> Topology:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


# -- user-space shaped switch ("wire" link) -------------------------------------------------
TUNSETIFF, TUNSETOFFLOAD = 0x400454CA, 0x400454D0
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
VNET_HDR = 10  # struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start, csum_off


def wire_main(
    prefix: str, names: list[str], rate: str | None, delay: str | None, limit: int,
    detached: bool = False,
) -> int:  # fmt: skip
    """Runs inside the switch namespace: one TAP per host, moved into the host's namespace as
    eth0; frames are switched between them through a per-source FIFO (rate, then delay).
    Exits when stdin closes (unless detached) or on SIGTERM; the TAPs disappear with it."""
    bps = parse_rate(rate) if rate else None
    lat = parse_time(delay) if delay else 0.0
    fds: list[int] = []
    for name in names:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        tap = f"{prefix}{name}-t"
        fcntl.ioctl(
            fd, TUNSETIFF, struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        )
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
        _sh(["ip", "link", "set", tap, "netns", f"{prefix}{name}"])
        _sh(["ip", "-n", f"{prefix}{name}", "link", "set", tap, "name", "eth0"])
        fds.append(fd)
    print("ready", flush=True)

    n = len(fds)
    port_of = {fd: i for i, fd in enumerate(fds)}
    macs: dict[bytes, int] = {}
    queues: list[collections.deque] = [collections.deque() for _ in range(n)]
    # Per source: segments still waiting for the serializer (the buffer; tail drop above
    # `limit`), with the times they finish serializing. Frames in the delay line do not count.
    backlog = [0] * n
    buffered: list[collections.deque] = [collections.deque() for _ in range(n)]
    busy_until = [0.0] * n  # when each source's serializer is free
    drops = 0
    stdin = -1 if detached else sys.stdin.fileno()
    readers = fds if detached else [*fds, stdin]
    while True:
        now = time.monotonic()
        next_due = None
        for i, q in enumerate(queues):
            while q and q[0][0] <= now:
                _, frame, dst = q.popleft()
                for j in range(n) if dst is None else (dst,):
                    if j != i:
                        try:
                            os.write(fds[j], frame)
                        except OSError:
                            drops += 1
            if q and (next_due is None or q[0][0] < next_due):
                next_due = q[0][0]
        timeout = None if next_due is None else max(0.0, next_due - time.monotonic())
        ready, _, _ = select.select(readers, [], [], timeout)
        for fd in ready:
            if fd == stdin:
                if not os.read(stdin, 4096):
                    return 0
                continue
            i = port_of[fd]
            for _ in range(256):
                try:
                    frame = os.read(fd, 65536 + 4096)
                except BlockingIOError:
                    break
                except OSError:  # the TAP went away with its namespace: we are done
                    return 0
                if len(frame) < VNET_HDR + 14:
                    continue
                now = time.monotonic()
                macs[frame[VNET_HDR + 6 : VNET_HDR + 12]] = i
                dmac = frame[VNET_HDR : VNET_HDR + 6]
                dst = None if dmac[0] & 1 else macs.get(dmac)
                # Bytes on the wire: a TSO frame pays its headers once per MSS-size segment.
                wire = len(frame) - VNET_HDR
                segs = 1
                if frame[1]:  # gso_type != NONE
                    hdr_len, gso_size = struct.unpack_from("<HH", frame, 2)
                    hdr_len = hdr_len or 66
                    if gso_size:
                        segs = max(1, math.ceil((wire - hdr_len) / gso_size))
                        wire += (segs - 1) * hdr_len
                segs = max(segs, math.ceil(wire / MTU_FRAME))
                buf = buffered[i]
                while buf and buf[0][0] <= now:
                    backlog[i] -= buf.popleft()[1]
                if backlog[i] + segs > limit:
                    drops += 1
                    continue
                sent = max(now, busy_until[i]) + (wire * 8 / bps if bps else 0.0)
                busy_until[i] = sent
                backlog[i] += segs
                buf.append((sent, segs))
                queues[i].append((sent + lat, frame, dst))


# -- self-check -----------------------------------------------------------------------------
_ECHO_SERVER = r"""
import socket, sys
s = socket.create_server((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
with c:
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        c.sendall(b)
"""

_ECHO_CLIENT = r"""
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = bytes(range(256)) * (n // 256)
t = time.perf_counter()
with socket.create_connection((host, port), timeout=30) as s:
    src = s.getsockname()[0]
    got = bytearray()
    for off in range(0, len(data), 1 << 16):
        s.sendall(data[off:off + (1 << 16)])
        while len(got) < min(len(data), off + (1 << 16)):
            got += s.recv(1 << 16)
assert bytes(got) == data, "echo mismatch"
print(f"{len(data)} {time.perf_counter() - t:.3f} {src}")
"""


def self_check(
    rate: str | None = None, delay: str | None = None, link: str = "auto", nbytes: int = 1 << 20,
    bridge_in_root: bool = False, force: bool = False,
) -> None:  # fmt: skip
    """Two hosts; a TCP echo from h2 to h1's 10.213.77.x address works and eth0 counters grow."""
    with Topology(
        ["h1", "h2"], rate=rate, delay=delay, link=link, bridge_in_root=bridge_in_root, force=force
    ) as topo:
        print(topo.describe())
        a1, a2 = topo.address("h1"), topo.address("h2")
        before = {n: topo.counters(n) for n in ("h1", "h2")}
        srv = subprocess.Popen(
            [*topo.exec_prefix("h1"), sys.executable, "-c", _ECHO_SERVER, a1],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert srv.stdout is not None
            port = srv.stdout.readline().strip()
            out = _sh(
                [*topo.exec_prefix("h2"), sys.executable, "-c", _ECHO_CLIENT, a1, port, str(nbytes)]
            ).stdout.split()
            srv.wait(timeout=30)
        finally:
            if srv.poll() is None:
                srv.kill()
                srv.wait()
        after = {n: topo.counters(n) for n in ("h1", "h2")}
        n, secs, src = int(out[0]), float(out[1]), out[2]
        assert src == a2, f"client source address {src}, expected {a2}"
        for h in ("h1", "h2"):
            drx, dtx = after[h][0] - before[h][0], after[h][1] - before[h][1]
            assert drx >= n and dtx >= n, f"{h}: counters grew by rx={drx} tx={dtx} < {n}"
            print(f"{h} {topo.address(h)}: eth0 rx +{drx} B, tx +{dtx} B")
        # Isolation: the root namespace has no address, route or link in our subnet.
        assert SUBNET not in _sh(["ip", "-4", "route", "show", "table", "all"]).stdout
        assert SUBNET not in _sh(["ip", "-4", "-o", "addr", "show"]).stdout
        assert not list_root_links(topo.prefix) or topo.bridge_in_root
        for h in ("h1", "h2"):
            v6 = _sh(["ip", "-n", topo.netns(h), "-6", "-o", "addr", "show"]).stdout.strip()
            assert not v6, f"IPv6 address in {topo.netns(h)}: {v6}"
        rtt = _sh([*topo.exec_prefix("h2"), sys.executable, "-c", _RTT, a1, port]).stdout.strip()
        print(f"echo {n} B h2({a2}) -> h1({a1}) -> h2 in {secs:.3f} s; TCP connect RTT {rtt}: OK")


# TCP handshake time to a closed port on h1 (RST comes back): one round trip.
_RTT = r"""
import socket, sys, time
best = 1e9
for _ in range(5):
    t = time.perf_counter()
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    except OSError:
        pass
    best = min(best, time.perf_counter() - t)
print(f"{best * 1000:.1f} ms")
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prefix", default="fm-")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def topo_args(p: argparse.ArgumentParser, hosts: bool = True) -> None:
        if hosts:
            p.add_argument("--hosts", default="h1,h2", help="comma-separated host names")
        p.add_argument("--rate", default=None, help="e.g. 100mbit, 1gbit")
        p.add_argument("--delay", default=None, help="one-way delay per host egress, e.g. 20ms")
        p.add_argument("--limit", type=int, default=None, help="queue limit, MTU-size packets")
        p.add_argument("--link", default="auto", choices=["auto", "veth", "wire"])
        p.add_argument("--bridge-in-root", action="store_true")
        p.add_argument("--force", action="store_true")

    topo_args(sub.add_parser("up", help="build the topology and leave it up"))
    sub.add_parser("down", help="remove it (same as cleanup)")
    sub.add_parser("cleanup", help="remove every netns/link with the prefix")
    p_exec = sub.add_parser("exec", help="run a command inside a host: exec NAME -- CMD")
    p_exec.add_argument("name")
    p_exec.add_argument("command", nargs=argparse.REMAINDER)
    p_cnt = sub.add_parser("counters", help="eth0 rx/tx bytes of a host")
    p_cnt.add_argument("name")
    p_run = sub.add_parser("run", help="up, run CMD in the root ns, always down: run [..] -- CMD")
    topo_args(p_run)
    p_run.add_argument("command", nargs=argparse.REMAINDER)
    p_chk = sub.add_parser("check", help="two-host TCP echo self-check")
    topo_args(p_chk, hosts=False)
    p_wire = sub.add_parser("_wire", help="(internal) user-space shaped switch")
    p_wire.add_argument("--hosts", required=True)
    p_wire.add_argument("--rate", default=None)
    p_wire.add_argument("--delay", default=None)
    p_wire.add_argument("--limit", type=int, default=DEFAULT_LIMIT)
    p_wire.add_argument("--detached", action="store_true", help="run until killed, not stdin EOF")
    args = ap.parse_args(argv)

    def make(a: argparse.Namespace) -> Topology:
        return Topology(
            a.hosts.split(","), rate=a.rate, delay=a.delay, prefix=args.prefix, limit=a.limit,
            link=a.link, bridge_in_root=a.bridge_in_root, force=a.force,
        )  # fmt: skip

    if args.cmd in ("down", "cleanup"):
        removed = cleanup(args.prefix, verbose=True)
        print(f"{len(removed)} removed")
        return 0
    if args.cmd == "up":
        topo = make(args)
        topo.persistent = True  # a wire switch outlives this command, until `down`
        topo.up()
        for n in topo.names:
            print(f"{topo.netns(n)} {topo.address(n)}")
        print(topo.describe())
        return 0
    if args.cmd == "exec":
        cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not cmd:
            ap.error("exec: missing command after --")
        os.execvp("ip", ["ip", "netns", "exec", f"{args.prefix}{args.name}", *cmd])
    if args.cmd == "counters":
        out = _sh(
            ["ip", "-n", f"{args.prefix}{args.name}", "-s", "-j", "link", "show", "dev", "eth0"]
        )
        s = json.loads(out.stdout)[0]["stats64"]
        print(f"rx_bytes {s['rx']['bytes']} tx_bytes {s['tx']['bytes']}")
        return 0
    if args.cmd == "run":
        cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not cmd:
            ap.error("run: missing command after --")
        with make(args) as topo:
            env = dict(os.environ)
            for n in topo.names:
                env[f"FM_NS_{n.upper()}"] = topo.netns(n)
                env[f"FM_ADDR_{n.upper()}"] = topo.address(n)
            return subprocess.run(cmd, env=env).returncode
    if args.cmd == "check":
        self_check(args.rate, args.delay, args.link, bridge_in_root=args.bridge_in_root,
                   force=args.force)  # fmt: skip
        return 0
    if args.cmd == "_wire":
        return wire_main(
            args.prefix, args.hosts.split(","), args.rate, args.delay, args.limit, args.detached
        )
    return 2


def _term_as_exit() -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so `with Topology(...)` still cleans up."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


if __name__ == "__main__":
    _term_as_exit()
    if os.geteuid() != 0:
        sys.exit("netns.py needs root (ip netns, tc)")
    sys.exit(main())
