"""Coordinator scale benchmark: one real coordinator process and N protocol-level peers.

The peers speak the real protocol over real gRPC (Join, Heartbeat, SubmitUpdate with tensors of
the run's shapes, GetRoundResult, ReportMetrics) but train nothing and fetch no experts: what is
measured is the coordinator. They are hosted as asyncio tasks (grpc.aio) in a few OS processes,
each virtual peer on a channel (TCP connection) of its own, as N real peers would be. Their
heartbeats come from a thread per peer with blocking calls, as a real peer's do, in a process
beside each worker (a real peer's heartbeat thread does not share its process with 249 other
peers' uploads and results; see BeatLink). The workers run at nice 10 (--worker-nice; see
WORKER_NICE): the load yields the shared cores to the coordinator, its liveness process and the
heartbeat processes, as peers on machines of their own would.

  .venv/bin/python bench/scale.py --peers 1000
  .venv/bin/python bench/scale.py --peers 100 --procs 4 --rounds 5 --peer-timeout 10

The coordinator answers heartbeats from its liveness process (`--liveness-listen`,
coordinator/liveness.py) unless --no-liveness; the virtual peers use it as real ones do (the
coordinator's own Heartbeat when it fails: heartbeat_fallbacks). --probe-peers K (default 10)
peers are hosted in a worker of their own (with its own heartbeat process), so that their
figures can be compared with those of the peers in the --procs crowded workers (250 each at
N = 1,000, on the same cores).

Prints one JSON line: peers, join_seconds (first Join sent -> all joined), heartbeat_p50_ms and
heartbeat_p99_ms (client-side latency of every heartbeat during the run; probe_heartbeat_* the
same for the probe peers only), round_close_seconds
(last upload ack -> every peer holds its plan, max over rounds; per round in round_close),
plan_seconds (strategy time of the slowest sync round, from the coordinator's summary.json
`round_timings`, or timed here on the same shapes: see plan_seconds_source; the same timed
here in an idle process is plan_seconds_isolated),
coordinator_rss_mb (VmHWM), coordinator_cpu_seconds, coordinator_threads_max,
liveness_rss_mb and liveness_cpu_seconds (its liveness process, apart),
coordinator_loop_lag_ms (the aio server's event-loop lag, p50/p99/max, from its log),
worker_loop_lag_ms (the same for the bench's own worker processes), worker_cpu_seconds (the
bench's own processes that host the peers and their heartbeats, on the same cores), rounds,
total_seconds, errors. Every peer's timeline is in OUT/peers.json. --py-spy BIN or --cprofile
profile the coordinator (files in --out).

Channels are connected before the first Join is sent (all workers start together on a "GO"
line), so join_seconds measures the coordinator, not process start-up. Heartbeats start at a
random phase inside the first interval, as independently started peers would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import random
import re
import resource
import secrets
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # `python bench/scale.py` with a Python that lacks the packages
    from bench.venv import use_project_venv

    use_project_venv()

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from fedmoe.common.auth import SESSION_METADATA, TOKEN_METADATA  # noqa: E402
from fedmoe.common.config import upload_prefixes  # noqa: E402
from fedmoe.common.grpc_options import CHANNEL_OPTIONS  # noqa: E402
from fedmoe.common.model_schema import model_schema  # noqa: E402
from fedmoe.common.proto import pb, rpc  # noqa: E402
from fedmoe.common.tensors import chunk_tensors, numpy_to_wire  # noqa: E402
from fedmoe.peer.coordinator_client import LIVENESS_TIMEOUT  # noqa: E402

LISTENING = "FEDMOE_LISTENING "
# The worker processes (1,000 peers' uploads, result streams and reports: more CPU than the
# coordinator's) run at this niceness. Real peers run on their own machines; here they share
# the coordinator's 2 cores, and at a round close the cores are oversubscribed, so without it
# what is measured is partly the load generator's own contention. The heartbeat processes,
# which measure, keep the default priority, as do the coordinator and its liveness process.
WORKER_NICE = 10
NUM_SAMPLES = 100  # within the synthetic set's bound; the same every round, as the book requires
SAMPLE_SECONDS = 0.2
# A channel of its own per virtual peer: without this, channels to one target in one process
# share a subchannel (one TCP connection), which would hide the coordinator's per-connection cost.
PEER_CHANNEL_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


# ---------------------------------------------------------------- worker: N/procs virtual peers


@dataclass
class VirtualPeer:
    index: int
    channel: grpc.aio.Channel
    token: str
    call_timeout: float
    train_seconds: float
    address: str
    peer_id: str = ""
    round: int = 0
    join_sent: float = 0.0
    join_done: float = 0.0
    # round -> {"upload": t, "ack": t, "plan": t, "result": t, "report": t, "rows": n}
    rounds: dict[int, dict[str, float]] = field(default_factory=dict)
    beats: BeatLink | None = None  # this worker's heartbeat process
    error: str | None = None

    async def run(self) -> None:
        stub = rpc.CoordinatorStub(self.channel)
        self.join_sent = time.monotonic()
        reply = await stub.Join(
            pb.JoinRequest(index=self.index, advertise=f"127.0.0.1:{20000 + self.index}"),
            metadata=((TOKEN_METADATA, self.token),),
            timeout=self.call_timeout,
        )
        self.join_done = time.monotonic()
        self.peer_id = reply.peer_id
        md = ((SESSION_METADATA, reply.session),)
        cfg = reply.config
        if self.beats is not None:  # from here on this peer heartbeats (another process)
            self.beats.send(
                i=self.index,
                peer=self.peer_id,
                session=reply.session,
                every=reply.heartbeat_ms / 1000,
                port=reply.liveness_port,
                round=max(1, reply.start_round),  # the round it is about to work on
            )
        try:
            await self.rounds_loop(stub, md, cfg, max(1, reply.start_round))
        finally:
            if self.beats is not None:
                self.beats.send(i=self.index, stop=True)

    async def rounds_loop(
        self,
        stub: rpc.CoordinatorStub,
        md: tuple[tuple[str, str], ...],
        cfg: pb.RunConfig,
        start: int,
    ) -> None:
        schema = model_schema(cfg)
        rng = np.random.default_rng(self.index)
        for r in range(start, cfg.rounds + 1):
            self.round = r
            if self.beats is not None:
                self.beats.send(i=self.index, round=r)
            # Stand-in for local training (heartbeats go on meanwhile); a little jitter, as
            # peers never finish at the same instant. The update is made at a random moment of
            # it, as a real peer's comes out of its training: not all 1,000 in the same 0.15 s
            # on the coordinator's cores, just before they upload.
            train = self.train_seconds * random.uniform(0.95, 1.0)
            made_at = random.uniform(0.0, 0.9) * train
            await asyncio.sleep(made_at)
            prefixes = upload_prefixes(cfg, r)
            # Every peer its own random tensors: identical gates would make every plan row one
            # big tie (the whole pool), which is not the case being measured.
            wire = [
                numpy_to_wire(n, (0.1 * rng.standard_normal(shape)).astype(np.float32))
                for n, shape in sorted(schema.items())
                if n.startswith(prefixes)
            ]
            header = pb.UpdateHeader(peer_id=self.peer_id, round=r, num_samples=NUM_SAMPLES)
            parts = [pb.UpdatePart(header=header)]
            parts += [pb.UpdatePart(chunk=c) for c in chunk_tensors(wire, cfg.chunk_bytes)]
            await asyncio.sleep(train - made_at)
            t: dict[str, float] = {"upload": time.monotonic()}
            self.rounds[r] = t
            await stub.SubmitUpdate(iter(parts), metadata=md, timeout=self.call_timeout)
            t["ack"] = time.monotonic()
            call = stub.GetRoundResult(
                pb.RoundRequest(peer_id=self.peer_id, round=r),
                metadata=md,
                timeout=self.call_timeout,
            )
            async for part in call:
                if part.HasField("plan"):
                    t["plan"] = time.monotonic()
                    t["rows"] = len(part.plan.rows)
            t["result"] = time.monotonic()
            if r == cfg.rounds and self.beats is not None:
                # As a real peer (peer/runner.py): no heartbeats after the last report, which
                # the coordinator holds until the run is over (then its ports close).
                self.beats.send(i=self.index, stop=True)
            report = pb.MetricsReport(
                peer_id=self.peer_id,
                round=r,
                num_samples=NUM_SAMPLES,
                seconds=t["result"] - t["upload"],
            )
            await stub.ReportMetrics(report, metadata=md, timeout=self.call_timeout)
            t["report"] = time.monotonic()

    def result(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "join_sent": self.join_sent,
            "join_done": self.join_done,
            "rounds": self.rounds,
            "error": self.error,
        }


# ---------------------------------------------------------------- heartbeats: a process per worker
#
# A real peer's heartbeat thread shares its process with one peer (or a peer host's few), not
# with 250 virtual peers' uploads and result streams: in one process with them, a reply waited
# for that process's GIL and event loop (1,000 peers: all-peer p99 62-195 ms while peers in a
# process of their own saw 9-35 ms). So each worker's peers heartbeat from a process of their
# own, with a thread per peer and blocking calls, as peer/coordinator_client.py does; the worker
# tells it of joins, rounds and stops as JSON lines on its stdin. Same cores, same calls.


class BeatLink:
    """The worker's side: starts its heartbeat process and sends it what it needs."""

    def __init__(self, address: str) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--heartbeats", address]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.failure: str | None = None  # why it stopped answering, once it did

    def send(self, **message: Any) -> None:
        # A line of < 200 bytes into a pipe its reader drains at once: does not block the loop.
        if self.failure is not None:
            return
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except OSError as e:  # it is gone: the peers' heartbeats stopped with it
            self.failure = f"heartbeat process gone ({type(e).__name__}; exit {self.proc.poll()})"

    def results(self) -> tuple[dict[int, dict[str, Any]], float, str | None]:
        """Closes its stdin (every thread stops) and reads what it measured: per peer index,
        the process's CPU seconds, and what went wrong with it (None: nothing)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.close()
        except OSError:
            pass  # a write it never read: it is gone, which the exit status says
        found: dict[str, Any] | None = None
        for line in self.proc.stdout:
            if line.startswith("BEATS "):
                found = json.loads(line[len("BEATS ") :])
        code = self.proc.wait()
        if found is None or code != 0:
            self.failure = self.failure or f"heartbeat process exited {code} without results"
            found = found or {}
        beats = {int(k): v for k, v in found.get("peers", {}).items()}
        return beats, float(found.get("cpu_seconds", 0.0)), self.failure


class Beater:
    """One virtual peer's heartbeat thread (in the heartbeat process)."""

    def __init__(
        self, address: str, peer_id: str, session: str, every: float, port: int, round_: int
    ) -> None:
        self.address = address
        self.peer_id = peer_id
        self.md = ((SESSION_METADATA, session),)
        self.every = every
        self.port = port
        self.round = round_  # the worker sends the next ones
        self.stop = threading.Event()
        self.ms: list[float] = []
        self.at: list[float] = []  # time.monotonic() at each start
        self.errors = 0
        self.fallbacks = 0
        self.codes: dict[str, int] = {}
        self.channels: list[grpc.Channel] = []  # closed once every thread has stopped
        self.thread = threading.Thread(target=self.run, name=f"heartbeat-{peer_id}", daemon=True)
        self.thread.start()

    def run(self) -> None:
        # As peer/coordinator_client.py: the liveness process first, the coordinator when it
        # fails (each such beat is counted in heartbeat_fallbacks).
        # A random phase, as independently started peers; the channels are made then, so that
        # 1,000 of them are not made in the same second as the joins.
        if self.stop.wait(random.uniform(0, self.every)):
            return
        coordinator = grpc.insecure_channel(self.address, options=PEER_CHANNEL_OPTIONS)
        self.channels.append(coordinator)
        stub = rpc.CoordinatorStub(coordinator)
        beat, liveness = stub.Heartbeat, False
        if self.port:
            host = self.address.rsplit(":", 1)[0]
            ch = grpc.insecure_channel(f"{host}:{self.port}", options=PEER_CHANNEL_OPTIONS)
            self.channels.append(ch)
            beat, liveness = rpc.LivenessStub(ch).Heartbeat, True
        # The real peer's deadlines (peer/runner.py, peer/coordinator_client.py): two intervals
        # for the coordinator, a quarter of that, clamped, for the liveness process.
        full = 2 * self.every
        low, high = LIVENESS_TIMEOUT
        quarter = max(low, min(high, full / 4))
        delay = 0.0
        while not self.stop.wait(delay):
            started = time.perf_counter()
            at = time.monotonic()
            request = pb.HeartbeatRequest(peer_id=self.peer_id, round=self.round)
            try:
                try:
                    beat(request, metadata=self.md, timeout=quarter if liveness else full)
                except grpc.RpcError:
                    if not liveness:
                        raise
                    self.fallbacks += 1
                    stub.Heartbeat(request, metadata=self.md, timeout=full)
                self.ms.append(1000 * (time.perf_counter() - started))
                self.at.append(at)
            except Exception as e:  # counted, never the silent end of this peer's heartbeats
                self.errors += 1
                rpc_error = isinstance(e, grpc.RpcError)
                code = e.code().name if rpc_error else type(e).__name__  # type: ignore[attr-defined]
                self.codes[code] = self.codes.get(code, 0) + 1
            # A fixed cadence, as a peer's heartbeat thread keeps: the next beat is due one
            # interval after this one started.
            delay = max(0.0, self.every - (time.perf_counter() - started))

    @staticmethod
    def none() -> dict[str, Any]:
        """The result of a peer that never joined."""
        return {
            "heartbeats_ms": [],
            "heartbeats_at": [],
            "heartbeat_errors": 0,
            "heartbeat_fallbacks": 0,
            "heartbeat_error_codes": {},
        }

    def result(self) -> dict[str, Any]:
        return {
            "heartbeats_ms": [round(x, 3) for x in self.ms],
            "heartbeats_at": [round(x, 4) for x in self.at],
            "heartbeat_errors": self.errors,
            "heartbeat_fallbacks": self.fallbacks,
            "heartbeat_error_codes": self.codes,
        }


