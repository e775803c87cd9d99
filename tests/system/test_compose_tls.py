"""`docker compose -f docker-compose.yml -f docker-compose.tls.yml up --exit-code-from
coordinator` from a fresh copy of the clone: a one-shot service makes the certificates, every
channel is mutual TLS, identical peer replicas each claim a certificate peer-K (and so index K),
and the coordinator's health check speaks TLS.

"Fresh" as in tests/system/test_compose.py: the copy holds the compose files and the two helper
scripts they mount (docker/tls-*.sh), no FEDMOE_* variable is set but the run size and a free
host port for the metrics, and the copy belongs to a uid that is not the one running docker
(when the test runs as root). FEDMOE_IMAGE, when set, picks the image to test."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from tests.system.test_compose import IS_ROOT, OWNER, compose_cmd, free_port

REPO = Path(__file__).resolve().parents[2]
PROJECT = "fedmoe-compose-tls-test"
IMAGE = os.environ.get("FEDMOE_IMAGE", "fedmoe:latest")
FILES = [
    "docker-compose.yml",
    "docker-compose.tls.yml",
    "docker/tls-certs.sh",
    "docker/tls-peer.sh",
]
COMPOSE = ["-f", "docker-compose.yml", "-f", "docker-compose.tls.yml"]

# Named: v1 would take the one-shot `certs` exiting (0, once the certificates are made) for the
# end of the run and stop everything; `up` still starts it first, as their dependency.
SERVICES = ["coordinator", "peer"]

# Run in a throwaway container on the run's network: the same health check, first over a
# plaintext channel (must be refused), then over TLS with the health check's certificate.
PROBE = """
import grpc
from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g
def check(ch):
    try:
        return g.HealthStub(ch).Check(h.HealthCheckRequest(service=''), timeout=5).status
    except grpc.RpcError as e:
        return e.code().name
f = lambda n: open('/tls/' + n, 'rb').read()
creds = grpc.ssl_channel_credentials(f('ca.crt'), f('healthcheck.key'), f('healthcheck.crt'))
print('plaintext', check(grpc.insecure_channel('coordinator:50051')))
print('tls', check(grpc.secure_channel('coordinator:50051', creds)))
"""


def docker(*args: str, timeout: float = 120) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def labelled(kind: str) -> list[str]:
    label = f"label=com.docker.compose.project={PROJECT}"
    return docker(*kind.split(), "-q", "--filter", label).split()


def service_containers(service: str) -> list[str]:
    label = f"label=com.docker.compose.service={service}"
    return [c for c in docker("ps", "-aq", "--filter", label).split() if c in labelled("ps -a")]


def fresh_clone(root: Path) -> Path:
    clone = root / "clone"
    (clone / "docker").mkdir(parents=True)
    for name in FILES:
        shutil.copy(REPO / name, clone / name)
    if IS_ROOT:
        for p in (clone, clone / "docker", *(clone / name for name in FILES)):
            os.chown(p, *OWNER)
    return clone


def wait_healthy(up: subprocess.Popen[str], deadline: float) -> str:
    """The coordinator's container id once docker reports it healthy."""
    while time.monotonic() < deadline:
        if up.poll() is not None:  # `up` gave up (a container failed to start, say)
            raise AssertionError(f"compose up exited {up.returncode}: {up.communicate()[0]}")
        for cid in service_containers("coordinator"):
            # A container not started yet (it waits for `certs`) has no .State.Health at all.
            status = docker(
                "inspect", "-f", "{{if .State.Health}}{{.State.Health.Status}}{{end}}", cid
            )
            if status.strip() == "healthy":
                return cid
        time.sleep(0.5)  # polling docker for a condition, with a deadline
    raise AssertionError("the coordinator never became healthy")


