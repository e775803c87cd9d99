"""`docker stack deploy -c docker-stack.yml` on a one-node swarm: a coordinator and 3 peer
replicas on an overlay network, the join token as a docker secret, the results on a bind mount
read afterwards. The swarm is created (and left at the end) only if this docker is in none;
everything the stack made is removed and waited for.

Needs docker and the image `make image` builds (fedmoe:latest, or FEDMOE_IMAGE)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STACK = "fedmoe-swarm-test"
SECRET = "fedmoe-swarm-test-token"
IMAGE = os.environ.get("FEDMOE_IMAGE", "fedmoe:latest")
IS_ROOT = os.getuid() == 0
# Who writes the results: a uid:gid with no account here when the test may chown (as root).
OWNER = (4242, 4343) if IS_ROOT else (os.getuid(), os.getgid())
PEERS, ROUNDS = 3, 2


def docker(*args: str, check: bool = True, stdin: str | None = None) -> str:
    proc = subprocess.run(
        ["docker", *args], input=stdin, capture_output=True, text=True, timeout=120
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def wait_for(what: str, done: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(0.5)  # polling interval, not synchronisation


def stack_objects(kind: str) -> list[str]:
    """IDs of this stack's services / networks / containers (kind: service, network, container)."""
    flags = ["-a"] if kind == "container" else []
    label = f"label=com.docker.stack.namespace={STACK}"
    return docker(kind, "ls", *flags, "-q", "--filter", label).split()


def task_states(service: str) -> list[str]:
    """`Complete 3 seconds ago|` ... one line per task of the stack's service, with its error."""
    out = docker(
        "service",
        "ps",
        f"{STACK}_{service}",
        "--no-trunc",
        "--format",
        "{{.CurrentState}}|{{.Error}}",
    )
    return [line for line in out.splitlines() if line]


def service_logs(service: str) -> str:
    proc = subprocess.run(
        ["docker", "service", "logs", "--raw", f"{STACK}_{service}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return (proc.stdout + proc.stderr)[-3000:]


def all_complete(service: str, count: int) -> bool:
    states = task_states(service)
    failed = [s for s in states if s.startswith(("Failed", "Rejected"))]
    if failed:
        raise AssertionError(f"{service} task failed: {failed}\n{service_logs(service)}")
    return len(states) == count and all(s.startswith("Complete") for s in states)


@pytest.fixture
def swarm() -> Iterator[None]:
    """This docker as a swarm manager: a one-node swarm made here, and left at the end, when it
    is in none; an existing swarm is used as it is."""
    state = docker("info", "--format", "{{.Swarm.LocalNodeState}}").strip()
    created = state == "inactive"
    if created:
        docker("swarm", "init", "--advertise-addr", "127.0.0.1")
    elif state != "active":
        pytest.skip(f"docker's swarm state is {state!r}")
    try:
        yield
    finally:
        if created:
            docker("swarm", "leave", "--force")
            # made by the swarm for its tasks' outside traffic; leaving keeps it
            docker("network", "rm", "docker_gwbridge", check=False)


def remove_stack() -> None:
    docker("stack", "rm", STACK, check=False)
    # Services go at once; their containers and the overlay network a few seconds later.
    for kind in ("service", "container", "network"):
        wait_for(f"the stack's {kind}s to go", lambda k=kind: stack_objects(k) == [], 120)
    docker("secret", "rm", SECRET, check=False)


def owners(root: Path) -> dict[str, tuple[int, int]]:
    paths = [root, *root.rglob("*")]
    return {str(p.relative_to(root.parent)): (p.lstat().st_uid, p.lstat().st_gid) for p in paths}


def test_stack_deploy_trains_to_the_end(swarm: None, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()  # swarm never creates a bind source; the user makes this folder
    if IS_ROOT:
        os.chown(runs, *OWNER)
    remove_stack()  # leftovers of an interrupted earlier run
    docker("secret", "create", SECRET, "-", stdin=secrets.token_urlsafe(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMOE_")}
    env.update(
        FEDMOE_IMAGE=IMAGE,
        FEDMOE_PEERS=str(PEERS),
        FEDMOE_ROUNDS=str(ROUNDS),
        FEDMOE_SWARM_RUNS=str(runs),
        FEDMOE_UID=str(OWNER[0]),
        FEDMOE_GID=str(OWNER[1]),
        FEDMOE_TOKEN_SECRET=SECRET,
    )
    try:
        deploy = subprocess.run(
            ["docker", "stack", "deploy", "--resolve-image", "never"]
            + ["-c", str(REPO / "docker-stack.yml"), STACK],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert deploy.returncode == 0, deploy.stderr
        subnet = docker(
            "network", "inspect", f"{STACK}_fedmoe", "--format", "{{(index .IPAM.Config 0).Subnet}}"
        ).strip()
        # No start order in swarm: the peers wait (Join with wait_for_ready) for the coordinator.
        try:  # ~30 s here (2 cores); a stuck join would otherwise wait for --timeout
            wait_for(
                "the coordinator's task to complete", lambda: all_complete("coordinator", 1), 300
            )
            wait_for("the peers' tasks to complete", lambda: all_complete("peer", PEERS), 120)
        except AssertionError as e:
            raise AssertionError(
                f"{e}\n{service_logs('coordinator')}\n{service_logs('peer')}"
            ) from e
        summary = json.loads((runs / "summary.json").read_text())
        records = [json.loads(x) for x in (runs / "metrics.jsonl").read_text().splitlines()]
        owned = owners(runs)
    finally:
        remove_stack()
    assert docker("secret", "ls", "-q", "--filter", f"name={SECRET}").split() == []

    assert summary["status"] == "completed"
    assert (summary["peers"], summary["rounds_completed"]) == (PEERS, ROUNDS)
    assert len(records) == PEERS * ROUNDS
    # One replicated service, three members: indices assigned at join; each replica advertised
    # its own address on the overlay network (--advertise auto:50052).
    assert sorted({r["peer"] for r in records}) == [f"peer-{k}" for k in range(PEERS)]
    addresses = {m["address"].rsplit(":", 1)[0] for m in summary["membership"].values()}
    assert len(addresses) == PEERS, addresses
    assert all(ip_address(a) in ip_network(subnet) for a in addresses), (addresses, subnet)
    assert summary["bytes"]["p2p"] > 0  # experts went task to task over the overlay
    # The results belong to FEDMOE_UID:FEDMOE_GID, and the token (a secret) is not among them.
    assert {p: o for p, o in owned.items() if o != OWNER} == {}
    assert not (runs / "join-token").exists()
    print("\nswarm summary:", json.dumps({k: summary[k] for k in ("peers", "rounds", "bytes")}))
