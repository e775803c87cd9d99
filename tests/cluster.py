"""A test harness: a coordinator and peers as separate OS processes on loopback.

Unlike `fedmoe local`, each process is started (and killed, and restarted) by the test itself.
Processes are waited on with timeouts; nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FEDMOE = [sys.executable, "-m", "fedmoe.cli"]


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (the attack tests check it stays flat)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self, root: Path, peers: int, run_args: list[str], token: str | None = None):
        self.root = root
        self.out = root / "run"
        self.state = root / "state"
        self.peers = peers
        self.run_args = run_args
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.token_file = root / "token"
        self.token_file.write_text((token or "t" * 32) + "\n")
        self.token_file.chmod(0o600)
        self.procs: dict[str, subprocess.Popen] = {}
        self.starts: dict[str, int] = {}

    def _env(self, faults: str | None) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("FEDMOE_FAULTS", None)
        if faults:
            env["FEDMOE_FAULTS"] = faults
        return env

    def _spawn(self, name: str, cmd: list[str], faults: str | None) -> subprocess.Popen:
        n = self.starts[name] = self.starts.get(name, 0) + 1
        log = open(self.root / f"{name}.{n}.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env(faults))
        self.procs[name] = proc
        return proc

    def start_coordinator(
        self, faults: str | None = None, extra: list[str] | None = None
    ) -> subprocess.Popen:
        cmd = [*FEDMOE, "coordinator", "--listen", self.address, "--peers", str(self.peers)]
        cmd += ["--out", str(self.out), "--token-file", str(self.token_file)]
        cmd += ["--state-dir", str(self.state / "coordinator"), *self.run_args, *(extra or [])]
        return self._spawn("coordinator", cmd, faults)

    def start_peer(
        self,
        k: int | str,
        faults: str | None = None,
        listen: str = "127.0.0.1:0",
        extra: list[str] | None = None,
    ) -> subprocess.Popen:
        """Peer `k`, or with an index spec such as "0-2" a peer host (named "peers-0-2")."""
        name = f"peer-{k}" if isinstance(k, int) else f"peers-{k}"
        cmd = [
            *FEDMOE,
            "peer",
            "--coordinator",
            self.address,
            "--index",
            str(k),
            "--listen",
            listen,
        ]
        cmd += ["--token-file", str(self.token_file), "--state-dir", str(self.state / name)]
        cmd += ["--timeout", "120", "--threads", "1", *(extra or [])]
        return self._spawn(name, cmd, faults)

    def start_auto_peer(
        self, name: str, faults: str | None = None, extra: list[str] | None = None
    ) -> subprocess.Popen:
        """A peer with `--index auto` (the coordinator assigns its index), its own --state-dir."""
        cmd = [*FEDMOE, "peer", "--coordinator", self.address, "--index", "auto"]
        cmd += ["--listen", "127.0.0.1:0", "--token-file", str(self.token_file)]
        cmd += ["--state-dir", str(self.state / name), "--timeout", "120", "--threads", "1"]
        return self._spawn(name, [*cmd, *(extra or [])], faults)

    def wait(self, name: str, timeout: float = 240) -> int:
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"{name} did not finish in {timeout} s:\n{self.logs()}") from None

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)

    def logs(self, tail: int = 15) -> str:
        out = []
        for path in sorted(self.root.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def wait_for_log(self, name: str, text: str, timeout: float = 120) -> None:
        """Wait until a process has logged `text` (its log is the outside view of its state)."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text(name):
            if time.monotonic() > deadline or self.procs[name].poll() is not None:
                raise AssertionError(f"{name} never logged {text!r}:\n{self.logs()}")
            time.sleep(0.05)

    def summary(self) -> dict[str, Any]:
        return json.loads((self.out / "summary.json").read_text())

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in (self.out / "metrics.jsonl").read_text().splitlines()]

    def log_text(self, name: str) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.root.glob(f"{name}.*.log"))
        )
