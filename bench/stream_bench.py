"""Expert-streaming goodput between two processes vs a raw TCP copy of the same bytes.

A server process runs the real ExpertExchange service (the same code a peer runs, 16 server
threads as a peer has), a bare gRPC stream of the same bytes (gRPC's own ceiling: no protobuf, no
checks) and a plain TCP server; this process fetches payloads of 1, 16 and 128 MB through the real
client (chunking, CRC32 and validation included), the bare stream and a bare socket, alternating,
and prints the medians and best-of of the repeats and their ratios.

--tls: mutual TLS on both gRPC paths, with certificates made on the fly by `fedmoe certs`' code
(common/tls.make_certs); the raw TCP baseline stays plain (the link's own ceiling).
--fan-in N: then N fetcher processes (N peers) fetch the same payload from the one server at once,
through the real client and, separately, over raw TCP; prints aggregate goodput and fairness
(min/max per-fetcher throughput, Jain's index).

Usage: python bench/stream_bench.py [--sizes 1,16,128] [--repeats 5] [--chunk-bytes N] [--tls]
       [--fan-in 8] [--json] [--json-out FILE] [--profile FILE]
--json prints one JSON object per payload (and per fan-in payload), after the table: MB/s
(10^6 bytes/s) in `fedmoe_mbps`, `bare_grpc_mbps`, `raw_tcp_mbps` (medians of the repeats) and
`*_best_mbps` (best of the repeats).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from fedmoe.common.accounting import ByteCounter  # noqa: E402
from fedmoe.common.crc import BACKEND as CRC_BACKEND  # noqa: E402
from fedmoe.common.grpc_options import CHANNEL_OPTIONS, SERVER_OPTIONS  # noqa: E402
from fedmoe.common.proto import pb  # noqa: E402
from fedmoe.common.tensors import TensorSpec, numpy_to_wire  # noqa: E402
from fedmoe.common.tls import TlsFiles, add_port, load_tls, make_certs  # noqa: E402
from fedmoe.common.tls import channel as tls_channel  # noqa: E402
from fedmoe.peer.expert_client import ExpertClient  # noqa: E402
from fedmoe.peer.expert_service import ExpertExchangeService, expert_server  # noqa: E402
from fedmoe.peer.expert_store import ExpertStore  # noqa: E402

MB = 1_000_000
SERVER = "peer-0"  # the serving peer's id (and its certificate's name under --tls)
WARM_ROUND = 1  # a tiny snapshot every client fetches once first: channel up, TLS handshake done
WORKER_THREADS = 16  # peer/main.py's minimum


def round_id(size_index: int) -> int:
    return 1000 * (size_index + 1)


def requesters(repeats: int, fan_in: int) -> list[str]:
    """Every fetch is its own serve order (each order is served once): one per single-fetch
    repeat, one per fetcher per fan-in repeat, plus the warm-up fetch of each client."""
    single = [f"bench-{rep}" for rep in range(repeats)]
    fans = [f"fan-{rep}-{k}" for rep in range(repeats) for k in range(fan_in)]
    return single + fans


def tls_files(certs: str | None, name: str) -> TlsFiles | None:
    return load_tls(certs, name) if certs else None


def serve(args: argparse.Namespace, sizes: list[int]) -> None:
    """Server side: publish every payload as an expert snapshot and answer raw TCP requests."""
    store = ExpertStore(wait_timeout=30)
    tiny = [numpy_to_wire("experts.0.w", np.zeros(1, np.float32))]
    store.publish(WARM_ROUND, {0: tiny}, args.chunk_bytes)
    warm = [f"warm-{k}" for k in range(max(1, args.fan_in))] + ["warm-main"]
    store.set_orders(WARM_ROUND, {w: ([0], "") for w in warm})
    payloads = {}
    for i, size in enumerate(sizes):
        array = (
            np.random.default_rng(i).integers(0, 255, size * MB, dtype=np.uint8).view(np.float32)
        )
        payloads[size] = array.tobytes()
        # One snapshot per payload, encoded once (as a peer does), and one order per fetch.
        store.publish(round_id(i), {0: [numpy_to_wire("experts.0.w", array)]}, args.chunk_bytes)
        orders = {r: ([0], "") for r in requesters(args.repeats, args.fan_in)}
        store.set_orders(round_id(i), orders)  # type: ignore[arg-type]
    service = ExpertExchangeService(hosted=1)
    service.add_peer(SERVER, store, ByteCounter())
    # The peer's own server: ExpertExchange behind the counting interceptor, as in a run.
    server = expert_server(service, WORKER_THREADS, SERVER_OPTIONS)
    # The same bytes as bare gRPC messages (no protobuf, no checks): gRPC's own ceiling here.
    bare_blob = b"".join(payloads.values())
    chunk_bytes = args.chunk_bytes

    def bare(request: bytes, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        n = int(request)
        view = memoryview(bare_blob)
        for off in range(0, n, chunk_bytes):
            yield bytes(view[off : min(n, off + chunk_bytes)])

    ident = lambda b: b  # noqa: E731
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Bare",
                {
                    "Fetch": grpc.unary_stream_rpc_method_handler(
                        bare, request_deserializer=ident, response_serializer=ident
                    )
                },
            ),
        )
    )
    grpc_port = add_port(server, f"{args.bind or args.host}:0", tls_files(args.certs, SERVER))
    server.start()

    raw = socket.create_server((args.bind or args.host, 0), backlog=64)
    blob = memoryview(b"".join(payloads.values()))

    def send(conn: socket.socket) -> None:
        with conn:
            (n,) = struct.unpack("!Q", conn.recv(8, socket.MSG_WAITALL))
            conn.sendall(blob[:n])

    def raw_loop() -> None:  # a thread per connection: fan-in fetches run at once
        while True:
            conn, _ = raw.accept()
            threading.Thread(target=send, args=(conn,), daemon=True).start()

    threading.Thread(target=raw_loop, daemon=True).start()
    print(f"{grpc_port} {raw.getsockname()[1]}", flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin
    server.stop(0)


def raw_fetch(host: str, port: int, nbytes: int) -> float:
    buf = bytearray(nbytes)
    view = memoryview(buf)
    start = time.perf_counter()
    with socket.create_connection((host, port)) as s:
        s.sendall(struct.pack("!Q", nbytes))
        got = 0
        while got < nbytes:
            n = s.recv_into(view[got:], min(nbytes - got, 1 << 22))
            if n == 0:
                raise RuntimeError("raw server closed early")
            got += n
    return time.perf_counter() - start


def spec_for(nbytes: int) -> dict[str, TensorSpec]:
    return {"experts.0.w": TensorSpec((nbytes // 4,), frozenset({pb.FLOAT32}))}


def warm_up(client: ExpertClient, address: str, who: str) -> None:
    spec = {"experts.0.w": TensorSpec((1,), frozenset({pb.FLOAT32}))}
    client.fetch(address, who, WARM_ROUND, [0], spec, source_id=SERVER)


def fetch_worker(args: argparse.Namespace) -> None:
    """One fan-in fetcher (a peer): warms its channel, then per stdin line `fedmoe ROUND NBYTES
    REQUESTER` or `raw NBYTES` fetches once and prints {"start", "end", "bytes"} (perf_counter is
    CLOCK_MONOTONIC: comparable across the processes)."""
    client = ExpertClient(ByteCounter(), timeout=600, tls=tls_files(args.certs, "bench"))
    address = f"{args.host}:{args.grpc_port}"
    warm_up(client, address, f"warm-{args.worker}")
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[0] == "fedmoe":
            round_, nbytes, who = int(words[1]), int(words[2]), words[3]
            start = time.perf_counter()
            got = client.fetch(address, who, round_, [0], spec_for(nbytes), source_id=SERVER)
            end = time.perf_counter()
            assert len(got["experts.0.w"].data) == nbytes
        else:
            nbytes = int(words[1])
            start = time.perf_counter()
            end = start + raw_fetch(args.host, args.raw_port, nbytes)
        print(json.dumps({"start": start, "end": end, "bytes": nbytes}), flush=True)
    client.close()


def jain(xs: list[float]) -> float:
    """Jain's fairness index: 1 when every fetcher got the same rate, 1/n when one got it all."""
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def fan_in_once(workers: list[subprocess.Popen], commands: list[str]) -> dict:
    for w, cmd in zip(workers, commands, strict=True):
        assert w.stdin is not None
        w.stdin.write(cmd + "\n")
        w.stdin.flush()
    results = [json.loads(w.stdout.readline()) for w in workers]  # type: ignore[union-attr]
    total = sum(r["bytes"] for r in results)
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    rates = [r["bytes"] / (r["end"] - r["start"]) / MB for r in results]
    return {
        "aggregate": total / span / MB,
        "min": min(rates),
        "max": max(rates),
        "jain": jain(rates),
    }


