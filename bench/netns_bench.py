"""Expert-streaming goodput across a shaped two-host link, beside a raw TCP copy on that link.

For each link profile a fresh two-host topology is built with scripts/netns.py (namespaces fm-h1,
fm-h2 on 10.213.77.0/24, nothing routed elsewhere): bench/stream_bench.py's server (the real
ExpertExchange service, a raw TCP server and a bare gRPC stream) runs in fm-h1, its client in
fm-h2, so every byte crosses the shaped link. Profiles:
  1gbit        rate 1gbit, no added delay
  100mbit-20ms rate 100mbit, 20 ms one-way delay per host egress (RTT 40 ms)
Prints profile, payload, fedmoe MB/s, raw TCP MB/s (median / best of the repeats) and their ratio
(target >= 0.95).
  --tls        mutual TLS on the gRPC paths between the namespaces (certificates made on the fly
               by common/tls.make_certs, as `fedmoe certs` makes them); raw TCP stays plain
  --fan-in N   also N fetcher processes in fm-h2 fetching from the one server in fm-h1 at once:
               aggregate goodput and fairness (min/max per fetcher, Jain's index), fedmoe vs raw

Investigating gRPC settings without editing common/grpc_options.py: --channel-opt KEY=VALUE and
--server-opt KEY=VALUE (repeatable) override/add entries of CHANNEL_OPTIONS / SERVER_OPTIONS in
both bench processes (through the `_shim` subcommand, which patches the module before running
stream_bench.py).

Usage (root): python bench/netns_bench.py [--profiles 1gbit,100mbit-20ms] [--repeats 2] [--tls]
              [--fan-in 8] [--json FILE] [--channel-opt grpc.http2.lookahead_bytes=4194304]
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from netns import Topology, parse_rate  # noqa: E402

STREAM_BENCH = ROOT / "bench" / "stream_bench.py"
TARGET = 0.95
# name -> (rate, delay, default sizes in MB)
PROFILES = {
    "1gbit": ("1gbit", None, "16,128"),
    "100mbit-20ms": ("100mbit", "20ms", "16,64"),
}


def _opts_env(channel: list[str], server: list[str]) -> dict[str, str]:
    def parse(items: list[str]) -> list[list]:
        out = []
        for item in items:
            k, _, v = item.partition("=")
            out.append([k, int(v) if v.lstrip("-").isdigit() else v])
        return out

    env = {}
    if channel:
        env["FM_BENCH_CHANNEL_OPTS"] = json.dumps(parse(channel))
    if server:
        env["FM_BENCH_SERVER_OPTS"] = json.dumps(parse(server))
    return env


def shim(argv: list[str]) -> None:
    """`_shim [PYTHON] SCRIPT ARGS...`: patch the gRPC option lists, then run SCRIPT as __main__.
    (A leading interpreter path is dropped: stream_bench appends `sys.executable __file__` to its
    --server-cmd-prefix, which for the server side ends with this shim.)"""
    if argv and not argv[0].endswith(".py"):
        argv = argv[1:]
    sys.path.insert(0, str(ROOT))
    import fedmoe.common.grpc_options as go

    for var, attr in (
        ("FM_BENCH_CHANNEL_OPTS", "CHANNEL_OPTIONS"),
        ("FM_BENCH_SERVER_OPTS", "SERVER_OPTIONS"),
    ):
        extra = json.loads(os.environ.get(var, "[]"))
        if extra:
            keys = {k for k, _ in extra}
            merged = [(k, v) for k, v in getattr(go, attr) if k not in keys]
            merged += [(k, v) for k, v in extra if v != "unset"]  # VALUE "unset": drop the key
            setattr(go, attr, merged)
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


def tcp_retrans(topo: Topology, host: str) -> int:
    """TCP segments retransmitted by `host` so far (its namespace's /proc/net/snmp)."""
    out = subprocess.run([*topo.exec_prefix(host), "cat", "/proc/net/snmp"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    head, values = [line.split()[1:] for line in out.splitlines() if line.startswith("Tcp:")][:2]
    return int(values[head.index("RetransSegs")])


def run_profile(
    name: str, rate: str | None, delay: str | None, sizes: str, repeats: int, link: str,
    extra_env: dict[str, str], verbose: bool, tls: bool = False, fan_in: int = 0,
) -> dict:  # fmt: skip
    with Topology(["h1", "h2"], rate=rate, delay=delay, link=link) as topo:
        h1 = topo.address("h1")
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update(extra_env)
        py = [sys.executable]
        if extra_env:  # patched options: run both sides through the shim
            py = [sys.executable, str(Path(__file__).resolve()), "_shim"]
        # stream_bench appends `sys.executable stream_bench.py --serve ...` to this prefix.
        server_prefix = " ".join([*topo.exec_prefix("h1"), *(py if len(py) > 1 else [])])
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [
                *topo.exec_prefix("h2"), *py, str(STREAM_BENCH),
                "--host", h1, "--server-cmd-prefix", server_prefix,
                "--sizes", sizes, "--repeats", str(repeats), "--json-out", out.name,
                *(["--tls"] if tls else []), *(["--fan-in", str(fan_in)] if fan_in else []),
            ]  # fmt: skip
            before = {h: topo.counters(h) for h in ("h1", "h2")}
            retrans0 = tcp_retrans(topo, "h1")
            t0 = time.monotonic()
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            wall = time.monotonic() - t0
            after = {h: topo.counters(h) for h in ("h1", "h2")}
            retrans = tcp_retrans(topo, "h1") - retrans0
            if verbose or p.returncode:
                sys.stdout.write(p.stdout)
                sys.stderr.write(p.stderr)
            if p.returncode:
                raise RuntimeError(
                    f"{name}: stream_bench failed ({p.returncode}): {shlex.join(cmd)}"
                )
            result = json.loads(Path(out.name).read_text())
        return {
            "profile": name,
            "rate": rate,
            "delay_one_way": delay,
            "link": topo.describe(),
            "sizes_mb": [int(s) for s in sizes.split(",")],
            "rows": result["rows"],
            "fan_in": result["fan_in"],
            "tls": tls,
            "wall_s": round(wall, 1),
            # h1 (server) sent, h2 (client) received over eth0: the bench really crossed the link.
            "link_bytes_h1_tx": after["h1"][1] - before["h1"][1],
            "link_bytes_h2_rx": after["h2"][0] - before["h2"][0],
            "tcp_retrans_segs_h1": retrans,  # all three transfer kinds together
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--profiles", default=",".join(PROFILES),
                    help=f"of {list(PROFILES)}, or ad hoc RATE[+DELAY] such as 1gbit+20ms")  # fmt: skip
    ap.add_argument("--sizes-1gbit", default=None, help="MB, default 16,128")
    ap.add_argument("--sizes-100mbit", default=None, help="MB, default 16,64")
    ap.add_argument("--sizes", default=None, help="MB for every profile (overrides the above)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--link", default="auto", choices=["auto", "veth", "wire"])
    ap.add_argument("--channel-opt", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--server-opt", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--tls", action="store_true", help="mutual TLS on the gRPC paths")
    ap.add_argument("--fan-in", type=int, default=0, metavar="N", help="also N fetchers at once")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("-v", "--verbose", action="store_true", help="show stream_bench's output")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("netns_bench.py needs root (network namespaces)")

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwind through `with Topology` (always cleans up)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    overrides = {"1gbit": args.sizes_1gbit, "100mbit-20ms": args.sizes_100mbit}
    extra_env = _opts_env(args.channel_opt, args.server_opt)
    t0 = time.monotonic()
    results = []
    for name in args.profiles.split(","):  # each Topology removes itself, also on errors
        if name in PROFILES:
            rate, delay, sizes = PROFILES[name]
        else:  # ad hoc "RATE" or "RATE+DELAY", e.g. 1gbit+20ms
            rate, _, delay = name.partition("+")
            delay, sizes = delay or None, "16"
        results.append(
            run_profile(
                name,
                rate,
                delay,
                args.sizes or overrides.get(name) or sizes,
                args.repeats,
                args.link,
                extra_env,
                args.verbose,
                args.tls,
                args.fan_in,
            )  # fmt: skip
        )
    total = time.monotonic() - t0

    opts = " ".join(args.channel_opt + [f"server:{o}" for o in args.server_opt]) or "repo defaults"
    print(
        f"expert streaming across a shaped 2-host link (median / best of {args.repeats}"
        f"{', mutual TLS on gRPC' if args.tls else ''}); gRPC options: {opts}"
    )
    for r in results:
        print(f"  {r['profile']}: {r['link']}")
    head = (f"{'profile':<13} {'payload':>8} {'fedmoe MB/s':>13} {'bare gRPC MB/s':>15} "
            f"{'raw TCP MB/s':>13} {'ratio':>10} {'target':>7}")  # fmt: skip
    print(head)
    for r in results:
        line_mb_s = parse_rate(r["rate"]) / 8 / 1e6 * 1448 / 1514  # TCP payload at line rate
        for row in r["rows"]:
            ok = "ok" if row["ratio_vs_raw_tcp"] >= TARGET else "BELOW"
            print(
                f"{r['profile']:<13} {row['payload_bytes'] // 1_000_000:>5} MB "
                f"{row['fedmoe_mbps']:>6.1f}/{row['fedmoe_best_mbps']:<6.1f} "
                f"{row['bare_grpc_mbps']:>8.1f}/{row['bare_grpc_best_mbps']:<6.1f} "
                f"{row['raw_tcp_mbps']:>6.1f}/{row['raw_tcp_best_mbps']:<6.1f} "
                f"{row['ratio_vs_raw_tcp']:>4.2f}/{row['ratio_best_vs_raw_tcp']:<4.2f} {ok:>7}"
            )
        for fan in r["fan_in"]:
            f, w = fan["fedmoe"], fan["raw_tcp"]
            ok = "ok" if fan["ratio_vs_raw_tcp"] >= TARGET else "BELOW"
            print(
                f"{r['profile']:<13} {fan['payload_bytes'] // 1_000_000:>5} MB x{fan['fetchers']} "
                f"fan-in: fedmoe {f['mbps']:.1f}/{f['best_mbps']:.1f} MB/s aggregate, per fetcher "
                f"{f['min_fetcher_mbps']:.1f}-{f['max_fetcher_mbps']:.1f}, Jain {f['jain']:.3f}; "
                f"raw TCP {w['mbps']:.1f}/{w['best_mbps']:.1f}, per fetcher "
                f"{w['min_fetcher_mbps']:.1f}-{w['max_fetcher_mbps']:.1f}, Jain {w['jain']:.3f}; "
                f"ratio {fan['ratio_vs_raw_tcp']:.2f} {ok}"
            )
        print(f"{'':<13} (TCP payload at line rate ~{line_mb_s:.1f} MB/s; {r['wall_s']} s; "
              f"{r['link_bytes_h1_tx'] / 1e6:.0f} MB h1->h2 on eth0, "
              f"{r['tcp_retrans_segs_h1']} TCP segments retransmitted by h1)")  # fmt: skip
    print(f"total {total:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(
            {"target_ratio": TARGET, "tls": args.tls, "fan_in": args.fan_in, "grpc_overrides": {"channel": args.channel_opt,
             "server": args.server_opt}, "total_s": round(total, 1), "profiles": results},
            indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_shim":
        shim(sys.argv[2:])
    else:
        sys.exit(main())
