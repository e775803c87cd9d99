"""`docker compose up` with a coordinator and 3 peers, each in its own container, from the image
built offline by `make image`; results are read from the bind-mounted ./runs/compose."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROJECT = "fedmoe-compose-test"


def compose_cmd() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return ["docker", "compose"]


def containers() -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def test_compose_cluster_trains_to_the_end() -> None:
    run_dir = REPO / "runs" / "compose"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (REPO / "data").mkdir(exist_ok=True)
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": PROJECT,
        "FEDMOE_PEERS": "3",
        "FEDMOE_ROUNDS": "2",
        "FEDMOE_UID": str(os.getuid()),
        "FEDMOE_GID": str(os.getgid()),
    }
    base = [*compose_cmd(), "-f", str(REPO / "docker-compose.yml")]
    try:
        proc = subprocess.run(
            [
                *base,
                "up",
                "--no-build",
                "--exit-code-from",
                "coordinator",
                "coordinator",
                "peer0",
                "peer1",
                "peer2",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    finally:
        subprocess.run(
            [*base, "down", "-v", "--remove-orphans"],
            cwd=REPO,
            env=env,
            capture_output=True,
            timeout=300,
        )
    assert containers() == [], "containers left behind"

    assert summary["status"] == "completed"
    assert (summary["peers"], summary["rounds_completed"]) == (3, 2)
    assert len(records) == 6
    assert summary["bytes"]["p2p"] > 0  # experts went container to container
    assert "experts" not in summary["coordinator_view"]["tensor_groups_received"]
    # Each container has an interface of its own: wire bytes are measured and exceed app bytes.
    wire = summary["wire_bytes"]
    assert wire["coordinator"] is not None and wire["p2p"] is not None
    # Every byte the application counted crossed the interfaces, with framing on top. The
    # coordinator's app count covers both ends of its traffic; its interface sees one end.
    assert 2 * wire["coordinator"] >= summary["bytes"]["coordinator"]
    assert wire["p2p"] >= summary["bytes"]["p2p"]
    print(
        "\ncompose summary:",
        json.dumps(
            {
                k: summary[k]
                for k in (
                    "algorithm",
                    "peers",
                    "rounds",
                    "final_accuracy_mean",
                    "final_global_accuracy_mean",
                    "bytes",
                )
            },
            indent=1,
        ),
    )
    print("wire bytes:", json.dumps({k: wire[k] for k in ("coordinator", "p2p", "peers_total")}))