def summarise(samples: list[dict]) -> dict:
    aggs = [s["aggregate"] for s in samples]
    med = statistics.median
    return {
        "mbps": round(med(aggs), 1),
        "best_mbps": round(max(aggs), 1),
        "min_fetcher_mbps": round(med(s["min"] for s in samples), 1),
        "max_fetcher_mbps": round(med(s["max"] for s in samples), 1),
        "jain": round(med(s["jain"] for s in samples), 3),
    }


def run_fan_in(args: argparse.Namespace, sizes: list[int], grpc_port: int, raw_port: int) -> list:
    cmd = [sys.executable, __file__, "--fetch-worker", "--host", args.host,
           "--grpc-port", str(grpc_port), "--raw-port", str(raw_port)]  # fmt: skip
    if args.certs:
        cmd += ["--certs", args.certs]
    workers = [
        subprocess.Popen(
            [*cmd, "--worker", str(k)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )  # fmt: skip
        for k in range(args.fan_in)
    ]
    try:
        for w in workers:  # every channel connected (and TLS handshake done) before timing
            assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        rows = []
        for i, size in enumerate(sizes):
            fed, raw = [], []
            for rep in range(args.repeats):
                fed.append(fan_in_once(workers, [f"fedmoe {round_id(i)} {size * MB} fan-{rep}-{k}"
                                                 for k in range(args.fan_in)]))  # fmt: skip
                raw.append(fan_in_once(workers, [f"raw {size * MB}"] * args.fan_in))
            f, r = summarise(fed), summarise(raw)
            rows.append({"kind": "fan-in", "fetchers": args.fan_in, "payload_bytes": size * MB,
                         "total_bytes": size * MB * args.fan_in,
                         "fedmoe": f, "raw_tcp": r,
                         "ratio_vs_raw_tcp": round(f["mbps"] / r["mbps"], 3),
                         "repeats": args.repeats, "tls": bool(args.certs)})  # fmt: skip
        return rows
    finally:
        for w in workers:
            if w.stdin:
                w.stdin.close()
            w.wait(timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="1,16,128", help="payload sizes in MB")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk-bytes", type=int, default=1 << 20)
    ap.add_argument("--host", default="127.0.0.1", help="server address (loopback by default)")
    ap.add_argument("--tls", action="store_true", help="mutual TLS on the gRPC paths")
    ap.add_argument("--fan-in", type=int, default=0, metavar="N", help="N fetchers at once")
    ap.add_argument("--json", action="store_true", help="also print one JSON object per row")
    ap.add_argument("--json-out", type=Path, default=None, help="write all results as JSON")
    ap.add_argument("--profile", type=Path, default=None, help="cProfile the fedmoe fetches")
    ap.add_argument(
        "--server-cmd-prefix", default="", help="e.g. 'ip netns exec h1' for netns runs"
    )
    ap.add_argument("--bind", default=None, help=argparse.SUPPRESS)  # server bind host
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server side
    ap.add_argument("--certs", default=None, help=argparse.SUPPRESS)  # TLS files (internal)
    ap.add_argument("--fetch-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--grpc-port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--raw-port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.serve:
        serve(args, sizes)
        return 0
    if args.fetch_worker:
        fetch_worker(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="stream-bench-certs-") as certs:
        if args.tls:  # the run's CA and two nodes, as `fedmoe certs` makes them
            make_certs(Path(certs), [SERVER, "bench"], [args.host])
            os.chmod(certs, 0o755)  # the server may run as another namespace's process
            args.certs = certs
        single, fans = measure(args, sizes)
    report(args, single, fans)
    return 0


def measure(args: argparse.Namespace, sizes: list[int]) -> tuple[list, list]:
    cmd = [
        *args.server_cmd_prefix.split(), sys.executable, __file__, "--serve",
        "--sizes", args.sizes, "--repeats", str(args.repeats),
        "--chunk-bytes", str(args.chunk_bytes), "--bind", args.host,
        "--fan-in", str(args.fan_in), *(["--certs", args.certs] if args.certs else []),
    ]  # fmt: skip
    server = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    profiler = cProfile.Profile() if args.profile else None
    try:
        assert server.stdout is not None
        grpc_port, raw_port = map(int, server.stdout.readline().split())
        tls = tls_files(args.certs, "bench")
        client = ExpertClient(ByteCounter(), timeout=600, tls=tls)
        address = f"{args.host}:{grpc_port}"
        warm_up(client, address, "warm-main")
        bare_channel = tls_channel(address, tls, CHANNEL_OPTIONS, SERVER if tls else None)
        bare_fetch = bare_channel.unary_stream(
            "/bench.Bare/Fetch", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )

        def bare_time(nbytes: int) -> float:
            start = time.perf_counter()
            got = sum(len(m) for m in bare_fetch(str(nbytes).encode(), timeout=600))
            assert got == nbytes
            return time.perf_counter() - start

        def fedmoe_time(i: int, rep: int, nbytes: int) -> float:
            start = time.perf_counter()
            if profiler:
                profiler.enable()
            got = client.fetch(
                address, f"bench-{rep}", round_id(i), [0], spec_for(nbytes), source_id=SERVER
            )
            if profiler:
                profiler.disable()
            elapsed = time.perf_counter() - start
            assert len(got["experts.0.w"].data) == nbytes
            return elapsed

        rows = []
        for i, size in enumerate(sizes):
            nbytes = size * MB
            times: dict[str, list[float]] = {"fedmoe": [], "bare_grpc": [], "raw_tcp": []}
            for rep in range(args.repeats):  # alternate so drift hits all three alike
                times["fedmoe"].append(fedmoe_time(i, rep, nbytes))
                times["raw_tcp"].append(raw_fetch(args.host, raw_port, nbytes))
                times["bare_grpc"].append(bare_time(nbytes))
            row: dict = {"kind": "single", "payload_bytes": nbytes}
            for name, ts in times.items():
                row[f"{name}_mbps"] = round(nbytes / statistics.median(ts) / MB, 1)
            for name, ts in times.items():
                row[f"{name}_best_mbps"] = round(nbytes / min(ts) / MB, 1)
            for suffix in ("", "_best"):
                f = row[f"fedmoe{suffix}_mbps"]
                row[f"ratio{suffix}_vs_raw_tcp"] = round(f / row[f"raw_tcp{suffix}_mbps"], 3)
                row[f"ratio{suffix}_vs_bare_grpc"] = round(f / row[f"bare_grpc{suffix}_mbps"], 3)
            row.update(repeats=args.repeats, chunk_bytes=args.chunk_bytes, tls=bool(tls))
            rows.append(row)
        client.close()
        bare_channel.close()
        fans = run_fan_in(args, sizes, grpc_port, raw_port) if args.fan_in else []
    finally:
        if server.stdin:
            server.stdin.close()
        server.wait(timeout=30)
    if profiler and args.profile:
        profiler.dump_stats(str(args.profile))
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    return rows, fans


def report(args: argparse.Namespace, rows: list, fans: list) -> None:
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}, load {os.getloadavg()[0]:.1f}"
    )
    print(
        f"expert streaming goodput, {args.host} ({machine}); median / best of {args.repeats}, "
        f"chunk {args.chunk_bytes} B, CRC32 by {CRC_BACKEND}{', mutual TLS' if args.tls else ''}"
    )
    print(
        f"{'payload':>8} {'fedmoe MB/s':>14} {'bare gRPC MB/s':>15} {'raw TCP MB/s':>14} "
        f"{'vs raw TCP':>11} {'vs bare gRPC':>13}"
    )
    for r in rows:
        print(
            f"{r['payload_bytes'] // MB:>5} MB "
            f"{r['fedmoe_mbps']:>7.0f}/{r['fedmoe_best_mbps']:<6.0f} "
            f"{r['bare_grpc_mbps']:>8.0f}/{r['bare_grpc_best_mbps']:<6.0f} "
            f"{r['raw_tcp_mbps']:>7.0f}/{r['raw_tcp_best_mbps']:<6.0f} "
            f"{r['ratio_vs_raw_tcp']:>5.2f}/{r['ratio_best_vs_raw_tcp']:<5.2f} "
            f"{r['ratio_vs_bare_grpc']:>6.2f}/{r['ratio_best_vs_bare_grpc']:<5.2f}"
        )
    if fans:
        print(f"fan-in: {args.fan_in} fetchers at once from one server, each the whole payload; "
              "aggregate MB/s median/best, per-fetcher min-max MB/s, Jain's index")  # fmt: skip
        for r in fans:
            f, w = r["fedmoe"], r["raw_tcp"]
            print(
                f"{r['payload_bytes'] // MB:>5} MB  fedmoe {f['mbps']:.0f}/{f['best_mbps']:.0f} "
                f"({f['min_fetcher_mbps']:.1f}-{f['max_fetcher_mbps']:.1f}, J={f['jain']:.3f})  "
                f"raw TCP {w['mbps']:.0f}/{w['best_mbps']:.0f} "
                f"({w['min_fetcher_mbps']:.1f}-{w['max_fetcher_mbps']:.1f}, J={w['jain']:.3f})  "
                f"ratio {r['ratio_vs_raw_tcp']:.2f}"
            )
    if args.json:
        for r in rows + fans:
            print(json.dumps(r))
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {"machine": machine, "host": args.host, "rows": rows, "fan_in": fans}, indent=2
            )  # fmt: skip
        )


if __name__ == "__main__":
    sys.exit(main())
