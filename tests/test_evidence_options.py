"""--val-fraction, --init and --finetune-epochs (issue #10, docs/EVIDENCE_OPTIONS.md)."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmoe.common.config import ConfigError, make_config
from fedmoe.common.data import DataError, load_peer_data, val_split_indices
from fedmoe.common.proto import pb
from fedmoe.coordinator.results import RunResults
from fedmoe.coordinator.service import _check_report
from fedmoe.peer.trainer import LocalTrainer, build_model

SMALL = {"embed_dim": 16, "expert_hidden": 16, "num_experts": 4}


def _rows(a: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in a}


# --------------------------------------------------------------------------- validation split


def test_val_split_is_disjoint_complete_sized_and_seeded() -> None:
    train, val = val_split_indices(200, 0.1, seed=3, index=1)
    assert len(val) == 20 and len(train) == 180
    assert not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(200))
    again = val_split_indices(200, 0.1, seed=3, index=1)
    assert np.array_equal(again[1], val)  # every process and rerun draws the same rows
    assert not np.array_equal(val_split_indices(200, 0.1, seed=3, index=2)[1], val)
    assert not np.array_equal(val_split_indices(200, 0.1, seed=4, index=1)[1], val)


def test_val_split_edges() -> None:
    train, val = val_split_indices(50, 0.0, seed=0, index=0)
    assert len(val) == 0 and list(train) == list(range(50))
    assert len(val_split_indices(3, 0.01, seed=0, index=0)[1]) == 1  # at least one row
    assert len(val_split_indices(2, 0.5, seed=0, index=0)[0]) == 1  # never all of them
    with pytest.raises(DataError, match="too few"):
        val_split_indices(1, 0.1, seed=0, index=0)
    with pytest.raises(DataError, match=r"\[0, 0.5\]"):
        val_split_indices(10, 0.6, seed=0, index=0)


def test_peer_data_holds_the_val_rows_out_of_training() -> None:
    whole = load_peer_data("synthetic", None, 3, 1, alpha=0.5, seed=5)
    data = load_peer_data("synthetic", None, 3, 1, alpha=0.5, seed=5, val_fraction=0.2)
    assert whole.val is None
    assert data.val is not None
    n = len(whole.train)
    assert len(data.val) == round(0.2 * n) and len(data.train) == n - len(data.val)
    train, val = _rows(data.train.x), _rows(data.val.x)
    assert not train & val and train | val == _rows(whole.train.x)
    assert data.class_counts.sum() == len(data.train)  # the histogram of the trained rows
    # The personal test split does not depend on the validation split.
    assert np.array_equal(data.local_test.y, whole.local_test.y)

    cfg = make_config(dataset="synthetic", peers=3, seed=5, val_fraction=0.2, **SMALL)
    trainer = LocalTrainer(build_model(cfg, data, 1), data, cfg, "cpu", 1)
    assert trainer.num_samples == len(data.train) < n  # what the report and the upload weigh
    assert not _rows(trainer.train_x.numpy()) & val  # the val rows are never trained on


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"val_fraction": 0.6}, "--val-fraction must be in [0, 0.5]"),
        ({"val_fraction": -0.1}, "--val-fraction must be in [0, 0.5]"),
        ({"init": "random"}, "--init must be one of shared, per-peer"),
        ({"finetune_epochs": 2}, "--finetune-epochs is for --algorithm fedavg only"),
        ({"finetune_epochs": 2, "algorithm": "local"}, "--finetune-epochs is for --algorithm"),
        ({"finetune_epochs": 101, "algorithm": "fedavg"}, "--finetune-epochs must be in [0, 100]"),
    ],
)
def test_bad_values_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        make_config(**overrides)
    assert message in str(e.value)


def test_defaults() -> None:
    cfg = make_config()
    assert (cfg.val_fraction, cfg.init, cfg.finetune_epochs) == (0.1, "per-peer", 0)
    assert make_config(algorithm="fedavg", finetune_epochs=3).finetune_epochs == 3


def test_coordinator_checks_val_accuracy() -> None:
    cfg = make_config()
    report = pb.MetricsReport(peer_id="peer-0", round=1, accuracy=0.5, global_accuracy=0.5)
    assert _check_report(report, cfg) is None  # absent: fine
    report.val_accuracy = 0.75
    assert _check_report(report, cfg) is None
    for bad in (1.5, -0.1, math.nan):
        report.val_accuracy = bad
        assert "val_accuracy must be a number in [0, 1]" in str(_check_report(report, cfg))
    report.val_accuracy = 0.5
    assert "no validation split" in str(_check_report(report, make_config(val_fraction=0)))


def test_summary_val_mean_is_none_without_a_split(tmp_path: Path) -> None:
    cfg = make_config(rounds=1, val_fraction=0)
    results = RunResults(tmp_path, cfg, progress=io.StringIO())
    nothing = {"coordinator_sent": 0, "coordinator_received": 0, "p2p_sent": 0, "p2p_received": 0}
    rec = {"round": 1, "peer": "peer-0", "accuracy": 0.5, "global_accuracy": 0.4, "seconds": 1}
    results.write_round(1, [{**rec, "val_accuracy": None, "bytes": nothing}])
    assert results.summary({})["final_val_accuracy_mean"] is None
    results.records[0]["val_accuracy"] = 0.25
    assert results.summary({})["final_val_accuracy_mean"] == 0.25


# --------------------------------------------------------------------------- --init


def _experts(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t for n, t in model.state_dict().items() if n.startswith(("experts.", "gate."))}


def _embedding(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t for n, t in model.state_dict().items() if n.startswith("embedding.")}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("init", ["shared", "per-peer"])
def test_init(init: str) -> None:
    cfg = make_config(dataset="synthetic", peers=2, init=init, **SMALL)
    data = [load_peer_data("synthetic", None, 2, k, alpha=0.5, seed=0) for k in range(2)]
    first, second = (build_model(cfg, data[k], k) for k in range(2))
    assert _same(_embedding(first), _embedding(second))  # averaged: always the same start
    assert _same(_experts(first), _experts(second)) == (init == "shared")
    for name in ("gate.proxies", "experts.0.fc1.weight"):
        assert torch.equal(first.state_dict()[name], second.state_dict()[name]) == (
            init == "shared"
        )
    # Reproducible: the same peer gets the same model again.
    assert _same(first.state_dict(), build_model(cfg, data[0], 0).state_dict())


# --------------------------------------------------------------------------- --finetune-epochs


def _two_rounds(finetune: int) -> tuple[LocalTrainer, list]:
    cfg = make_config(dataset="synthetic", algorithm="fedavg", finetune_epochs=finetune, **SMALL)
    data = load_peer_data("synthetic", None, 4, 2, alpha=0.5, seed=0, val_fraction=0.1)
    trainer = LocalTrainer(build_model(cfg, data, 2), data, cfg, "cpu", 2)
    scores, losses = [], []
    for round_ in (1, 2):
        losses.append(trainer.train_round(round_))
        scores.append(trainer.evaluate_round(round_))
    return trainer, [scores, losses]


def test_finetuning_changes_the_scores_but_not_the_model() -> None:
    plain, (plain_scores, plain_losses) = _two_rounds(0)
    tuned, (tuned_scores, tuned_losses) = _two_rounds(2)
    # What is trained and uploaded is the same, bit for bit: the fine-tuned copy is dropped.
    assert plain_losses == tuned_losses
    assert _same(plain.model.state_dict(), tuned.model.state_dict())
    # What is evaluated is not.
    assert [s.accuracy for s in plain_scores] != [s.accuracy for s in tuned_scores]
    assert [s.global_accuracy for s in plain_scores] != [s.global_accuracy for s in tuned_scores]
    assert all(s.val_accuracy is not None for s in plain_scores + tuned_scores)
    # Without fine-tuning the scores are the model's own.
    assert plain_scores[-1].accuracy == plain.evaluate(plain.data.local_test)


# --------------------------------------------------------------------------- a whole run


def _local_run(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["--peers", "2", "--rounds", "2", "--dataset", "synthetic", "--seed", "3"]
    args += ["--embed-dim", "32", "--expert-hidden", "32", "--experts", "4", "--out", str(out)]
    return subprocess.run(
        [sys.executable, "-m", "fedmoe.cli", "local", *args, *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _records(run_dir: Path) -> dict[tuple[int, str], dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {(r["round"], r["peer"]): r for r in map(json.loads, lines)}


def test_local_run_reports_val_accuracy_and_finetuning(tmp_path: Path) -> None:
    plain, tuned = tmp_path / "plain", tmp_path / "tuned"
    for out, extra in ((plain, ()), (tuned, ("--finetune-epochs", "2"))):
        proc = _local_run(out, "--algorithm", "fedavg", "--val-fraction", "0.2", *extra)
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    a, b = _records(plain), _records(tuned)
    assert sorted(a) == sorted(b) == [(r, f"peer-{k}") for r in (1, 2) for k in range(2)]
    for rec in [*a.values(), *b.values()]:
        assert 0.0 <= rec["val_accuracy"] <= 1.0
    for run_dir in (plain, tuned):
        summary = json.loads((run_dir / "summary.json").read_text())
        assert 0.0 <= summary["final_val_accuracy_mean"] <= 1.0
        assert summary["config"]["val_fraction"] == 0.2
    # Fine-tuning leaves what is trained and uploaded alone: the same training losses (round 2
    # starts from the round-1 aggregate) on as many rows ...
    assert [a[k]["loss"] for k in sorted(a)] == [b[k]["loss"] for k in sorted(b)]
    assert [a[k]["num_samples"] for k in sorted(a)] == [b[k]["num_samples"] for k in sorted(b)]
    # ... and changes what is evaluated.
    assert [a[k]["global_accuracy"] for k in sorted(a)] != [
        b[k]["global_accuracy"] for k in sorted(b)
    ]
    report = subprocess.run(
        [sys.executable, "-m", "fedmoe.cli", "report", str(tuned)], capture_output=True, text=True
    )
    assert report.returncode == 0, report.stderr
    assert report.stdout.splitlines()[0].split()[:5] == ["round", "peers", "acc", "global", "val"]
    assert "n/a" not in report.stdout.splitlines()[2]


def test_local_refuses_finetuning_for_fedmoe_da(tmp_path: Path) -> None:
    proc = _local_run(tmp_path, "--finetune-epochs", "1")
    assert proc.returncode != 0
    assert "--finetune-epochs is for --algorithm fedavg only" in proc.stderr + proc.stdout
