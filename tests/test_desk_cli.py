"""The researcher's desk: `fedmoe status`, `--config FILE`, the default run directory and the
progress bar of `fedmoe local`.

Runs are real: a coordinator and peers as OS processes on loopback, asked over real gRPC.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedmoe.cli import main, parse_args
from fedmoe.common.auth import TOKEN_METADATA
from fedmoe.common.config import make_config
from fedmoe.common.proto import pb
from fedmoe.coordinator.progress import RunProgress
from fedmoe.coordinator.rounds import RoundBook
from fedmoe.coordinator.service import STATUS_CALLS, CoordinatorService
from fedmoe.coordinator.strategies import make_strategy
from fedmoe.progress import BarProgress, PlainProgress, choose_progress
from fedmoe.run_dir import fresh_run_dir
from fedmoe.status import StatusError, fetch_status
from tests.cluster import FEDMOE, Cluster, free_port

BYTE_KEYS = ("coordinator_sent", "coordinator_received", "p2p_sent", "p2p_received")
TINY = [
    *("--dataset", "synthetic", "--embed-dim", "16", "--expert-hidden", "8", "--experts", "4"),
    *("--sync-every", "1"),
]


def _status(address: str, token_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FEDMOE, "status", address, "--token-file", str(token_file), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


# ---------------------------------------------------------------- fedmoe status


def test_status_shows_the_round_and_the_peers_of_a_live_run(tmp_path: Path) -> None:
    # peer-1 dies right after reporting round 1, so the run stays in round 2 (no quorum of 2
    # until the round deadline, 2 minutes away): a live run whose state does not move.
    cluster = Cluster(tmp_path, 2, [*TINY, "--rounds", "3", "--peer-timeout", "2"])
    cluster.start_coordinator(extra=["--round-timeout", "120"])
    cluster.start_peer(0)
    cluster.start_peer(1, faults="kill_after_round=1")
    try:
        token = cluster.token_file.read_text().strip()
        deadline = time.monotonic() + 180
        s: dict[str, Any] = {}
        while not (s.get("reported_round", 0) >= 1 and s.get("missing") == ["peer-1"]):
            assert time.monotonic() < deadline, f"{s}\n{cluster.logs()}"
            time.sleep(0.2)  # the poll's pace, not a synchronisation: the loop checks the state
            try:
                s = fetch_status(cluster.address, token, timeout=5)
            except StatusError:
                s = {}  # not up yet

        # The command itself, as a person or a script runs it.
        proc = _status(cluster.address, cluster.token_file, "--json")
        assert proc.returncode == 0, proc.stderr
        s = json.loads(proc.stdout)

        run_id = json.loads((cluster.out / "config.json").read_text())["run_id"]
        assert (s["run_id"], s["algorithm"], s["rounds"], s["peers"]) == (run_id, "fedmoe-da", 3, 2)
        assert (s["reported_round"], s["open_round"]) == (1, 2)
        assert not s["finished"] and s["failure"] == ""
        assert (s["alive"], s["alive_count"], s["missing_count"]) == (["peer-0"], 1, 1)
        # Round 1's figures, as metrics.jsonl has them: bytes summed once, the mean accuracy.
        recs = cluster.records()
        assert s["coordinator_bytes"] == sum(
            r["bytes"]["coordinator_sent"] + r["bytes"]["coordinator_received"] for r in recs
        )
        assert s["coordinator_bytes"] > 0
        assert s["last_accuracy"] == pytest.approx(sum(r["accuracy"] for r in recs) / len(recs))
        assert s["mean_round_seconds"] > 0
        assert s["eta_seconds"] == pytest.approx(2 * s["mean_round_seconds"])
        assert s["elapsed_seconds"] >= s["mean_round_seconds"]

        table = _status(cluster.address, cluster.token_file)
        assert table.returncode == 0, table.stderr
        assert "1 reported, 2 open, of 3" in table.stdout
        assert re.search(r"^missing\s+peer-1$", table.stdout, re.M), table.stdout

        wrong = tmp_path / "wrong-token"
        wrong.write_text("w" * 32 + "\n")
        wrong.chmod(0o600)
        refused = _status(cluster.address, wrong)
        assert refused.returncode == 1 and refused.stdout == ""
        assert refused.stderr.strip().splitlines() == [
            f"fedmoe status: the coordinator at {cluster.address} refused the token: "
            "check --token-file (or FEDMOE_TOKEN)"
        ]
    finally:
        cluster.stop()


def test_status_of_nothing_is_one_line_and_exit_1(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t" * 32)
    token.chmod(0o600)
    address = f"127.0.0.1:{free_port()}"
    proc = _status(address, token, "--timeout", "1")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"fedmoe status: could not reach the coordinator at {address} within 1 s "
        "(is the run still going? check the address, the firewall, and --tls)"
    ]
    bad = _status("no-port-here", token)
    assert bad.returncode == 1 and "is not HOST:PORT" in bad.stderr
    assert "Traceback" not in bad.stderr


# ---------------------------------------------------------------- --config, --out, progress


def _run_in_pty(cmd: list[str], cwd: Path, timeout: float) -> tuple[int, str]:
    """Run `cmd` with its stdout on a terminal (a pty); its output, read to the end."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # 120 x 30
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=terminal, stderr=subprocess.DEVNULL)
    os.close(terminal)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(controller)
    return code, b"".join(chunks).decode(errors="replace")