def test_compose_tls_from_a_fresh_clone(tmp_path: Path) -> None:
    clone = fresh_clone(tmp_path)
    run_dir = clone / "runs" / "compose"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDMOE_", "COMPOSE_"))}
    env.update(
        COMPOSE_PROJECT_NAME=PROJECT,
        FEDMOE_PEERS="3",
        FEDMOE_ROUNDS="2",
        FEDMOE_METRICS_PORT=str(free_port()),
    )
    if "FEDMOE_IMAGE" in os.environ:
        env["FEDMOE_IMAGE"] = IMAGE
    base = [*compose_cmd(), *COMPOSE]
    up = subprocess.Popen(
        [*base, "up", "--no-build", "--exit-code-from", "coordinator", *SERVICES],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        coordinator = wait_healthy(up, time.monotonic() + 300)
        network = f"{PROJECT}_fedmoe"
        probe = docker(
            "run", "--rm", "-u", "0:0", "--network", network, "-v", f"{PROJECT}_tls-coordinator:/tls:ro",
            "--entrypoint", "python", IMAGE, "-c", PROBE,
        )  # fmt: skip
        # Key files as the services see them: owned by the clone's owner, nobody else may read.
        modes = docker(
            "run", "--rm", "-u", "0:0", "--network", "none", "-v", f"{PROJECT}_tls-coordinator:/c:ro",
            "-v", f"{PROJECT}_tls-peers:/p:ro", "--entrypoint", "sh", IMAGE, "-c",
            "stat -c '%n %a %u:%g' /c /p /c/* /p/*.key /p/*.crt; echo FILES; ls /c /p",
        )  # fmt: skip
        out, _ = up.communicate(timeout=600)
        health = json.loads(docker("inspect", "-f", "{{json .State.Health}}", coordinator))
        summary = json.loads((run_dir / "summary.json").read_text())
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        subprocess.run(
            [*base, "down", "-v", "--remove-orphans"],
            cwd=clone,
            env=env,
            capture_output=True,
            timeout=300,
        )
    assert labelled("ps -a") == [], "containers left behind"
    assert labelled("volume ls") == [], "volumes left behind"
    assert labelled("network ls") == [], "networks left behind"

    logs = out[-6000:]
    assert up.returncode == 0, logs
    assert summary["status"] == "completed", logs
    assert (summary["peers"], summary["rounds_completed"]) == (3, 2)
    assert "without TLS" not in out, logs  # neither the coordinator nor a peer serves plaintext

    # A plaintext client is refused; the same check over TLS is answered.
    assert "plaintext UNAVAILABLE" in probe, probe
    assert "tls 1" in probe, probe  # 1: SERVING
    # docker's TLS health check passed: that is what let the peers start.
    assert any(entry["ExitCode"] == 0 for entry in health["Log"]), health

    # Three identical replicas, three certificates: each claimed a different peer-K and
    # joined as index K, from its container's own address.
    claimed = sorted(re.findall(r"holds certificate (peer-\d+)", out))
    assert claimed == ["peer-0", "peer-1", "peer-2"], logs
    members = summary["membership"]
    assert sorted(members) == ["peer-0", "peer-1", "peer-2"], members
    addresses = {m["address"] for m in members.values()}
    assert len(addresses) == 3 and not any(a.startswith("127.") for a in addresses), addresses
    assert summary["bytes"]["p2p"] > 0  # experts went peer to peer, over TLS

    # Keys 0600 and directories 0700, owned by the clone's owner; the CA's key is gone, and
    # the peers' volume holds no key of the coordinator's or the health check's.
    owner = f"{OWNER[0]}:{OWNER[1]}"
    print("\ncompose tls:", probe.replace("\n", "; "), "claims:", claimed)
    print("summary:", {k: summary[k] for k in ("final_accuracy_mean", "bytes")})
    stat_lines, files = modes.split("FILES\n")
    stats = dict(line.split(" ", 1) for line in stat_lines.splitlines())
    keys = {p: s for p, s in stats.items() if p.endswith(".key")}
    assert len(keys) == 5 and all(s == f"600 {owner}" for s in keys.values()), stats
    assert stats["/c"] == stats["/p"] == f"700 {owner}", stats
    assert "ca.key" not in files, files
    assert not any(p.startswith(("/p/coordinator", "/p/healthcheck")) for p in stats), stats
