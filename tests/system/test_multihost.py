"""Coordinator and peers on separate hosts: each in its own Linux network namespace, joined by a
private link (scripts/netns.py). A FedMoE-DA run trains to the end; each node's kernel interface
counters (wire bytes) are compared with its application byte counts.

Shape every link with FEDMOE_NETNS_RATE / FEDMOE_NETNS_DELAY (e.g. 100mbit, 20ms).
Needs root and iproute2 (`.ci/run` installs it). Traffic stays inside the namespaces it creates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from netns import Topology  # noqa: E402

FEDMOE = [sys.executable, "-m", "fedmoe.cli"]
PEERS = 3


def test_namespaces_wire_bytes_cover_application_bytes(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("multihost-test-token-0123456789\n")
    token.chmod(0o600)
    out = tmp_path / "run"
    hosts = ["coord", *(f"p{k}" for k in range(PEERS))]
    rate, delay = os.environ.get("FEDMOE_NETNS_RATE"), os.environ.get("FEDMOE_NETNS_DELAY")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    with Topology(hosts, rate=rate, delay=delay, prefix="fmt-") as topo:
        coord = f"{topo.address('coord')}:50051"
        procs = {}
        logs = {}

        def start(name: str, host: str, args: list[str]) -> None:
            logs[name] = tmp_path / f"{name}.log"
            procs[name] = subprocess.Popen(
                [*topo.exec_prefix(host), *FEDMOE, *args],
                stdout=open(logs[name], "w"),
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )

        start(
            "coordinator",
            "coord",
            [
                "coordinator",
                "--listen",
                coord,
                "--peers",
                str(PEERS),
                "--rounds",
                "2",
                "--dataset",
                "synthetic",
                "--sync-every",
                "1",
                "--token-file",
                str(token),
                "--out",
                str(out),
            ],
        )
        for k in range(PEERS):
            start(
                f"peer-{k}",
                f"p{k}",
                [
                    "peer",
                    "--coordinator",
                    coord,
                    "--listen",
                    f"{topo.address(f'p{k}')}:50052",
                    "--index",
                    str(k),
                    "--token-file",
                    str(token),
                    "--threads",
                    "1",
                    "--timeout",
                    "300",
                ],
            )
        try:
            codes = {n: p.wait(timeout=600) for n, p in procs.items()}
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
        external = {h: sum(topo.counters(h)) for h in hosts}  # read before the hosts go away
        described = topo.describe()
    tails = "\n".join(f"--- {n}\n{logs[n].read_text()[-2000:]}" for n in logs)
    assert codes == {n: 0 for n in procs}, tails

    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert summary["bytes"]["p2p"] > 0

    wire = summary["wire_bytes"]
    assert wire["coordinator"] is not None and wire["p2p"] is not None, wire
    view = summary["coordinator_view"]
    rows = [
        (
            "coordinator",
            view["bytes_sent"] + view["bytes_received"],
            wire["coordinator"],
            external["coord"],
        )
    ]
    for k in range(PEERS):
        peer = f"peer-{k}"
        app = sum(sum(r["bytes"].values()) for r in records if r["peer"] == peer)
        w = wire["by_role"]["peers"][peer]
        rows.append((peer, app, w["sent"] + w["received"], external[f"p{k}"]))

    print(f"\nlink: {described}")
    print(f"{'host':<12} {'app bytes':>12} {'wire bytes':>12} {'wire/app':>9} {'iface total':>12}")
    for host, app, wire_bytes, ext in rows:
        print(f"{host:<12} {app:>12} {wire_bytes:>12} {wire_bytes / app:>9.3f} {ext:>12}")
    app_p2p, wire_p2p = summary["bytes"]["p2p"], wire["p2p"]
    print(f"{'p2p (class)':<12} {app_p2p:>12} {wire_p2p:>12} {wire_p2p / app_p2p:>9.3f}")
    for host, app, wire_bytes, ext in rows:
        assert wire_bytes >= app, f"{host}: wire {wire_bytes} < app {app}"
        assert ext >= wire_bytes  # the interface saw at least what the node counted per round
    assert wire_p2p >= app_p2p
