"""`fedmoe local`: the coordinator and N peers as separate OS processes on loopback.

The peers are spread over peer-host processes (`fedmoe peer --index A-B`): one per peer by
default, one per GPU with `--gpus`, or `--procs P` processes with contiguous index ranges.
Only the coordinator's exit ends the run: a peer process that dies is reported and recorded,
and the run goes on as long as the coordinator keeps its quorum (it fails the run otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmoe.cli import security_argv
from fedmoe.common.atomic import atomic_write_json
from fedmoe.common.auth import new_token_file
from fedmoe.common.config import config_to_argv
from fedmoe.common.plugins import import_roots
from fedmoe.common.proto import pb
from fedmoe.progress import PlainProgress, Progress, choose_progress
from fedmoe.report import print_report

LISTENING = "FEDMOE_LISTENING "
# How long the coordinator may go on once no peer process is left: long enough to write its
# results when the peers ended normally, short when every one of them failed.
GRACE_AFTER_PEERS_DONE = 60.0
GRACE_AFTER_PEERS_FAILED = 5.0
# How long surviving peer processes get to exit on their own after the coordinator's exit.
GRACE_FOR_PEERS = 30.0


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def split_ranges(peers: int, procs: int) -> list[list[int]]:
    """N peer indices cut into `procs` contiguous ranges whose sizes differ by at most one."""
    base, extra = divmod(peers, procs)
    out, start = [], 0
    for k in range(procs):
        size = base + (1 if k < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


@dataclass
class PeerProcess:
    indices: list[int]
    device: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    noted: bool = field(default=False)  # its exit was seen (and reported if abnormal)

    @property
    def name(self) -> str:
        """ "peer 3" or "peers 0-24": how the console and summary.json name this process."""
        if len(self.indices) == 1:
            return f"peer {self.indices[0]}"
        return f"peers {self.indices[0]}-{self.indices[-1]}"

    @property
    def index_spec(self) -> str:
        if len(self.indices) == 1:
            return str(self.indices[0])
        return f"{self.indices[0]}-{self.indices[-1]}"

    def record(self) -> dict[str, Any]:
        assert self.proc is not None
        return {
            "process": self.name,
            "indices": self.indices,
            "exit": self.proc.returncode,
            "pid": self.proc.pid,
            "log": self.log.name,
        }


def plan_processes(args: argparse.Namespace, peers: int, out: Path) -> list[PeerProcess]:
    """Which of the `peers` each process hosts, on which device, logging where (ValueError if
    bad)."""
    gpus = [g.strip() for g in args.gpus.split(",")] if args.gpus else []
    if any(not g.isdigit() for g in gpus):
        raise ValueError("--gpus takes comma-separated GPU numbers, e.g. 0,1")
    if args.procs is not None:
        if not 1 <= args.procs <= peers:
            raise ValueError("--procs must be between 1 and --peers")
        procs = args.procs
    elif gpus:
        procs = min(len(gpus), peers)  # one peer process per GPU
    else:
        procs = peers  # one process per peer
    plan = []
    for k, indices in enumerate(split_ranges(peers, procs)):
        device = f"cuda:{gpus[k % len(gpus)]}" if gpus else "cpu"
        one = len(indices) == 1
        log = out / (f"peer-{indices[0]}.log" if one else f"peers-{indices[0]}-{indices[-1]}.log")
        plan.append(PeerProcess(indices, device, log))
    return plan


def check_metrics_ports(args: argparse.Namespace, processes: int) -> None:
    """--metrics-port PORT needs PORT .. PORT+processes to be ports (ValueError if not)."""
    port = getattr(args, "metrics_port", None)
    if port and port + processes > 65535:
        raise ValueError(
            f"--metrics-port {port}: the {processes} peer process(es) would need ports up to "
            f"{port + processes}; choose a lower port, or 0 for any free ports"
        )


def telemetry_argv(args: argparse.Namespace, peer_process: int | None) -> list[str]:
    """The telemetry flags for the coordinator (peer_process None) or peer process i: metrics
    on PORT for the coordinator and PORT+1+i for peer process i (all 0 when PORT is 0)."""
    argv: list[str] = []
    port = getattr(args, "metrics_port", None)
    if port is not None:
        own = port if port == 0 or peer_process is None else port + 1 + peer_process
        argv += ["--metrics-port", str(own), "--metrics-listen", args.metrics_listen]
    board = getattr(args, "tensorboard", None)
    if peer_process is None and board is not None:
        argv += ["--tensorboard", str(Path(board).resolve())]
    return argv


def _add_launcher_record(out: Path, record: dict[str, Any]) -> None:
    """Add the launcher's view to summary.json: rewritten whole, atomically (temp + rename)."""
    path = out / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # the coordinator wrote no summary (it died): nothing to add to
    summary["launcher"] = record
    atomic_write_json(path, summary)


