"""`docker-compose.peers.yml`: this machine's peers joining a coordinator elsewhere.

The coordinator runs as a plain process on this host (standing for the coordinator machine),
the peers come from the peer-only compose file with host networking, as on a peer machine:
they find the coordinator through FEDMOE_COORDINATOR, advertise this host's address, and
exchange experts with each other through the host's expert port. One container hosts both peers
(FEDMOE_INDEX=0-1), so their experts still travel over gRPC between their own endpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.system.test_compose import compose_cmd, free_port

REPO = Path(__file__).resolve().parents[2]
PROJECT = "fedmoe-compose-peers-test"


def test_peer_only_compose_file_joins_a_coordinator_on_another_host(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy(REPO / "docker-compose.peers.yml", clone / "docker-compose.peers.yml")
    token = clone / "run.token"
    token.write_text("compose-peers-test-token\n")
    token.chmod(0o600)
    if os.getuid() == 0:  # a user's clone: not root's
        for p in (clone, token, clone / "docker-compose.peers.yml"):
            os.chown(p, 4242, 4343)
    port, peer_port = free_port(), free_port()
    out = tmp_path / "run"
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "fedmoe.cli", "coordinator", "--listen", f"127.0.0.1:{port}"]
        + ["--peers", "2", "--rounds", "2", "--sync-every", "1", "--dataset", "digits"]
        + ["--token-file", str(token), "--out", str(out), "--round-timeout", "120"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    env = {
        **os.environ,
        "FEDMOE_COORDINATOR": f"127.0.0.1:{port}",
        "FEDMOE_INDEX": "0-1",
        "FEDMOE_PEER_PORT": str(peer_port),
        "FEDMOE_PEER_THREADS": "1",
    }
    compose = [*compose_cmd(), "-p", PROJECT, "-f", "docker-compose.peers.yml"]
    try:
        up = subprocess.run(
            [*compose, "up", "--no-color"],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        log, _ = coordinator.communicate(timeout=120)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert coordinator.returncode == 0, log[-3000:]
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
        subprocess.run([*compose, "down", "-v"], cwd=clone, env=env, capture_output=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["peers"] == 2 and summary["rounds"] == 2
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4
    # Experts went peer to peer through the host's expert port, advertised as this host.
    assert summary["bytes"]["p2p"] > 0
    addresses = {m["address"] for m in summary["membership"].values()}
    assert addresses == {f"127.0.0.1:{peer_port}"}, addresses
