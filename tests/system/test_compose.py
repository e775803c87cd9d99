"""`docker compose up` as a newcomer types it, with a coordinator and 3 peers, each in its own
container, from the image built offline by `make image`; results are read from the
bind-mounted ./runs/compose of a fresh copy of the clone. The peers are replicas of one `peer`
service (`--scale peer=3`): the coordinator assigns their indices at join.

"Fresh": the copy holds docker-compose.yml only (no runs/, no data/), no FEDMOE_* variable is
set but the run size and a free host port for the metrics, and the copy belongs to a uid that
is not the one running docker (when the test runs as root), as a user's clone does."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT = "fedmoe-compose-test"
IMAGE = "fedmoe:latest"
IS_ROOT = os.getuid() == 0
# Whose clone it is: a uid:gid with no account here, to show nothing relies on one, when the
# test may chown; otherwise the test's own user (not root either way unless run as root).
OWNER = (4242, 4343) if IS_ROOT else (os.getuid(), os.getgid())


def compose_cmd() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return ["docker", "compose"]


def labelled(kind: str) -> list[str]:
    """IDs of this test project's containers / volumes / networks (kind: ps -a, volume ls...)."""
    out = subprocess.run(
        ["docker", *kind.split(), "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fresh_clone(tmp_path: Path) -> Path:
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy(REPO / "docker-compose.yml", clone / "docker-compose.yml")
    if IS_ROOT:
        for p in (clone, clone / "docker-compose.yml"):
            os.chown(p, *OWNER)
    return clone


def newcomer_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDMOE_", "COMPOSE_"))}
    return {**env, "COMPOSE_PROJECT_NAME": PROJECT, **extra}


def owners(root: Path) -> dict[str, tuple[int, int]]:
    paths = [root, *root.rglob("*")]
    return {str(p.relative_to(root.parent)): (p.lstat().st_uid, p.lstat().st_gid) for p in paths}


# (variables, extra `up` arguments, peers, rounds): the plain command exactly as a newcomer
# types it, with the defaults (4 peers, 20 rounds); and N = 6 replicas from one command line.
CASES = {
    "plain": ({}, [], 4, 20),
    "scale-6": ({"FEDMOE_PEERS": "6", "FEDMOE_ROUNDS": "2"}, ["--scale", "peer=6"], 6, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compose_up_from_a_fresh_clone_trains_to_the_end(tmp_path: Path, case: str) -> None:
    variables, up_args, n, rounds = CASES[case]
    clone = fresh_clone(tmp_path)
    run_dir = clone / "runs" / "compose"
    env = newcomer_env(**variables)
    if variables:  # the plain case keeps the default metrics port too
        env["FEDMOE_METRICS_PORT"] = str(free_port())
    base = compose_cmd()
    try:
        # Plain `up`, no --exit-code-from: it must end by itself once the run is over.
        proc = subprocess.run(
            [*base, "up", "--no-build", *up_args],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        logs = proc.stdout[-4000:] + proc.stderr[-4000:]
        assert proc.returncode == 0, logs
        exits = subprocess.run(
            ["docker", "inspect", "-f", "{{.Name}} {{.State.ExitCode}}", *labelled("ps -a")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
        exits = [e for e in exits if e]
        assert len(exits) == n + 1 and all(e.endswith(" 0") for e in exits), (exits, logs)
        summary = json.loads((run_dir / "summary.json").read_text())
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        token_mode = stat.S_IMODE((run_dir / "join-token").stat().st_mode)
        owned = owners(clone / "runs")
    finally:
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

    # The results belong to the clone's owner, ./runs included (docker created it, as root).
    assert {p: o for p, o in owned.items() if o != OWNER} == {}
    assert token_mode == 0o600  # the peers read it as the same uid; nobody else can
    assert not (clone / "data").exists()  # digits needs no data folder, and none was made

    assert summary["status"] == "completed"
    assert (summary["peers"], summary["rounds_completed"]) == (n, rounds)
    assert len(records) == n * rounds
    # n replicas of one service, n members: indices 0..n-1 assigned at join, each advertising
    # its own container address (--advertise auto:50052).
    assert sorted({r["peer"] for r in records}) == sorted(f"peer-{k}" for k in range(n))
    addresses = {m["address"] for m in summary["membership"].values()}
    assert len(addresses) == n and all(a.endswith(":50052") for a in addresses), addresses
    assert not any(a.startswith("127.") for a in addresses), addresses
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


def test_peers_follows_fedmoe_peers(tmp_path: Path) -> None:
    """FEDMOE_PEERS sets both the coordinator's --peers and the number of peer replicas."""
    clone = fresh_clone(tmp_path)
    for overlay in ([], ["-f", "docker-compose.yml", "-f", str(REPO / "docker-compose.gpu.yml")]):
        proc = subprocess.run(
            [*compose_cmd(), *overlay, "config"],
            cwd=clone,
            env=newcomer_env(FEDMOE_PEERS="7"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        config = proc.stdout
        assert "replicas: 7" in config and "\n  peer0:" not in config, config
        assert re.search(r"- --peers\s*\n\s*- ['\"]?7['\"]?\n", config), config
        assert ("cuda:auto" in config) == bool(overlay), config


def entrypoint(
    tmp_path: Path, clone_owner: tuple[int, int], env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    """The image's entrypoint started as root, as compose starts it, with ./runs and the clone
    mounted; `fedmoe certs` stands in for a run: it writes files as whoever fedmoe runs as."""
    clone = tmp_path / "clone"
    clone.mkdir(exist_ok=True)
    os.chown(clone, *clone_owner)
    flags = [x for k, v in env.items() for x in ("-e", f"{k}={v}")]
    return subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "-u", "0:0", *flags]
        + ["-v", f"{tmp_path / 'runs'}:/runs", "-v", f"{clone}:/fedmoe-clone:ro", IMAGE, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(not IS_ROOT, reason="makes files owned by other uids (needs root)")
@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, OWNER), ({"FEDMOE_UID": "4321", "FEDMOE_GID": "4322"}, (4321, 4322))],
    ids=["clone-owner", "override"],
)
def test_entrypoint_hands_the_run_dir_to_the_owner(
    tmp_path: Path, env: dict[str, str], expected: tuple[int, int]
) -> None:
    # A file of an earlier run made under another uid (the old default, 1000) is handed over
    # too, so that the new run can overwrite it.
    stale = tmp_path / "runs" / "compose" / "summary.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    os.chown(stale, 1000, 1000)
    proc = entrypoint(
        tmp_path,
        OWNER,
        {**env, "FEDMOE_RUN_DIR": "/runs/compose"},
        *("certs", "/runs/compose/certs", "--peers", "1"),
    )
    assert proc.returncode == 0, proc.stderr
    owned = owners(tmp_path / "runs")
    assert len(owned) > 4  # runs, compose, the stale file, certs/ and what certs wrote
    assert {p: o for p, o in owned.items() if o != expected} == {}


@pytest.mark.skipif(not IS_ROOT, reason="makes files owned by other uids (needs root)")
def test_entrypoint_root_owned_clone_runs_as_root_without_capabilities(tmp_path: Path) -> None:
    # uid 0 in the container, but no CAP_DAC_OVERRIDE: another user's folder stays closed.
    locked = tmp_path / "runs" / "locked"
    locked.mkdir(parents=True)
    os.chown(locked, 4242, 4242)
    locked.chmod(0o755)
    proc = entrypoint(tmp_path, (0, 0), {}, "certs", "/runs/locked/certs", "--peers", "1")
    assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc.stderr
    assert list(locked.iterdir()) == []
    proc = entrypoint(tmp_path, (0, 0), {}, "certs", "/runs/mine", "--peers", "1")
    assert proc.returncode == 0, proc.stderr
    assert {o for o in owners(tmp_path / "runs" / "mine").values()} == {(0, 0)}


@pytest.mark.skipif(not IS_ROOT, reason="chowns the clone copy (needs root)")
def test_entrypoint_refuses_a_uid_that_is_not_a_number(tmp_path: Path) -> None:
    proc = entrypoint(tmp_path, OWNER, {"FEDMOE_UID": "alice"}, "--help")
    assert proc.returncode == 2
    assert "FEDMOE_UID must be a number" in proc.stderr and "Traceback" not in proc.stderr
