"""`fedmoe local`: the coordinator and N peers as separate OS processes on loopback."""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from common.auth import new_token_file
from fedmoe.report import print_report

LISTENING = "FEDMOE_LISTENING "


def _strip(argv: list[str], flag: str) -> list[str]:
    """Drop `flag VALUE` / `flag=VALUE` (launcher-only options) from a command line."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_local(args: argparse.Namespace, argv: list[str]) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    gpus = [g.strip() for g in args.gpus.split(",")] if args.gpus else []
    py = [sys.executable, "-m", "fedmoe.cli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    threads = max(1, (os.cpu_count() or 1) // max(args.peers, 1))

    coord_argv = _strip(_strip(argv, "--gpus"), "--token-file")
    # One fresh join token per run, readable by this user only, handed over as a file.
    token_file = Path(args.token_file) if args.token_file else out / "join-token"
    if not args.token_file:
        new_token_file(token_file)
    coord_log = open(out / "coordinator.log", "w")
    coordinator = subprocess.Popen(
        [
            *py,
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            str(token_file),
            *coord_argv,
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
    print(f"coordinator at {address}; starting {args.peers} peers (logs in {out})", flush=True)

    peers = []
    for k in range(args.peers):
        device = f"cuda:{gpus[k % len(gpus)]}" if gpus else "cpu"
        if gpus:
            print(f"peer {k} on {device}", flush=True)
        cmd = [*py, "peer", "--coordinator", address, "--listen", "127.0.0.1:0"]
        cmd += ["--index", str(k), "--device", device, "--threads", str(threads)]
        cmd += ["--token-file", str(token_file)]
        if args.data_dir:
            cmd += ["--data-dir", str(Path(args.data_dir).resolve())]
        if args.state_dir:
            cmd += ["--state-dir", str(args.state_dir)]
        if args.tls:
            cmd += ["--tls", "--certs", str(args.certs)]
        log = open(out / f"peer-{k}.log", "w")
        peers.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))

    # Relay the coordinator's progress lines while waiting for every process to end.
    procs: dict[str, subprocess.Popen] = {"coordinator": coordinator}
    procs.update({f"peer-{k}": p for k, p in enumerate(peers)})
    failed = None
    while any(p.poll() is None for p in procs.values()):
        try:
            line = lines.get(timeout=0.5)
            if line:
                print(line, end="", flush=True)
        except queue.Empty:
            pass
        failed = next((n for n, p in procs.items() if p.poll() not in (None, 0)), None)
        if failed:
            break
    while not lines.empty():
        line = lines.get()
        if line:
            print(line, end="", flush=True)
    if failed:
        deadline = time.monotonic() + 10
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
        log_name = "coordinator.log" if failed == "coordinator" else f"{failed}.log"
        print(
            f"{failed} failed (exit {procs[failed].returncode}):\n{_tail(out / log_name)}",
            file=sys.stderr,
        )
        return 1
    print()
    return print_report(out)
