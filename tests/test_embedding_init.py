"""--embedding-init, --freeze-embedding and --embedding-wire-dtype (issue #10 item 7,
docs/EMBEDDING_OPTIONS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedmoe.common.config import (
    ConfigError,
    config_to_argv,
    make_config,
    upload_prefixes,
    wire_dtype,
)
from fedmoe.common.data import load_peer_data
from fedmoe.common.model_schema import model_schema
from fedmoe.common.proto import pb
from fedmoe.coordinator.rounds import Refused, RoundBook
from fedmoe.coordinator.strategies import make_strategy
from fedmoe.peer.embedding_init import MAX_LISTED, EmbeddingInitError, load_embedding
from fedmoe.peer.model import MoEModel
from fedmoe.peer.trainer import LocalTrainer, build_model

SMALL = {"embed_dim": 16, "expert_hidden": 16, "num_experts": 4, "dataset": "synthetic"}


def _data(peers: int = 2, index: int = 0):  # type: ignore[no-untyped-def]
    return load_peer_data("synthetic", None, peers, index, alpha=0.5, seed=5)


def _pretrained(path: Path, seed: int = 42, **overrides: object) -> dict[str, torch.Tensor]:
    """An embedding state_dict that differs from any run seed's own draw, saved to `path`."""
    cfg = make_config(**{**SMALL, "seed": seed, **overrides})  # type: ignore[arg-type]
    state = {n: t.clone() for n, t in build_model(cfg, _data()).embedding.state_dict().items()}
    torch.save(state, path)
    return state


# --------------------------------------------------------------------------- loading


def test_a_matching_file_is_loaded_into_every_peer(tmp_path: Path) -> None:
    file = tmp_path / "emb.pt"
    saved = _pretrained(file)
    plain = build_model(make_config(**SMALL), _data())
    cfg = make_config(**SMALL, embedding_init=str(file))
    for index in (0, 1):
        model = build_model(cfg, _data(index=index), index)
        for name, tensor in model.embedding.state_dict().items():
            assert torch.equal(tensor, saved[name]), name
            assert not torch.equal(tensor, plain.embedding.state_dict()[name])  # not the seed's
    # Only the embedding comes from the file: the rest is the seed's draw as without it.
    assert torch.equal(
        model.gate.proxies, build_model(make_config(**SMALL), _data(), 1).gate.proxies
    )


def test_a_whole_models_state_dict_is_accepted(tmp_path: Path) -> None:
    other = build_model(make_config(**SMALL, seed=9), _data())
    torch.save(other.state_dict(), tmp_path / "model.pt")
    model = build_model(make_config(**SMALL), _data())
    load_embedding(model.embedding, str(tmp_path / "model.pt"))
    assert torch.equal(model.embedding.state_dict()["0.weight"], other.embedding[0].weight)


def test_a_mismatching_file_is_refused_with_the_mismatches(tmp_path: Path) -> None:
    file = tmp_path / "wide.pt"
    _pretrained(file, embed_dim=24)  # another embedding size: every weight has another shape
    cfg = make_config(**SMALL, embedding_init=str(file))
    with pytest.raises(EmbeddingInitError, match="does not fit") as e:
        build_model(cfg, _data())
    assert "'0.weight' has shape [24," in str(e.value) and str(file) in str(e.value)

    state = torch.load(file, weights_only=True)
    torch.save({"0.weight": state["0.weight"]}, file)
    with pytest.raises(EmbeddingInitError, match="missing '0.bias'"):
        build_model(cfg, _data())


def test_the_error_lists_a_bounded_number_of_mismatches(tmp_path: Path) -> None:
    file = tmp_path / "junk.pt"
    torch.save({f"layer{k}." + "x" * 500: torch.zeros(1) for k in range(1000)}, file)
    with pytest.raises(EmbeddingInitError) as e:
        build_model(make_config(**SMALL, embedding_init=str(file)), _data())
    message = str(e.value)
    assert "more)" in message and message.count("unexpected") <= MAX_LISTED
    assert len(message) < 1000


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("nan", "NaN or infinite"),
        ("list", "not a state_dict"),
        ("object", "cannot load it as a torch state_dict"),
        ("string", "not named tensors"),
    ],
)
def test_bad_contents_are_refused(tmp_path: Path, content: str, message: str) -> None:
    file = tmp_path / "bad.pt"
    state = _pretrained(file)
    if content == "nan":
        state["0.bias"][3] = float("nan")
        torch.save(state, file)
    elif content == "list":
        torch.save(list(state.values()), file)
    elif content == "object":  # a pickled object weights_only refuses to build
        torch.save({"0.weight": nn.Linear(2, 2)}, file)
    else:
        torch.save({**state, "note": "hello"}, file)
    with pytest.raises(EmbeddingInitError, match=message):
        build_model(make_config(**SMALL, embedding_init=str(file)), _data())