def _stop(procs: list[subprocess.Popen[Any]], grace: float) -> None:
    """SIGTERM, then SIGKILL whatever is still running after `grace` seconds."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def start(args: argparse.Namespace, cfg: pb.RunConfig) -> int:
    """`fedmoe local` once its flags are parsed, and fedmoe.run_local (fedmoe/api.py): refuse
    plug-ins that fail, or data that cannot be split, before starting anything (ConfigError),
    then run in --out or a fresh run directory."""
    from fedmoe.cli import _run_local_in_dir, check_local_data, check_plugins

    check_plugins(cfg, with_weights=True)
    check_local_data(cfg)
    return _run_local_in_dir(args, cfg, run_local)


def run_local(args: argparse.Namespace, cfg: pb.RunConfig) -> int:
    """Run `cfg` (already checked: fedmoe/cli.py) with the launcher options of `args`."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    try:
        hosts = plan_processes(args, cfg.peers, out)
        check_metrics_ports(args, len(hosts))
    except ValueError as e:
        print(f"fedmoe: {e}", file=sys.stderr)
        return 2
    py = [sys.executable, "-m", "fedmoe.cli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Plug-ins this process imported (start() checked them) are importable by its children.
    roots = import_roots([cfg.model, cfg.dataset])
    if roots:
        env["PYTHONPATH"] = os.pathsep.join([*roots, *filter(None, [env.get("PYTHONPATH")])])
    # The cores are shared by the peer processes; the peers of one process take turns.
    threads = max(1, (os.cpu_count() or 1) // len(hosts))

    # One fresh join token per run, readable by this user only, handed over as a file.
    token_file = Path(args.token_file) if args.token_file else out / "join-token"
    if not args.token_file:
        new_token_file(token_file)
    coord_log = open(out / "coordinator.log", "w")
    coordinator = subprocess.Popen(
        [
            *py,
            *(["-v"] if getattr(args, "verbose", False) else []),
            "coordinator",
            *("--listen", "127.0.0.1:0", "--token-file", str(token_file), "--out", str(out)),
            # Built from what was parsed, not edited out of our own command line: the run
            # options through their one table, then the security flags given.
            *config_to_argv(cfg),
            *security_argv(args),
            *telemetry_argv(args, None),
            *(["--liveness-listen", "127.0.0.1:0"] if getattr(args, "liveness", False) else []),
        ],
        stdout=subprocess.PIPE,
        stderr=coord_log,
        text=True,
        env=env,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert coordinator.stdout is not None
        for line in coordinator.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    address = None
    while address is None:
        try:
            line = lines.get(timeout=120)
        except queue.Empty:
            line = None
        if line is None:
            coordinator.kill()
            print(f"coordinator did not start:\n{_tail(out / 'coordinator.log')}", file=sys.stderr)
            return 1
        if line.startswith(LISTENING):
            address = line[len(LISTENING) :].strip()
        else:
            print(line, end="", flush=True)
    logs = ", ".join(h.log.name for h in hosts) if len(hosts) <= 8 else "peer*.log"
    print(
        f"coordinator at {address}; starting {cfg.peers} peers in {len(hosts)} process(es) "
        f"(logs in {out}: coordinator.log, {logs})",
        flush=True,
    )

    try:
        for h in hosts:
            if args.gpus:
                print(f"{h.name} on {h.device}", flush=True)
            cmd = [*py, "peer", "--coordinator", address, "--listen", "127.0.0.1:0"]
            cmd += ["--index", h.index_spec, "--device", h.device, "--threads", str(threads)]
            cmd += ["--token-file", str(token_file)]
            if cfg.data_dir:
                cmd += ["--data-dir", cfg.data_dir]
            if args.state_dir:
                cmd += ["--state-dir", str(args.state_dir)]
            if args.tls:
                cmd += ["--tls", "--certs", str(args.certs)]
            cmd += telemetry_argv(args, hosts.index(h))
            with open(h.log, "w") as log:  # the child keeps its own descriptor
                h.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        # A bar with ETA on a terminal; the plain per-round lines anywhere else.
        progress = choose_progress(cfg.rounds, sys.stdout)
        return _supervise(out, coordinator, hosts, lines, progress)
    finally:  # Ctrl-C or a launcher bug: leave no process behind
        _stop([coordinator, *(h.proc for h in hosts if h.proc is not None)], grace=10)
        coord_log.close()


def _supervise(
    out: Path,
    coordinator: subprocess.Popen[str],
    hosts: list[PeerProcess],
    lines: queue.Queue[str | None],
    progress: Progress | None = None,
) -> int:
    """Relay the coordinator's progress until it exits; note peer processes that die."""
    shown = progress or PlainProgress(sys.stdout)

    def relay(timeout: float) -> None:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            return
        if line:
            shown.line(line)

    early: list[PeerProcess] = []
    all_gone_at: float | None = None
    stopped_coordinator = False
    while coordinator.poll() is None:
        relay(0.5)
        for h in hosts:
            assert h.proc is not None
            code = h.proc.poll()
            if code is None or h.noted:
                continue
            h.noted = True
            if code != 0:
                early.append(h)
                print(
                    f"peer host {h.name} (pid {h.proc.pid}) exited {code}; the run goes on "
                    f"while the quorum holds (log {h.log.name}):\n{_tail(h.log, 5)}",
                    file=sys.stderr,
                    flush=True,
                )
        if all(h.noted for h in hosts):
            # No peer is left: the coordinator can only write its results (peers that ended
            # normally) or wait for joins that never come (all failed). Bound that wait.
            all_gone_at = all_gone_at or time.monotonic()
            failed_all = len(early) == len(hosts)
            grace = GRACE_AFTER_PEERS_FAILED if failed_all else GRACE_AFTER_PEERS_DONE
            if time.monotonic() - all_gone_at > grace:
                print("no peer process is left; stopping the coordinator", file=sys.stderr)
                stopped_coordinator = True
                _stop([coordinator], grace=15)
    while not lines.empty():
        relay(0)
    shown.close()

    # The run is over: the peers still running end on their own (they learn it from the
    # coordinator); those that do not within the grace are stopped.
    running = [h for h in hosts if h.proc is not None and h.proc.poll() is None]
    deadline = time.monotonic() + (GRACE_FOR_PEERS if coordinator.returncode == 0 else 5.0)
    terminated: list[PeerProcess] = []
    for h in running:
        assert h.proc is not None
        try:
            h.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            terminated.append(h)
    _stop([h.proc for h in terminated if h.proc is not None], grace=10)
    failed_late = [
        h for h in running if h not in terminated and h.proc is not None and h.proc.returncode != 0
    ]
    _add_launcher_record(
        out,
        {
            "processes": len(hosts),
            # died while the coordinator ran (the run went on without their peers)
            "exited_early": [h.record() for h in early],
            # still running after the coordinator's exit and its grace: stopped
            "stopped_after_the_run": [h.record() for h in terminated],
            # ended on their own after the coordinator, with an error
            "failed_after_the_run": [h.record() for h in failed_late],
        },
    )

    code = coordinator.returncode
    if code != 0:
        for h in early if stopped_coordinator else []:
            print(f"{h.name} failed (exit {h.record()['exit']}):\n{_tail(h.log)}", file=sys.stderr)
        print(
            f"coordinator failed (exit {code}):\n{_tail(out / 'coordinator.log')}",
            file=sys.stderr,
        )
        return code if code > 0 else 1
    print()
    return print_report(out)
