"""MoE-FedAvg (issue #10): embedding and experts averaged slot-wise through the coordinator, the
gate personal. The strategy as pure logic, then whole `fedmoe local` runs (real processes, gRPC
on loopback), inspected through their run directories and the peers' checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedmoe.common.config import make_config, participants, upload_prefixes
from fedmoe.common.model_schema import model_schema
from fedmoe.coordinator.rounds import Refused, RoundBook
from fedmoe.coordinator.strategies import MoEFedAvg, PeerUpdate, make_strategy

FEDMOE = [sys.executable, "-m", "fedmoe.cli"]
PEERS = 3
SAMPLES = [1, 2, 5]  # unequal: a uniform mean gives other values


def small_config(**cfg: Any):  # type: ignore[no-untyped-def]
    return make_config(
        algorithm="moe-fedavg",
        peers=PEERS,
        rounds=3,
        dataset="synthetic",
        embed_dim=4,
        num_experts=3,
        top_k=1,
        expert_hidden=3,
        round_timeout=60,
        peer_timeout=10,
        **cfg,
    )


def uploads(cfg, with_gate: bool = False) -> list[PeerUpdate]:  # type: ignore[no-untyped-def]
    """What each peer uploads: every tensor distinct per peer and per expert slot."""
    rng = np.random.default_rng(7)
    out = []
    for i, n in enumerate(SAMPLES):
        tensors = {
            name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in model_schema(cfg).items()
            if with_gate or name.startswith(upload_prefixes(cfg, 1))
        }
        out.append(PeerUpdate(f"peer-{i}", n, tensors))
    return out


def expected_mean(ups: list[PeerUpdate], name: str) -> np.ndarray:
    total = sum(u.num_samples for u in ups)
    return sum((u.num_samples / total) * u.tensors[name].astype(np.float64) for u in ups)


# ---------------------------------------------------------------- the strategy


def test_embedding_and_each_expert_slot_are_averaged_by_sample_count() -> None:
    cfg = small_config()
    ups = uploads(cfg)
    shared = make_strategy(cfg).aggregate(1, ups).shared
    schema = model_schema(cfg)
    names = {n for n in schema if n.startswith(("embedding.", "experts."))}
    assert set(shared) == names  # every expert slot and the embedding come back, no gate
    for name in names:
        np.testing.assert_allclose(shared[name], expected_mean(ups, name), rtol=1e-5, atol=1e-6)
    # Slot-wise: expert m is the mean of every peer's expert m, not of the other slots.
    assert not np.allclose(shared["experts.0.fc1.weight"], shared["experts.1.fc1.weight"])
    uniform = np.mean([u.tensors["experts.2.fc2.bias"] for u in ups], axis=0)
    assert not np.allclose(shared["experts.2.fc2.bias"], uniform, atol=1e-3)


def test_a_gate_never_reaches_the_aggregate() -> None:
    cfg = small_config()
    for round_ in (1, 2, 3):
        prefixes = upload_prefixes(cfg, round_)
        assert set(prefixes) == {"embedding.", "experts."}
    # Even if one got past the coordinator's checks, the strategy leaves it out.
    shared = MoEFedAvg().aggregate(1, uploads(cfg, with_gate=True)).shared
    assert shared and not any(n.startswith("gate.") for n in shared)


def test_the_coordinator_refuses_a_gate_upload() -> None:
    cfg = small_config()
    book = RoundBook(cfg, make_strategy(cfg), lambda r, recs: None, None)
    member = book.join(0, "h0:1")
    tensors = uploads(cfg, with_gate=True)[0].tensors
    with pytest.raises(Refused, match="gate.proxies"):
        book.submit(member, 1, 10, tensors)
    del tensors["gate.proxies"]
    book.submit(member, 1, 10, tensors)  # the rest is a valid upload


def test_robust_aggregation_applies_to_the_experts() -> None:
    cfg = small_config(aggregation="median")
    ups = uploads(cfg)
    ups[2].tensors["experts.1.fc1.weight"][:] = 1e6  # one dishonest upload, most of the weight
    shared = make_strategy(cfg).aggregate(1, ups).shared
    median = np.median([u.tensors["experts.1.fc1.weight"] for u in ups], axis=0)
    np.testing.assert_allclose(shared["experts.1.fc1.weight"], median, rtol=1e-6)
    assert np.abs(shared["experts.1.fc1.weight"]).max() < 10


# ---------------------------------------------------------------- whole runs

SMALL = ["--dataset", "synthetic", "--seed", "1", "--peer-timeout", "10", "--round-timeout", "60"]


def run_local(out: Path, *flags: str) -> Path:
    proc = subprocess.run(
        [*FEDMOE, "local", *SMALL, *flags, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoints(
    state: Path, peers: Iterable[int]
) -> dict[int, tuple[int, dict[str, torch.Tensor]]]:
    out = {}
    for k in peers:
        saved = torch.load(state / f"peer-{k}.pt", weights_only=True, map_location="cpu")
        out[k] = (saved["round"], saved["model"])
    return out


def group(model: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {n: t for n, t in model.items() if n.startswith(prefix)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("moe-fedavg")
    common = ["--peers", str(PEERS), "--rounds", "2"]
    return {
        "moe-fedavg": run_local(
            tmp / "moe-fedavg",
            *common,
            *("--algorithm", "moe-fedavg", "--state-dir", str(tmp / "state")),
        ),
        "fedmoe-da": run_local(tmp / "fedmoe-da", *common, "--algorithm", "fedmoe-da"),
        "state": tmp / "state",
    }


def test_run_completes_through_the_coordinator_only(runs: dict[str, Path]) -> None:
    s = summary(runs["moe-fedavg"])
    assert s["status"] == "completed" and s["algorithm"] == "moe-fedavg"
    assert (s["peers"], s["rounds"], s["rounds_completed"]) == (PEERS, 2, 2)
    assert s["bytes"]["p2p"] == 0
    assert all(r["bytes"]["p2p_received"] == 0 for r in records(runs["moe-fedavg"]))
    assert all(r["experts_fetched"] == 0 for r in records(runs["moe-fedavg"]))
    assert s["coordinator_view"]["tensor_groups_received"] == ["embedding", "experts"]
    # The experts travel through the coordinator: more than FedMoE-DA's embedding (and gate).
    da = summary(runs["fedmoe-da"])
    assert s["bytes"]["coordinator"] > 2 * da["bytes"]["coordinator"]


def test_peers_share_the_experts_and_embedding_but_keep_their_gates(
    runs: dict[str, Path],
) -> None:
    saved = checkpoints(runs["state"], range(PEERS))
    assert {r for r, _ in saved.values()} == {2}
    models = [m for _, m in saved.values()]
    for prefix in ("embedding.", "experts."):
        first = group(models[0], prefix)
        assert first
        for other in models[1:]:
            for name, tensor in first.items():
                assert torch.equal(other[name], tensor), name  # the one aggregate, bit for bit
    # Slot-wise, not one expert copied everywhere: the slots still differ.
    assert not torch.equal(models[0]["experts.0.fc1.weight"], models[0]["experts.1.fc1.weight"])
    gates = [group(m, "gate.") for m in models]
    assert gates[0]
    for other in gates[1:]:
        assert any(not torch.equal(gates[0][n], other[n]) for n in gates[0])


def test_report_lists_the_run(runs: dict[str, Path]) -> None:
    proc = subprocess.run(
        [*FEDMOE, "report", str(runs["moe-fedavg"])], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert f"moe-fedavg: {PEERS} peers, 2 rounds" in proc.stdout


def test_partial_participation(tmp_path: Path) -> None:
    """4 peers, 2 sampled per round: each round holds exactly the sampled peers, a peer back
    after a round without it catches up on the aggregate, and the last round's peers end on the
    same experts."""
    run = run_local(
        tmp_path / "run",
        *("--peers", "4", "--rounds", "3", "--clients-per-round", "2"),
        *("--algorithm", "moe-fedavg", "--state-dir", str(tmp_path / "state")),
    )
    s = summary(run)
    assert s["status"] == "completed" and s["dropped_peers"] == [] and s["bytes"]["p2p"] == 0
    cfg = make_config(peers=4, clients_per_round=2, seed=1, dataset="synthetic")
    by_round: dict[int, set[str]] = {}
    for r in records(run):
        by_round.setdefault(r["round"], set()).add(r["peer"])
    assert by_round == {r: {f"peer-{k}" for k in participants(cfg, r)} for r in (1, 2, 3)}
    last = participants(cfg, 3)
    # A peer sampled for round 3 but not round 2 loads round 2's aggregate before it trains.
    missed = [k for k in last if k not in participants(cfg, 2)]
    assert missed  # seed 1 samples [0, 2], [2, 3], [0, 2]: peer-0 has to catch up
    for k in missed:
        log = (run / f"peer-{k}.log").read_text()
        assert "caught up to the aggregate of round 2" in log
    saved = checkpoints(tmp_path / "state", last)
    assert all(saved[k][0] == 3 for k in last)
    a, b = (saved[k][1] for k in last)
    for name, tensor in group(a, "experts.").items():
        assert torch.equal(b[name], tensor), name
