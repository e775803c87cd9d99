"""End to end with real processes: `fedmoe local` starts a coordinator and 3 peers as separate OS
processes that talk gRPC over loopback; the run directories are then checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ALGORITHMS = ("fedmoe-da", "fedavg", "local")
FEDMOE = [sys.executable, "-m", "fedmoe.cli"]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDMOE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for algorithm in ALGORITHMS:
        run_dir = tmp_path_factory.mktemp(algorithm)
        proc = run_cli(
            "local",
            "--peers",
            "3",
            "--rounds",
            "2",
            "--algorithm",
            algorithm,
            "--dataset",
            "synthetic",
            "--seed",
            "1",
            "--out",
            str(run_dir),
        )
        assert proc.returncode == 0, f"{algorithm} failed:\n{proc.stdout}\n{proc.stderr}"
        # Progress is visible: one line per round with accuracy and bytes.
        assert f"[{algorithm}] round 2/2  acc" in proc.stdout
        out[algorithm] = run_dir
    return out


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_run_directory_is_complete(runs: dict[str, Path], algorithm: str) -> None:
    s = summary(runs[algorithm])
    assert s["status"] == "completed" and s["algorithm"] == algorithm
    assert (s["peers"], s["rounds"], s["rounds_completed"]) == (3, 2, 2)
    assert 0.0 <= s["final_accuracy_mean"] <= 1.0 and 0.0 <= s["final_global_accuracy_mean"] <= 1.0
    assert s["final_accuracy_mean"] > 0.2  # well above chance (0.1) on the synthetic task
    recs = records(runs[algorithm])
    assert sorted((r["round"], r["peer"]) for r in recs) == [
        (r, f"peer-{k}") for r in (1, 2) for k in range(3)
    ]
    for r in recs:
        assert set(r["bytes"]) == {
            "coordinator_sent",
            "coordinator_received",
            "p2p_sent",
            "p2p_received",
        }
        assert r["seconds"] > 0 and r["loss"] > 0
    totals = {
        "coordinator": sum(
            r["bytes"]["coordinator_sent"] + r["bytes"]["coordinator_received"] for r in recs
        ),
        "p2p": sum(r["bytes"]["p2p_sent"] for r in recs),  # each message once
    }
    assert s["bytes"] == totals


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_both_ends_count_the_same_coordinator_bytes(runs: dict[str, Path], algorithm: str) -> None:
    recs = records(runs[algorithm])
    view = summary(runs[algorithm])["coordinator_view"]
    assert view["bytes_received"] == sum(r["bytes"]["coordinator_sent"] for r in recs)
    assert view["bytes_sent"] == sum(r["bytes"]["coordinator_received"] for r in recs)


def test_fedmoe_da_fetches_experts_peer_to_peer(runs: dict[str, Path]) -> None:
    s = summary(runs["fedmoe-da"])
    assert s["bytes"]["p2p"] > 0
    assert "experts" not in s["coordinator_view"]["tensor_groups_received"]
    assert s["coordinator_view"]["tensor_groups_received"] == ["embedding", "gate"]
    recs = records(runs["fedmoe-da"])
    # Default I = 2: experts are aggregated (and fetched) on even rounds only.
    assert all(r["experts_fetched"] > 0 for r in recs if r["round"] == 2)
    assert all(r["experts_fetched"] == 0 for r in recs if r["round"] == 1)
    round1 = [r["bytes"]["p2p_received"] for r in recs if r["round"] == 1]
    assert round1 == [0, 0, 0]
    # Every byte one peer sent to another was received by one: the sides agree.
    assert sum(r["bytes"]["p2p_sent"] for r in recs) == sum(
        r["bytes"]["p2p_received"] for r in recs
    )
    assert s["embedding_version"] == 2


def test_fedmoe_da_uses_less_coordinator_traffic_than_fedavg(runs: dict[str, Path]) -> None:
    da, avg = summary(runs["fedmoe-da"]), summary(runs["fedavg"])
    assert da["bytes"]["coordinator"] < avg["bytes"]["coordinator"]
    assert avg["bytes"]["p2p"] == 0
    assert "experts" in avg["coordinator_view"]["tensor_groups_received"]


def test_fedavg_peers_share_one_model(runs: dict[str, Path]) -> None:
    final = [r for r in records(runs["fedavg"]) if r["round"] == 2]
    assert len({r["global_accuracy"] for r in final}) == 1


def test_local_never_exchanges_model_data(runs: dict[str, Path]) -> None:
    s = summary(runs["local"])
    assert s["bytes"]["p2p"] == 0
    assert s["coordinator_view"]["tensor_groups_received"] == []
    # Only the join and the metrics reports: well under a kilobyte per peer and round.
    assert s["bytes"]["coordinator"] < 3 * 2 * 1000


def test_report_prints_the_round_table(runs: dict[str, Path]) -> None:
    proc = run_cli("report", str(runs["fedmoe-da"]))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["round", "peers", "acc", "global"]
    assert lines[2].split()[:2] == ["1", "3"] and lines[3].split()[:2] == ["2", "3"]
    assert "fedmoe-da: 3 peers, 2 rounds" in proc.stdout


def test_bad_configuration_is_refused_before_starting(tmp_path: Path) -> None:
    proc = run_cli("local", "--peers", "2", "--top-k", "9", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "--top-k must be between 1 and --experts" in proc.stderr


def test_peer_asked_for_a_missing_gpu_fails_at_start() -> None:
    proc = run_cli("peer", "--coordinator", "127.0.0.1:1", "--index", "0", "--device", "cuda:7")
    assert proc.returncode != 0
    assert "cuda:7" in proc.stderr and (
        "no CUDA GPU" in proc.stderr or "GPU(s) exist" in proc.stderr
    )


def test_local_pins_peers_to_gpus_round_robin_and_fails_clearly_without_them(
    tmp_path: Path,
) -> None:
    # Two GPU numbers past the machine's last GPU (0 and 1 where there is none): both peers
    # stop at start, with the reason, and so does the run.
    import torch

    n = torch.cuda.device_count()
    proc = run_cli(
        "local",
        "--peers",
        "2",
        "--rounds",
        "1",
        "--dataset",
        "synthetic",
        "--gpus",
        f"{n},{n + 1}",
        "--out",
        str(tmp_path),
    )
    assert proc.returncode == 1
    assert f"peer 0 on cuda:{n}" in proc.stdout and f"peer 1 on cuda:{n + 1}" in proc.stdout
    reason = "no CUDA GPU is available" if n == 0 else f"only {n} GPU(s) exist"
    assert "failed" in proc.stderr and reason in proc.stderr