def test_an_unreadable_file_names_the_process_and_says_every_peer_needs_it(
    tmp_path: Path,
) -> None:
    cfg = make_config(**SMALL, embedding_init=str(tmp_path / "absent.pt"))
    with pytest.raises(EmbeddingInitError) as e:
        build_model(cfg, _data())
    text = str(e.value)
    assert "no such file" in text and "on host" in text and "every peer" in text
    with pytest.raises(EmbeddingInitError, match="not supported"):
        load_embedding(nn.Linear(2, 2), str(tmp_path / "w.safetensors"))


def test_launcher_refuses_a_bad_file_before_starting_anything(tmp_path: Path) -> None:
    file = tmp_path / "wide.pt"
    _pretrained(file, embed_dim=24)
    proc = subprocess.run(
        [sys.executable, "-m", "fedmoe.cli", "local", "--peers", "2", "--rounds", "1"]
        + ["--dataset", "synthetic", "--embed-dim", "16", "--embedding-init", str(file)]
        + ["--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "fedmoe local: --embedding-init" in proc.stderr and "does not fit" in proc.stderr
    assert not (tmp_path / "run" / "coordinator.log").exists()


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"freeze_embedding": True}, "--freeze-embedding needs --embedding-init PATH"),
        (
            {
                "freeze_embedding": True,
                "embedding_init": "e.pt",
                "embedding_wire_dtype": "bfloat16",
            },
            "--embedding-wire-dtype has nothing to send with --freeze-embedding",
        ),
        (
            {"embedding_wire_dtype": "float16"},
            "--embedding-wire-dtype must be one of bfloat16, float32",
        ),
        ({"embedding_init": "a\0b"}, "--embedding-init must be a path"),
        ({"embedding_init": 3}, "--embedding-init is a string"),
    ],
)
def test_bad_values_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        make_config(**overrides)


def test_options_travel_in_the_run_config() -> None:
    cfg = make_config(embedding_init="/x/e.pt", freeze_embedding=True)
    argv = config_to_argv(cfg)
    assert argv[argv.index("--embedding-init") + 1] == "/x/e.pt" and "--freeze-embedding" in argv
    assert make_config().embedding_wire_dtype == pb.FLOAT32
    again = pb.RunConfig.FromString(cfg.SerializeToString())
    assert again.embedding_init == "/x/e.pt" and again.freeze_embedding


def test_a_frozen_embedding_is_uploaded_by_no_algorithm() -> None:
    def prefixes(algorithm: str, round_: int) -> tuple[str, ...]:
        cfg = make_config(
            algorithm=algorithm, embedding_init="e.pt", freeze_embedding=True, sync_every=2
        )
        return upload_prefixes(cfg, round_)

    # fedavg still averages everything that trains: gate and experts.
    assert prefixes("fedavg", 1) == ("gate.", "experts.")
    assert prefixes("moe-fedavg", 1) == ("experts.",)
    assert prefixes("fedmoe-da", 1) == () and prefixes("fedmoe-da", 2) == ("gate.",)
    assert prefixes("local", 1) == ()
    trainable = make_config(embedding_wire_dtype="bfloat16")
    assert upload_prefixes(trainable, 1) == ("embedding.",)
    assert wire_dtype(trainable, "embedding.0.weight") == pb.BFLOAT16
    assert wire_dtype(trainable, "gate.proxies") == wire_dtype(make_config(), "embedding.0.weight")


def _book(**overrides: object) -> RoundBook:
    cfg = make_config(
        **{  # type: ignore[arg-type]
            "peers": 2,
            "rounds": 3,
            "sync_every": 2,
            "embed_dim": 4,
            "num_experts": 2,
            "top_k": 1,
            "expert_hidden": 3,
            "dataset": "synthetic",
            **overrides,
        }
    )
    return RoundBook(cfg, make_strategy(cfg), lambda r, recs: None)


def test_coordinator_rounds_with_a_frozen_embedding_carry_no_embedding() -> None:
    book = _book(embedding_init="e.pt", freeze_embedding=True)
    a, b = book.join(0, "h0:1"), book.join(1, "h1:1")
    embedding = {
        n: np.zeros(s, np.float32)
        for n, s in model_schema(book.cfg).items()
        if n.startswith("embedding.")
    }
    with pytest.raises(Refused, match="is not uploaded in round 1"):
        book.submit(a, 1, 10, embedding)
    # Round 1 (between syncs): empty uploads close it; nothing comes back but the plan.
    book.submit(a, 1, 10, {})
    book.submit(b, 1, 10, {})
    assert book.closed_round == 1 and book.closed[1].outcome.shared == {}
    # Round 2 (sync): the gates only, and a plan for each peer.
    rng = np.random.default_rng(0)
    for member in (a, b):
        book.submit(member, 2, 10, {"gate.proxies": rng.standard_normal((4, 2)).astype(np.float32)})
    closed = book.closed[2]
    assert closed.outcome.sync and closed.outcome.shared == {}
    assert set(closed.outcome.plans) == {"peer-0", "peer-1"}
    assert book.tensors_received == {"gate"}


