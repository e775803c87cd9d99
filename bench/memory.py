"""Peak memory of a whole `fedmoe local` run: PSS of the coordinator and of every peer process.

PSS (proportional set size) splits shared pages (the torch libraries, mapped once per process but
shared by the page cache) fairly between processes, so the sum over processes is what the run
costs the machine. The benchmark samples /proc/<pid>/smaps_rollup of every process of the run
a few times a second and reports each process's peak and the peak of the sum.

  python bench/memory.py --peers 100 --procs 4 --dataset digits --rounds 3
  python bench/memory.py --peers 100 --procs 4 --clients-per-round 10 --dataset cifar10 \
      --data-dir ../shared/data/cifar10-subset --rounds 5

Prints one JSON line: peers, procs, peak_total_pss_mb, peak_coordinator_pss_mb,
peak_peer_process_pss_mb (max over peer processes), pss_per_peer_mb (peak total minus the
coordinator, divided by the peers), seconds, status, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SAMPLE_SECONDS = 0.25


def pss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (the launcher starts the coordinator and the peer hosts)."""
    out: list[int] = []
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out.extend(int(k) for k in kids)
        stack.extend(int(k) for k in kids)
    return out


def role(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return "?"
    words = [c.decode(errors="replace") for c in cmd]
    if "coordinator" in words:
        return "coordinator"
    if "peer" in words:
        return "peer"
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--procs", type=int, default=None, help="peer-host processes")
    parser.add_argument("--out", type=Path, default=None)
    args, rest = parser.parse_known_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedmoe-memory-"))
    cmd = [sys.executable, "-m", "fedmoe.cli", "local", "--peers", str(args.peers)]
    if args.procs:
        cmd += ["--procs", str(args.procs)]
    cmd += [*rest, "--out", str(out)]
    started = time.monotonic()
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_total = 0
    peak: dict[int, int] = {}
    roles: dict[int, str] = {}
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "bench-memory.log", "w")

    def relay() -> None:  # keep the launcher's output flowing; show round lines as progress
        assert launcher.stdout is not None
        for line in launcher.stdout:
            log.write(line)
            if line.startswith(("[", "peer host")):
                print(line, end="", file=sys.stderr, flush=True)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    while launcher.poll() is None:
        total = 0
        for pid in children(launcher.pid):
            kb = pss_kb(pid)
            if kb is None:
                continue
            roles.setdefault(pid, role(pid))
            peak[pid] = max(peak.get(pid, 0), kb)
            total += kb
        peak_total = max(peak_total, total)
        time.sleep(SAMPLE_SECONDS)
    reader.join(30)
    log.close()
    coordinator = max((kb for p, kb in peak.items() if roles[p] == "coordinator"), default=0)
    peer_procs = [kb for p, kb in peak.items() if roles[p] == "peer"]
    summary_path = out / "summary.json"
    status = json.loads(summary_path.read_text())["status"] if summary_path.is_file() else "none"
    result = {
        "peers": args.peers,
        "procs": args.procs or args.peers,
        "args": rest,
        "status": status,
        "exit": launcher.returncode,
        "peak_total_pss_mb": round(peak_total / 1024, 1),
        "peak_coordinator_pss_mb": round(coordinator / 1024, 1),
        "peak_peer_process_pss_mb": round(max(peer_procs, default=0) / 1024, 1),
        "pss_per_peer_mb": round((peak_total - coordinator) / 1024 / max(args.peers, 1), 1),
        "seconds": round(time.monotonic() - started, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "run_dir": str(out),
    }
    print(json.dumps(result))
    return 0 if launcher.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