def heartbeats_main(address: str) -> None:
    """The heartbeat process: a Beater per joined peer, until its stdin closes."""
    beaters: dict[int, Beater] = {}
    for line in sys.stdin:
        m = json.loads(line)
        i = int(m["i"])
        if "peer" in m:
            beaters[i] = Beater(
                address, m["peer"], m["session"], float(m["every"]), m["port"], int(m["round"])
            )
            continue
        b = beaters.get(i)
        if b is None:
            continue
        if "round" in m:
            b.round = int(m["round"])
        if m.get("stop"):
            b.stop.set()
    for b in beaters.values():
        b.stop.set()
    for b in beaters.values():
        b.thread.join()
    for b in beaters.values():  # after every thread: no teardown while others still beat
        for ch in b.channels:
            ch.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = {
        "peers": {i: b.result() for i, b in beaters.items()},
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
    }
    print("BEATS " + json.dumps(out), flush=True)


async def worker_main(
    address: str,
    token: str,
    indices: list[int],
    call_timeout: float,
    train_seconds: float,
    nice: int,
) -> None:
    beats = BeatLink(address)  # started first: it keeps the default priority
    # The load yields the cores to what is measured (see --worker-nice). Before any channel:
    # niceness is per thread on Linux, and gRPC's own threads (its event engine, poller and
    # timer), made with the first channel, inherit it from this one.
    os.nice(nice)
    channels = [grpc.aio.insecure_channel(address, options=PEER_CHANNEL_OPTIONS) for _ in indices]
    await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 120) for c in channels))
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # wait for GO
    peers = [
        VirtualPeer(i, c, token, call_timeout, train_seconds, address, beats=beats)
        for i, c in zip(indices, channels, strict=True)
    ]

    async def guarded(p: VirtualPeer) -> None:
        try:
            await p.run()
        except grpc.aio.AioRpcError as e:
            p.error = f"{e.code().name}: {e.details()}"
        except Exception as e:  # reported, not raised: the others go on
            p.error = f"{type(e).__name__}: {e}"

    lags: list[float] = []
    probe = asyncio.create_task(loop_lag_probe(lags))
    await asyncio.gather(*(guarded(p) for p in peers))
    probe.cancel()
    await asyncio.gather(*(c.close() for c in channels))
    measured, beats_cpu, failure = beats.results()
    for p in peers:  # heartbeats that were never measured are an error, not a smaller sample
        if failure is not None and p.error is None:
            p.error = failure
    results = [{**p.result(), **measured.get(p.index, Beater.none())} for p in peers]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # This worker's own event-loop lag (the wait of its peers' uploads and results for their
    # own process), and the CPU of the worker and of its heartbeat process.
    print("LAG " + json.dumps([round(1000 * x, 3) for x in lags]), flush=True)
    print("CPU " + json.dumps([usage.ru_utime + usage.ru_stime, beats_cpu]), flush=True)
    print("RESULT " + json.dumps(results), flush=True)