def test_fedavg_with_a_frozen_embedding_averages_gate_and_experts() -> None:
    book = _book(algorithm="fedavg", embedding_init="e.pt", freeze_embedding=True)
    a, b = book.join(0, "h0:1"), book.join(1, "h1:1")
    trainable = {
        n: np.full(s, k, np.float32)
        for k, (n, s) in enumerate(model_schema(book.cfg).items())
        if not n.startswith("embedding.")
    }
    book.submit(a, 1, 10, trainable)
    book.submit(b, 1, 30, {n: t + 4 for n, t in trainable.items()})
    shared = book.closed[1].outcome.shared
    assert sorted(shared) == sorted(trainable)
    np.testing.assert_allclose(shared["gate.proxies"], trainable["gate.proxies"] + 3)


# --------------------------------------------------------------------------- frozen training


def test_frozen_embedding_is_not_trained_and_the_rest_is(tmp_path: Path) -> None:
    file = tmp_path / "emb.pt"
    saved = _pretrained(file)
    cfg = make_config(**SMALL, embedding_init=str(file), freeze_embedding=True)
    data = _data()
    trainer = LocalTrainer(build_model(cfg, data), data, cfg, "cpu", 0)
    assert not any(p.requires_grad for p in trainer.model.embedding.parameters())
    gate = trainer.model.gate.proxies.detach().clone()
    trainer.train_round(1)
    for name, tensor in trainer.model.embedding.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert not torch.equal(trainer.model.gate.proxies, gate)


def test_frozen_batchnorm_statistics_stay(tmp_path: Path) -> None:
    """An embedding with BatchNorm (a user's pre-trained CNN): eval mode while training."""
    cfg = make_config(**SMALL, embedding_init="unused", freeze_embedding=True)
    data = _data()
    model = MoEModel(data.train.input_shape, data.train.num_classes, 16, 4, 2, 16)
    model.embedding = nn.Sequential(
        nn.Linear(data.train.input_shape[0], 16), nn.BatchNorm1d(16), nn.ReLU()
    )
    for p in model.embedding.parameters():
        p.requires_grad_(False)
    trainer = LocalTrainer(model, data, cfg, "cpu", 0)
    before = {n: t.clone() for n, t in model.embedding.state_dict().items()}
    trainer.train_round(1)
    for name, tensor in model.embedding.state_dict().items():
        assert torch.equal(tensor, before[name]), name


# --------------------------------------------------------------------------- whole runs

RUN = ["--peers", "2", "--rounds", "2", "--dataset", "synthetic", "--seed", "3"]
RUN += ["--embed-dim", "64", "--expert-hidden", "32", "--experts", "4", "--sync-every", "2"]


def _local_run(out: Path, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "fedmoe.cli", "local", *RUN, *extra, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("embedding")
    file = tmp / "emb.pt"
    saved = _pretrained(file, embed_dim=64, expert_hidden=32)
    init = ("--embedding-init", str(file))
    return {
        "saved": saved,
        "state": tmp / "state",
        "frozen": _local_run(
            tmp / "frozen", *init, "--freeze-embedding", "--state-dir", str(tmp / "state")
        ),
        "float32": _local_run(tmp / "f32", *init),
        "bfloat16": _local_run(tmp / "bf16", *init, "--embedding-wire-dtype", "bfloat16"),
    }


def test_frozen_run_sends_no_embedding_and_keeps_it(runs: dict) -> None:
    frozen, trainable = runs["frozen"], runs["float32"]
    assert frozen["status"] == "completed" and frozen["rounds_completed"] == 2
    assert frozen["coordinator_view"]["tensor_groups_received"] == ["gate"]
    assert trainable["coordinator_view"]["tensor_groups_received"] == ["embedding", "gate"]
    # Gates (64 x 4 floats per peer, once) and plans: a few KB against the embedding's ~100 KB
    # per peer and round each way.
    assert frozen["bytes"]["coordinator"] < 0.05 * trainable["bytes"]["coordinator"]
    assert frozen["bytes"]["coordinator"] < 20_000
    for k in range(2):
        saved = torch.load(runs["state"] / f"peer-{k}.pt", weights_only=True, map_location="cpu")
        assert saved["round"] == 2
        for name, tensor in runs["saved"].items():
            assert torch.equal(saved["model"][f"embedding.{name}"], tensor), name


def test_bfloat16_halves_the_embeddings_coordinator_bytes_and_still_trains(runs: dict) -> None:
    f32, bf16 = runs["float32"], runs["bfloat16"]
    assert bf16["status"] == "completed"
    ratio = bf16["bytes"]["coordinator"] / f32["bytes"]["coordinator"]
    assert 0.45 < ratio < 0.6, ratio  # the embedding halves; gates, plans and reports do not
    assert bf16["bytes"]["p2p"] == f32["bytes"]["p2p"]  # experts travel as before
    # Still learns: well above chance (synthetic: 10 classes) after two rounds.
    assert bf16["final_accuracy_mean"] > 0.3
    assert abs(bf16["final_accuracy_mean"] - f32["final_accuracy_mean"]) < 0.1
