"""Expert-streaming goodput between two processes vs a raw TCP copy of the same bytes.

A server process runs the real ExpertExchange service (the same code a peer runs) and a plain TCP
server; this process fetches payloads of 1, 16 and 128 MB through the real client (chunking,
CRC32 and validation included) and through a bare socket, alternating, and prints both rates and
their ratio. Usage: python bench/stream_bench.py [--sizes 1,16,128] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from fedmoe.common.accounting import ByteCounter  # noqa: E402
from fedmoe.common.grpc_options import CHANNEL_OPTIONS, SERVER_OPTIONS  # noqa: E402
from fedmoe.common.proto import pb  # noqa: E402
from fedmoe.common.tensors import TensorSpec, numpy_to_wire  # noqa: E402
from fedmoe.peer.expert_client import ExpertClient  # noqa: E402
from fedmoe.peer.expert_service import ExpertExchangeService, expert_server  # noqa: E402
from fedmoe.peer.expert_store import ExpertStore  # noqa: E402

MB = 1_000_000


def round_id(size_index: int, repeat: int) -> int:
    return 1000 * (size_index + 1) + repeat


def serve(sizes: list[int], repeats: int, chunk_bytes: int, host: str) -> None:
    """Server side: publish every payload as an expert snapshot and answer raw TCP requests."""
    store = ExpertStore(wait_timeout=30)
    payloads = {}
    for i, size in enumerate(sizes):
        array = (
            np.random.default_rng(i).integers(0, 255, size * MB, dtype=np.uint8).view(np.float32)
        )
        payloads[size] = array.tobytes()
        wire = [numpy_to_wire("experts.0.w", array)]
        for rep in range(repeats):
            store.publish(round_id(i, rep), {0: wire}, chunk_bytes)
            store.set_orders(round_id(i, rep), {"bench": ([0], "")})  # (experts, ticket)
    # The peer's own server: ExpertExchange behind the counting interceptor, as in a run.
    server = expert_server(ExpertExchangeService(store, ByteCounter()), 4, SERVER_OPTIONS)
    # The same bytes as bare gRPC messages (no protobuf, no checks): gRPC's own ceiling here.
    bare_blob = b"".join(payloads.values())

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
    grpc_port = server.add_insecure_port(f"{host}:0")
    server.start()

    raw = socket.create_server((host, 0))
    blob = memoryview(b"".join(payloads.values()))

    def raw_loop() -> None:
        while True:
            conn, _ = raw.accept()
            with conn:
                (n,) = struct.unpack("!Q", conn.recv(8, socket.MSG_WAITALL))
                conn.sendall(blob[:n])

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="1,16,128", help="payload sizes in MB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-bytes", type=int, default=1 << 20)
    ap.add_argument("--host", default="127.0.0.1", help="server address (loopback by default)")
    ap.add_argument("--bind", default=None, help="(internal) server bind host")
    ap.add_argument("--serve", action="store_true", help="(internal) run the server side")
    ap.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    ap.add_argument(
        "--server-cmd-prefix", default="", help="e.g. 'ip netns exec h1' for netns runs"
    )
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.serve:
        serve(sizes, args.repeats, args.chunk_bytes, args.bind or args.host)
        return 0

    cmd = [
        *args.server_cmd_prefix.split(),
        sys.executable,
        __file__,
        "--serve",
        "--sizes",
        args.sizes,
        "--repeats",
        str(args.repeats),
        "--chunk-bytes",
        str(args.chunk_bytes),
        "--bind",
        args.host,
    ]
    server = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        grpc_port, raw_port = map(int, server.stdout.readline().split())
        client = ExpertClient(ByteCounter(), timeout=600)
        address = f"{args.host}:{grpc_port}"
        bare_channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        bare_fetch = bare_channel.unary_stream(
            "/bench.Bare/Fetch", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )

        def bare_time(nbytes: int) -> float:
            start = time.perf_counter()
            got = sum(len(m) for m in bare_fetch(str(nbytes).encode(), timeout=600))
            assert got == nbytes
            return time.perf_counter() - start

        rows = []
        for i, size in enumerate(sizes):
            nbytes = size * MB
            spec = {"experts.0.w": TensorSpec((nbytes // 4,), frozenset({pb.FLOAT32}))}
            grpc_times, raw_times, bare_times = [], [], []
            for rep in range(args.repeats):  # alternate so drift hits both alike
                start = time.perf_counter()
                got = client.fetch(address, "bench", round_id(i, rep), [0], spec)
                grpc_times.append(time.perf_counter() - start)
                assert len(got["experts.0.w"].data) == nbytes
                raw_times.append(raw_fetch(args.host, raw_port, nbytes))
                bare_times.append(bare_time(nbytes))
            g, r = nbytes / min(grpc_times) / MB, nbytes / min(raw_times) / MB
            b = nbytes / min(bare_times) / MB
            rows.append(
                {
                    "size_mb": size,
                    "fedmoe_grpc_mb_s": round(g, 1),
                    "bare_grpc_mb_s": round(b, 1),
                    "raw_tcp_mb_s": round(r, 1),
                    "ratio_vs_raw_tcp": round(g / r, 3),
                    "ratio_vs_bare_grpc": round(g / b, 3),
                    "repeats": args.repeats,
                }
            )
        client.close()
        bare_channel.close()
    finally:
        if server.stdin:
            server.stdin.close()
        server.wait(timeout=30)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"
    print(
        f"expert streaming goodput, {args.host} ({machine}); best of {args.repeats}, chunk {args.chunk_bytes} B"
    )
    print(
        f"{'payload':>8} {'fedmoe MB/s':>12} {'bare gRPC MB/s':>15} {'raw TCP MB/s':>13} "
        f"{'vs raw TCP':>11} {'vs bare gRPC':>13}"
    )
    for row in rows:
        print(
            f"{row['size_mb']:>5} MB {row['fedmoe_grpc_mb_s']:>12.1f} {row['bare_grpc_mb_s']:>15.1f} "
            f"{row['raw_tcp_mb_s']:>13.1f} {row['ratio_vs_raw_tcp']:>11.2f} {row['ratio_vs_bare_grpc']:>13.2f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine, "host": args.host, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