LAG_PROBE_SECONDS = 0.01


async def loop_lag_probe(into: list[float]) -> None:
    """How late a 10 ms timer fires, again and again: how long a reply that arrives then waits
    for this loop's next turn."""
    while True:
        started = time.perf_counter()
        await asyncio.sleep(LAG_PROBE_SECONDS)
        into.append(max(0.0, time.perf_counter() - started - LAG_PROBE_SECONDS))


# ---------------------------------------------------------------- the coordinator process


class ProcWatch:
    """Peak RSS (VmHWM), peak thread count and CPU time of a process, sampled until it exits
    (the kernel's figures vanish with the process)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.hwm_kb = 0
        self.threads = 0
        self.cpu_seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.hwm_kb = max(self.hwm_kb, int(line.split()[1]))
                elif line.startswith("Threads:"):
                    self.threads = max(self.threads, int(line.split()[1]))
            stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks = os.sysconf("SC_CLK_TCK")
            self.cpu_seconds = max(self.cpu_seconds, (int(stat[11]) + int(stat[12])) / ticks)
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def child_pids(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ValueError):
        return []


def start_coordinator(args: argparse.Namespace, out: Path, token_file: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fedmoe.cli"]
    if args.coordinator_cmd:  # A/B runs of a modified coordinator, e.g. "python patched.py"
        cmd = shlex.split(args.coordinator_cmd)
    if args.cprofile:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--profiled-coordinator"]
        cmd += [str(out / "coordinator.cprofile"), "--"]
    cmd += ["coordinator", "--listen", "127.0.0.1:0"]
    cmd += ["--peers", str(args.peers), "--out", str(out / "run"), "--token-file", str(token_file)]
    cmd += ["--dataset", "synthetic", "--embed-dim", str(args.embed_dim), "--experts"]
    cmd += [str(args.experts), "--expert-hidden", "8", "--rounds", str(args.rounds)]
    cmd += ["--sync-every", str(args.sync_every), "--neighbors", str(args.neighbors)]
    cmd += ["--round-timeout", str(args.round_timeout), "--peer-timeout", str(args.peer_timeout)]
    cmd += ["--min-peers", str(args.peers)]  # a round closes with everyone: nobody is left out
    if not args.no_liveness:
        cmd += ["--liveness-listen", "127.0.0.1:0"]
    log = open(out / "coordinator.log", "w")  # lives as long as the process
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def profiled_coordinator(stats_file: str, argv: list[str]) -> int:
    """Run `fedmoe coordinator` with a cProfile in every thread, timed by that thread's CPU
    clock, so that time spent blocked (waits, locks) is not counted and the gRPC pool's threads
    are seen (py-spy cannot keep up with thousands of threads). Writes the merged stats."""
    import cProfile
    import pstats

    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()

    def start(frame: Any, event: str, arg: Any) -> None:  # first event of every new thread
        profile = cProfile.Profile(time.thread_time)
        with lock:
            profiles.append(profile)
        profile.enable()  # replaces this hook for the thread

    threading.setprofile(start)
    main_profile = cProfile.Profile(time.thread_time)
    profiles.append(main_profile)
    main_profile.enable()
    from fedmoe.cli import main as cli_main

    try:
        return cli_main(argv)
    finally:
        main_profile.disable()
        threading.setprofile(None)  # type: ignore[arg-type]
        with lock:
            merged = pstats.Stats(main_profile)
            for p in profiles[1:]:
                p.snapshot_stats()  # other threads' profilers: read without disabling
                if p.stats:  # type: ignore[attr-defined]
                    merged.add(p)
        # Calls still open in other threads (idle pool workers blocked in SimpleQueue.get) are
        # closed by snapshot_stats with this thread's clock: meaningless, so dropped.
        stats: dict = merged.stats  # type: ignore[attr-defined]
        for key in [k for k in stats if k[2].startswith("<method 'get' of '_queue")]:
            del stats[key]
        merged.dump_stats(stats_file)


def read_lines(stream: Any, into: queue.Queue[str | None]) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def wait_for(lines: queue.Queue[str | None], prefix: str, timeout: float, who: str) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise SystemExit(f"{who}: no {prefix.strip()!r} line within {timeout:.0f} s") from None
        if line is None:
            raise SystemExit(f"{who} exited before printing {prefix.strip()!r}")
        if line.startswith(prefix):
            return line[len(prefix) :].strip()


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def plan_seconds_in_process(args: argparse.Namespace) -> float:
    """Time FedMoEDA.aggregate on the run's shapes (fallback when the coordinator does not
    report its own aggregate time)."""
    from fedmoe.common.config import make_config
    from fedmoe.coordinator.strategies import FedMoEDA, PeerUpdate

    cfg = make_config(
        peers=args.peers,
        dataset="synthetic",
        embed_dim=args.embed_dim,
        num_experts=args.experts,
        expert_hidden=8,
    )
    schema = model_schema(cfg)
    rng = np.random.default_rng(0)
    updates = [
        PeerUpdate(
            f"peer-{i}",
            NUM_SAMPLES,
            {
                n: rng.standard_normal(s).astype(np.float32)
                for n, s in schema.items()
                if n.startswith(("embedding.", "gate."))
            },
        )
        for i in range(args.peers)
    ]
    strategy = FedMoEDA(args.neighbors, cfg.temperature, 1, cfg.intra_peer)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        strategy.aggregate(1, updates)
        best = min(best, time.perf_counter() - started)
    return best


LOOP_LAG = re.compile(r"event loop lag ms: p50 ([\d.]+) p99 ([\d.]+) max ([\d.]+)")


def loop_lag(log: Path) -> dict[str, float] | None:
    """The aio coordinator's event-loop lag (coordinator/aio_server.LagProbe), from its log:
    how long a call waited for the loop's next turn, the server's side of a heartbeat's
    latency. None for the thread-pool server."""
    found = LOOP_LAG.search(log.read_text(errors="replace")) if log.exists() else None
    if found is None:
        return None
    return dict(zip(("p50", "p99", "max"), map(float, found.groups()), strict=True))


def worker_shares(peers: int, procs: int, probe_peers: int) -> list[np.ndarray]:
    """Peer indices per worker process. With probe peers, indices 0..probe_peers-1 get a
    process of their own (a real peer's process hosts one peer, or a peer host's few), and the
    rest are spread over `procs` processes."""
    probe = max(0, min(probe_peers, peers - 1))
    rest = np.arange(probe, peers)
    shares = np.array_split(rest, max(1, min(procs, len(rest))))
    return ([np.arange(probe)] if probe else []) + shares


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fedmoe-scale-"))
    out.mkdir(parents=True, exist_ok=True)
    token_file = out / "join-token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")

    coordinator = start_coordinator(args, out, token_file)
    watch = ProcWatch(coordinator.pid)
    child_watch: ProcWatch | None = None
    profiler = None
    if args.py_spy:  # sample every thread of the coordinator (cProfile sees only one)
        profiler = subprocess.Popen(
            [args.py_spy, "record", "--pid", str(coordinator.pid), "--format", "raw"]
            + [
                "--rate",
                "50",
                "--gil",
                "--nonblocking",
                "--output",
                str(out / "coordinator.pyspy"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(out / "py-spy.log", "w"),
        )
    coord_lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=read_lines, args=(coordinator.stdout, coord_lines), daemon=True).start()
    workers: list[subprocess.Popen] = []
    worker_cpu = heartbeat_cpu = 0.0
    try:
        address = wait_for(coord_lines, LISTENING, 120, "coordinator")
        for pid in child_pids(coordinator.pid):  # its liveness process, when it has one
            child_watch = ProcWatch(pid)
        shares = worker_shares(args.peers, args.procs, args.probe_peers)
        worker_lines: list[queue.Queue[str | None]] = []
        for share in shares:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", address]
            cmd += ["--indices", ",".join(map(str, share)), "--call-timeout"]
            cmd += [str(args.call_timeout), "--train-seconds", str(args.train_seconds)]
            cmd += ["--worker-nice", str(args.worker_nice)]
            w = subprocess.Popen(
                cmd,
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "FEDMOE_TOKEN": token},  # never on the command line
            )
            workers.append(w)
            q: queue.Queue[str | None] = queue.Queue()
            threading.Thread(target=read_lines, args=(w.stdout, q), daemon=True).start()
            worker_lines.append(q)
        for k, q in enumerate(worker_lines):
            wait_for(q, "READY", 300, f"worker {k}")
        started = time.monotonic()
        for w in workers:
            assert w.stdin is not None
            w.stdin.write("GO\n")
            w.stdin.flush()
        results: list[dict[str, Any]] = []
        worker_lags: list[float] = []
        for k, q in enumerate(worker_lines):
            worker_lags += json.loads(wait_for(q, "LAG ", args.run_timeout, f"worker {k}"))
            own, of_beats = json.loads(wait_for(q, "CPU ", 60, f"worker {k}"))
            worker_cpu += float(own)
            heartbeat_cpu += float(of_beats)
            results += json.loads(wait_for(q, "RESULT ", 60, f"worker {k}"))
        finished = time.monotonic()
        try:
            coordinator.wait(timeout=120)
        except subprocess.TimeoutExpired:
            coordinator.terminate()
            coordinator.wait(timeout=30)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        if coordinator.poll() is None:
            coordinator.kill()
        watch.stop()
        if child_watch is not None:
            child_watch.stop()
        if profiler is not None:
            profiler.wait(timeout=60)  # it writes its file once the coordinator is gone

    # Every virtual peer's own timeline, for a closer look than the summary line.
    (out / "peers.json").write_text(json.dumps(results))
    return summarize(
        args,
        out,
        results,
        started,
        finished,
        watch,
        worker_lags,
        child_watch,
        worker_cpu,
        heartbeat_cpu,
    )


def summarize(
    args: argparse.Namespace,
    out: Path,
    results: list[dict[str, Any]],
    started: float,
    finished: float,
    watch: ProcWatch,
    worker_lags: list[float],
    child_watch: ProcWatch | None = None,
    worker_cpu_seconds: float | None = None,
    heartbeat_cpu_seconds: float | None = None,
) -> dict[str, Any]:
    errors = [f"peer-{r['index']}: {r['error']}" for r in results if r["error"]]
    joined = [r for r in results if r["join_done"]]
    beats = [x for r in results for x in r["heartbeats_ms"]]
    probe = max(0, min(args.probe_peers, args.peers - 1))
    probe_beats = [x for r in results if r["index"] < probe for x in r["heartbeats_ms"]]
    close: list[dict[str, Any]] = []
    for rnd in range(1, args.rounds + 1):
        per = [r["rounds"][str(rnd)] for r in results if str(rnd) in r["rounds"]]
        if not per or any("plan" not in t for t in per):
            continue
        last_ack = max(t["ack"] for t in per)
        all_plans = max(t["plan"] for t in per)
        close.append(
            {
                "round": rnd,
                "close_seconds": round(all_plans - last_ack, 4),
                # From the start of the last upload: includes the aggregate itself, which the
                # coordinator computes before it acks the upload that completes the round.
                "from_last_upload_seconds": round(all_plans - max(t["upload"] for t in per), 4),
                "uploads_seconds": round(last_ack - min(t["upload"] for t in per), 4),
                "rows_per_plan": max(int(t.get("rows", 0)) for t in per),
            }
        )
    summary_path = out / "run" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    timings = [t for t in summary.get("round_timings", []) if t.get("sync")]
    # Inside the coordinator the aggregate shares the GIL with the gRPC threads; the isolated
    # figure (same shapes, an idle process) tells the strategy's own cost apart from that.
    isolated = round(plan_seconds_in_process(args), 4)
    if timings and all("aggregate_seconds" in t for t in timings):
        plan_seconds = max(t["aggregate_seconds"] for t in timings)
        source = "coordinator summary.json round_timings: max aggregate_seconds over sync rounds"
    else:
        plan_seconds = isolated
        source = "FedMoEDA.aggregate timed in the benchmark process on the run's shapes"
    return {
        "peers": args.peers,
        "procs": len(worker_shares(args.peers, args.procs, args.probe_peers)),
        "experts": args.experts,
        "neighbors": args.neighbors,
        "join_seconds": round(
            max(r["join_done"] for r in joined) - min(r["join_sent"] for r in joined), 4
        )
        if len(joined) == len(results)
        else None,
        "heartbeats": len(beats),
        "heartbeat_p50_ms": percentile(beats, 50),
        "heartbeat_p99_ms": percentile(beats, 99),
        "heartbeat_max_ms": round(max(beats), 3) if beats else None,
        # The same for the probe peers only: hosted in a worker of their own, apart from
        # the other peers' crowded workers (~250 each at N = 1,000, on the same 2 cores).
        "probe_peers": probe,
        "probe_heartbeats": len(probe_beats),
        "probe_heartbeat_p50_ms": percentile(probe_beats, 50),
        "probe_heartbeat_p99_ms": percentile(probe_beats, 99),
        "probe_heartbeat_max_ms": round(max(probe_beats), 3) if probe_beats else None,
        "heartbeat_errors": sum(r["heartbeat_errors"] for r in results),
        "heartbeat_fallbacks": sum(r["heartbeat_fallbacks"] for r in results),
        "liveness_process": not args.no_liveness,
        "heartbeat_error_codes": _sum_counts(r["heartbeat_error_codes"] for r in results),
        "round_close_seconds": max((c["close_seconds"] for c in close), default=None),
        "round_close_from_last_upload_seconds": max(
            (c["from_last_upload_seconds"] for c in close), default=None
        ),
        "round_close": close,
        "plan_seconds": plan_seconds,
        "plan_seconds_source": source,
        "plan_seconds_isolated": isolated,
        "coordinator_rss_mb": round(watch.hwm_kb / 1024, 1),
        "coordinator_cpu_seconds": round(watch.cpu_seconds, 2),
        "coordinator_threads_max": watch.threads,
        # The coordinator's liveness process (--liveness-listen), apart: it is a process more.
        "liveness_rss_mb": round(child_watch.hwm_kb / 1024, 1) if child_watch else None,
        "liveness_cpu_seconds": round(child_watch.cpu_seconds, 2) if child_watch else None,
        "coordinator_loop_lag_ms": loop_lag(out / "coordinator.log"),
        # CPU time of the bench's own processes (all of them together), which share the cores
        # with the coordinator: the workers (joins, uploads, results, reports) and, apart,
        # the heartbeat processes beside them.
        "worker_cpu_seconds": round(worker_cpu_seconds, 2) if worker_cpu_seconds else None,
        "heartbeat_procs_cpu_seconds": (
            round(heartbeat_cpu_seconds, 2) if heartbeat_cpu_seconds else None
        ),
        # the coordinator's loop lag, the same for the bench's own worker processes
        "worker_loop_lag_ms": {
            "p50": percentile(worker_lags, 50),
            "p99": percentile(worker_lags, 99),
            "max": round(max(worker_lags), 3) if worker_lags else None,
        },
        "rounds": len(close),
        "total_seconds": round(finished - started, 3),
        "train_seconds": args.train_seconds,
        "worker_nice": args.worker_nice,
        "status": summary.get("status", "no summary.json"),
        "errors": len(errors),
        "first_errors": errors[:3],
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        ),
        "out": str(out),
    }


def _sum_counts(counts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == "--profiled-coordinator":  # STATS_FILE -- ARGS
        sys.exit(profiled_coordinator(sys.argv[2], sys.argv[4:]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, default=100)
    p.add_argument("--procs", type=int, default=4, help="OS processes hosting the peers")
    p.add_argument(
        "--probe-peers",
        type=int,
        default=10,
        help="peers hosted in one more process of their own (probe_heartbeat_* figures)",
    )
    p.add_argument(
        "--no-liveness",
        action="store_true",
        help="heartbeats to the coordinator itself, not to its liveness process (A/B)",
    )
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--sync-every", type=int, default=1)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--embed-dim", type=int, default=8)
    p.add_argument("--neighbors", type=int, default=2)
    p.add_argument("--round-timeout", type=float, default=600.0)
    p.add_argument("--peer-timeout", type=float, default=10.0, help="heartbeat every 1/5 of it")
    p.add_argument(
        "--train-seconds", type=float, default=3.0, help="simulated local training per round"
    )
    p.add_argument("--call-timeout", type=float, default=600.0)
    p.add_argument(
        "--worker-nice",
        type=int,
        default=WORKER_NICE,
        help="niceness of the processes that host the peers' uploads and results (default "
        f"{WORKER_NICE}: the load yields the cores to the coordinator, its liveness process and "
        "the heartbeat processes, as peers on other machines would; 0: all share them alike)",
    )
    p.add_argument("--run-timeout", type=float, default=1800.0)
    p.add_argument(
        "--cprofile", action="store_true", help="profile the coordinator (per-thread CPU time)"
    )
    p.add_argument(
        "--coordinator-cmd",
        default=None,
        help="command that stands for `python -m fedmoe.cli` (default), for A/B runs",
    )
    p.add_argument("--py-spy", default=None, help="py-spy binary: profile the coordinator")
    p.add_argument("--out", default=None, help="run directory (default: a fresh temp dir)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # coordinator address
    p.add_argument("--heartbeats", default=None, help=argparse.SUPPRESS)  # the same
    p.add_argument("--indices", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.heartbeats:
        heartbeats_main(args.heartbeats)
        return
    if args.worker:
        indices = [int(i) for i in args.indices.split(",") if i]
        token = os.environ["FEDMOE_TOKEN"]
        asyncio.run(
            worker_main(
                args.worker,
                token,
                indices,
                args.call_timeout,
                args.train_seconds,
                args.worker_nice,
            )
        )
        return
    print(json.dumps(run_bench(args)), flush=True)


if __name__ == "__main__":
    main()