def _per_round(run_dir: Path) -> list[tuple[int, str, float, float, dict[str, int]]]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sorted(
        (r["round"], r["peer"], r["accuracy"], r["global_accuracy"], r["bytes"]) for r in recs
    )


def test_a_runs_config_json_reruns_it(tmp_path: Path) -> None:
    # Run A: every flag from a TOML file, no --out (a fresh runs/<algorithm>-<time> in the
    # working directory), stdout on a terminal (the progress bar).
    # The peer timeout is long so that no heartbeat (counted in the bytes) lands in these short
    # runs at a time-dependent moment: the two runs then carry exactly the same bytes.
    (tmp_path / "a.toml").write_text(
        'algorithm = "fedmoe-da"\npeers = 2\nrounds = 2\nseed = 7\ndataset = "digits"\n'
        "embed-dim = 32\nexpert_hidden = 16\nsync_every = 1\npeer_timeout = 300.0\n"
    )
    code, shown = _run_in_pty([*FEDMOE, "local", "--config", "a.toml"], tmp_path, timeout=300)
    assert code == 0, shown
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and re.fullmatch(r"fedmoe-da-\d{8}-\d{6}", runs[0].name), runs
    a = runs[0]
    lines = [x for x in shown.replace("\r", "\n").splitlines() if x.strip()]
    assert lines[0] == lines[-1] == f"run directory: runs/{a.name}"
    assert re.search(r"rounds: 100%.*2/2 .*acc=", shown), shown  # the bar, done, with accuracy
    cfg = json.loads((a / "config.json").read_text())
    assert (cfg["peers"], cfg["rounds"], cfg["seed"], cfg["embed_dim"]) == (2, 2, 7, 32)

    # Run B: A's config.json as it is, output to a pipe (the plain per-round lines).
    b = tmp_path / "b"
    proc = subprocess.run(
        [*FEDMOE, "local", "--config", str(a / "config.json"), "--out", str(b)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "\r" not in proc.stdout and "rounds:" not in proc.stdout
    assert re.search(r"^\[fedmoe-da\] round 1/2  acc ", proc.stdout, re.M), proc.stdout
    assert re.search(r"^\[fedmoe-da\] round 2/2  acc ", proc.stdout, re.M), proc.stdout

    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sb["run_id"] != sa["run_id"]  # a rerun is a new run
    assert _per_round(b) == _per_round(a)  # same accuracies and bytes, peer by peer, per round
    assert sb["bytes"] == sa["bytes"] and sb["bytes_by_direction"] == sa["bytes_by_direction"]
    assert sb["final_accuracy_mean"] == sa["final_accuracy_mean"]
    assert {k: v for k, v in sb["config"].items() if k != "run_id"} == {
        k: v for k, v in sa["config"].items() if k != "run_id"
    }


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_flags_win_over_the_file_and_the_file_over_the_defaults(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "c.toml",
        'rounds = 3\nexperts = 6\nno-intra-peer = true\nprocs = 2\nout = "o"\ntls = true\n',
    )
    args = parse_args(["local", "--config", str(f), "--rounds", "7"])
    assert args.rounds == 7  # the flag
    assert (args.num_experts, args.intra_peer, args.procs) == (6, False, 2)  # the file
    assert (args.out, args.tls) == (Path("o"), True)
    assert args.peers is None and args.lr is None  # the defaults (make_config fills them in)
    j = _write(tmp_path / "c.json", json.dumps({"run_id": "x", "intra_peer": True, "lr": 1}))
    args = parse_args(["coordinator", "--config", str(j), "--listen", "0.0.0.0:1"])
    assert (args.intra_peer, args.lr, args.listen) == (True, 1.0, "0.0.0.0:1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rounds = 3\nround = 4\n", "unknown key 'round' (did you mean 'rounds'?)"),
        ('rounds = "three"\n', "key 'rounds' must be a whole number (got 'three')"),
        ("rounds = 2.5\n", "key 'rounds' must be a whole number (got 2.5)"),
        ("lr = true\n", "key 'lr' must be a number (got True)"),
        ('algorithm = "sgd"\n', "key 'algorithm' must be one of fedavg, fedmoe-da, local"),
        ("experts = 4\nnum_experts = 4\n", "keys 'experts' and 'num_experts' set the same flag"),
        ('token = "secret"\n', "unknown key 'token'"),
        ("rounds = \n", "is not valid TOML"),
    ],
)
def test_a_bad_config_file_is_refused_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    f = _write(tmp_path / "bad.toml", text)
    with pytest.raises(SystemExit) as e:
        main(["local", "--config", str(f)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_a_bad_config_file_stops_the_command_cleanly(tmp_path: Path) -> None:
    f = _write(tmp_path / "bad.toml", "peers = 2\nepochs = 3\n")
    proc = subprocess.run(
        [*FEDMOE, "coordinator", "--config", str(f)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert f"--config: {f}: unknown key 'epochs'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*/")), "nothing may be started or written"


def test_the_coordinator_still_needs_an_out(tmp_path: Path, capsys: Any) -> None:
    assert main(["coordinator", "--peers", "2"]) == 2
    assert "--out DIR is required" in capsys.readouterr().err


def test_run_directories_of_the_same_second_differ(tmp_path: Path) -> None:
    now = time.mktime((2024, 5, 6, 7, 8, 9, 0, 0, -1))
    first = fresh_run_dir("fedavg", tmp_path / "runs", now)
    second = fresh_run_dir("fedavg", tmp_path / "runs", now)
    assert first.name == "fedavg-20240506-070809"
    assert second.name == "fedavg-20240506-070809-2"
    assert first.is_dir() and second.is_dir()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere() -> None:
    lines = [
        "some note\n",
        "[fedmoe-da] round 1/3  acc 0.4000  global 0.3000  coordinator 1.32 MB  p2p 0.00 MB  5.1 s\n",
        "[fedmoe-da] round 2/3  acc 0.6500  global 0.5000  coordinator 1.32 MB  p2p 8.76 MB  0.3 s\n",
    ]
    plain = io.StringIO()
    shown = choose_progress(3, plain)
    assert isinstance(shown, PlainProgress)
    for line in lines:
        shown.line(line)
    shown.close()
    assert plain.getvalue() == "".join(lines)

    term = _Terminal()
    bar = choose_progress(3, term)
    assert isinstance(bar, BarProgress)
    for line in lines:
        bar.line(line)
    assert bar.bar.n == 2
    bar.close()
    out = term.getvalue()
    assert "2/3" in out and "acc=0.6500" in out and "global_acc=0.5000" in out
    assert all(line.strip() in out for line in lines)  # the lines scroll above the bar


# ---------------------------------------------------------------- the coordinator's side


def test_the_eta_comes_from_the_mean_round_time() -> None:
    p = RunProgress(started=100.0)
    assert p.mean_round_seconds() is None and p.eta_seconds(5) is None
    rec = {"accuracy": 0.5, "global_accuracy": 0.25, "bytes": dict.fromkeys(BYTE_KEYS, 10)}
    p.add([rec, {**rec, "accuracy": 0.7}], now=110.0)  # round 1: start-up included
    assert p.mean_round_seconds() == 10.0 and p.eta_seconds(4) == 40.0
    assert p.last_accuracy == pytest.approx(0.6) and p.last_global_accuracy == 0.25
    # coordinator: sent + received of both peers; p2p: what they sent (each message once)
    assert (p.coordinator_bytes, p.p2p_bytes) == (40, 20)
    p.add([rec], now=112.0)
    p.add([rec], now=114.0)  # from round 2 on: the gaps between rounds, not the start-up
    assert p.mean_round_seconds() == 2.0 and p.eta_seconds(3) == 6.0
    assert p.last_accuracy == 0.5 and p.coordinator_bytes == 80


class _Aborted(Exception):
    pass


class _Context:
    """The little of grpc.ServicerContext that GetStatus uses."""

    def __init__(self, token: str) -> None:
        self.token = token

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return [(TOKEN_METADATA, self.token)]

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise _Aborted(code, message)


def test_status_calls_are_checked_first_and_capped() -> None:
    cfg = make_config(peers=2, rounds=3, dataset="synthetic", embed_dim=8, expert_hidden=4)
    book = RoundBook(cfg, make_strategy(cfg), lambda r, recs: None)
    service = CoordinatorService(book, "s" * 32)
    with pytest.raises(_Aborted) as e:
        service.GetStatus(pb.StatusRequest(), _Context("x" * 32))
    assert e.value.args[0] == grpc.StatusCode.UNAUTHENTICATED

    reply = service.GetStatus(pb.StatusRequest(), _Context("s" * 32))
    assert (reply.rounds, reply.reported_round, reply.open_round, reply.peers) == (3, 0, 1, 2)
    assert list(reply.missing) == ["peer-0", "peer-1"] and not reply.HasField("eta_seconds")

    # STATUS_CALLS calls held inside the book: the next one is refused at once, not queued.
    inside = threading.Semaphore(0)
    release = threading.Event()
    status = book.status

    def held() -> dict[str, Any]:
        inside.release()
        release.wait(60)
        return status()

    book.status = held  # type: ignore[method-assign]
    callers = [
        threading.Thread(target=service.GetStatus, args=(pb.StatusRequest(), _Context("s" * 32)))
        for _ in range(STATUS_CALLS)
    ]
    for t in callers:
        t.start()
    for _ in callers:
        assert inside.acquire(timeout=30)
    try:
        with pytest.raises(_Aborted) as e:
            service.GetStatus(pb.StatusRequest(), _Context("s" * 32))
        assert e.value.args[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        release.set()
        for t in callers:
            t.join(30)
    book.status = status  # type: ignore[method-assign]
    assert service.GetStatus(pb.StatusRequest(), _Context("s" * 32)).peers == 2
