"""Plug-ins (issue #14): --model and --dataset as MODULE:FUNCTION, their checks, and whole
`fedmoe local` runs with both, the user's module imported by every process from PYTHONPATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmoe import cli
from fedmoe.common.config import ConfigError, make_config
from fedmoe.common.data import DataError, dataset_spec, load_dataset, load_peer_data
from fedmoe.common.model_plugin import build_plugin_embedding
from fedmoe.common.model_schema import model_schema
from fedmoe.common.plugins import PluginError, import_roots, load_plugin, parse_spec
from fedmoe.peer.trainer import LocalTrainer, build_model

PLUGINS = Path(__file__).resolve().parent / "plugins"
FEDMOE = [sys.executable, "-m", "fedmoe.cli"]


@pytest.fixture
def on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test plug-ins importable in this process (as PYTHONPATH makes them for the runs)."""
    monkeypatch.syspath_prepend(str(PLUGINS))


# ---------------------------------------------------------------- the spec and its import


@pytest.mark.parametrize("spec", ["mod:f", "a.b_c.d:make_2", "_x:_y"])
def test_spec_form_accepted(spec: str) -> None:
    module, function = parse_spec(spec, "--model")
    assert f"{module}:{function}" == spec


@pytest.mark.parametrize(
    "spec", ["mod", "mod:", ":f", "a:b:c", "./my.py:f", "my.py:f ", "a..b:f", "1a:f", "a b:f"]
)
def test_garbage_spec_refused_at_parse_time(spec: str) -> None:
    with pytest.raises(ConfigError, match="--model .*must be MODULE:FUNCTION"):
        make_config(model=spec)
    with pytest.raises(ConfigError, match="--dataset must be one of digits, .*MODULE:FUNCTION"):
        make_config(dataset=spec)


def test_cli_refuses_a_garbage_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["local", "--model", "resnet.py", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "--model must be MODULE:FUNCTION" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything started


def test_model_weights_needs_a_model() -> None:
    with pytest.raises(ConfigError, match="--model-weights needs --model"):
        make_config(model_weights="/w.pt")
    assert make_config(model="m:f", model_weights="/w.pt").model_weights == "/w.pt"


def test_missing_module_names_spec_module_and_path() -> None:
    with pytest.raises(PluginError) as info:
        load_plugin("no_such_plugin_mod.sub:make", "--model")
    message = str(info.value)
    assert "--model no_such_plugin_mod.sub:make" in message
    assert "'no_such_plugin_mod.sub'" in message
    assert "PYTHONPATH" in message and "sys.path" in message


def test_missing_function_and_not_callable(on_path: None) -> None:
    with pytest.raises(PluginError, match="has no attribute 'nothing'"):
        load_plugin("plugin_examples:nothing", "--model")
    with pytest.raises(PluginError, match="'CLASSES' is a int, not callable"):
        load_plugin("plugin_examples:CLASSES", "--model")


def test_import_roots_are_the_folder_of_the_module(on_path: None) -> None:
    load_plugin("plugin_examples:blobs", "--dataset")
    assert import_roots(["", "digits", "plugin_examples:blobs"]) == [str(PLUGINS)]


# ---------------------------------------------------------------- model plug-ins


def test_factory_output_is_checked(on_path: None) -> None:
    module = build_plugin_embedding("plugin_examples:tiny_embedding", (6,), 16, {})
    assert module(torch.zeros(5, 6)).shape == (5, 16)
    with pytest.raises(PluginError, match=r"to \(2, 17\); it must give .*\(2, 16\)"):
        build_plugin_embedding("plugin_examples:wrong_width", (6,), 16, {})
    with pytest.raises(PluginError, match="returned a str, not a torch nn.Module"):
        build_plugin_embedding("plugin_examples:not_a_module", (6,), 16, {})


def test_dummy_batch_moves_no_batchnorm_statistics(on_path: None) -> None:
    module = build_plugin_embedding("plugin_examples:tiny_embedding", (6,), 8, {})
    bn = module[2]
    assert int(bn.num_batches_tracked) == 0 and torch.all(bn.running_mean == 0)
    assert module.training  # left as the factory made it


def _peer(cfg, index: int = 0):  # type: ignore[no-untyped-def]
    return load_peer_data(cfg.dataset, None, cfg.peers, index, cfg.alpha, cfg.seed)


def test_plugin_model_is_shared_and_its_schema_matches(on_path: None) -> None:
    cfg = make_config(
        dataset="plugin_examples:blobs",
        model="plugin_examples:tiny_embedding",
        peers=2,
        embed_dim=8,
        num_experts=3,
        expert_hidden=5,
    )
    a, b = build_model(cfg, _peer(cfg, 0), 0), build_model(cfg, _peer(cfg, 1), 1)
    for name, tensor in a.state_dict().items():
        if name.startswith("embedding."):  # every peer starts from the same embedding
            assert torch.equal(tensor, b.state_dict()[name]), name
    trainer = LocalTrainer(a, _peer(cfg), cfg, "cpu", 0)
    shared = trainer.tensors(("embedding.", "gate.", "experts."))
    # The integer BatchNorm counter stays local; every float tensor is in the schema.
    assert "embedding.2.num_batches_tracked" not in shared
    assert "embedding.2.running_mean" in shared
    assert model_schema(cfg) == {n: tuple(t.shape) for n, t in shared.items()}
    assert model_schema(cfg)["experts.0.fc2.weight"] == (3, 5)  # 3 classes from the loader


def test_peer_that_cannot_import_the_model_fails_clearly() -> None:
    cfg = make_config(model="absent_user_models:resnet", dataset="synthetic", peers=2)
    with pytest.raises(PluginError, match="absent_user_models:resnet.*PYTHONPATH"):
        build_model(cfg, _peer(cfg))


# ---------------------------------------------------------------- data set plug-ins


def test_numpy_and_torch_loaders_give_the_same_data(on_path: None) -> None:
    train, test = load_dataset("plugin_examples:blobs", None, seed=0)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert train.input_shape == (6,) and train.num_classes == 3
    assert (len(train), len(test)) == (240, 60)
    again, _ = load_dataset("plugin_examples:blobs_torch", None, seed=0)
    np.testing.assert_array_equal(again.x, train.x)
    np.testing.assert_array_equal(again.y, train.y)


def test_declared_shapes_spare_the_coordinator_a_load(on_path: None) -> None:
    import plugin_examples  # type: ignore[import-not-found]

    plugin_examples.DECLARED_CALLS.clear()
    assert dataset_spec("plugin_examples:blobs_declared", None, 0) == ((6,), 3)
    assert plugin_examples.DECLARED_CALLS == []
    assert dataset_spec("plugin_examples:blobs", None, 0) == ((6,), 3)  # loaded to learn it


@pytest.mark.parametrize(
    ("loader", "match"),
    [
        ("float_labels", "train: y has dtype float32, expected integer labels"),
        ("with_nan", "train: x holds NaN or infinite values"),
        ("negative_label", r"train: labels must lie in 0..K-1 \(got -1..2\)"),
        ("short_labels", "train: x has 240 rows but y has 239 labels"),
        ("mismatched_shapes", r"train samples have shape \(6,\) but test samples \(5,\)"),
        ("one_part", "must return \\(train, test\\)"),
        ("raises", "raised FileNotFoundError: no such file"),
        ("absent", "has no attribute 'absent'"),
    ],
)
def test_bad_loader_output_is_refused(on_path: None, loader: str, match: str) -> None:
    with pytest.raises(DataError, match=match) as info:
        load_dataset(f"plugin_examples:{loader}", None, seed=0)
    assert f"plugin_examples:{loader}" in str(info.value)


def test_plugin_data_is_split_like_a_builtin(on_path: None) -> None:
    peers = [load_peer_data("plugin_examples:blobs", None, 3, k, 0.5, 4) for k in range(3)]
    assert sum(len(p.train) for p in peers) + sum(len(p.val or []) for p in peers) == 240
    assert all(p.global_test.num_classes == 3 and len(p.local_test) > 0 for p in peers)


# ---------------------------------------------------------------- whole runs


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


TINY = ["--peers", "2", "--rounds", "2", "--embed-dim", "16", "--experts", "4"]
TINY += ["--expert-hidden", "16", "--top-k", "2", "--peer-timeout", "20", "--round-timeout", "120"]


def test_local_run_with_model_and_data_plugins(tmp_path: Path) -> None:
    """The documented way: the plug-ins' folder on PYTHONPATH, seen by every process."""
    out = tmp_path / "run"
    flags = ["--model", "plugin_examples:tiny_embedding", "--dataset", "plugin_examples:blobs"]
    proc = subprocess.run(
        [*FEDMOE, "local", *TINY, *flags, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=500,
        env=_env(PYTHONPATH=str(PLUGINS)),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "plugin_examples:tiny_embedding"
    assert config["dataset"] == "plugin_examples:blobs"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["round"], r["peer"]) for r in records) == [
        (1, "peer-0"), (1, "peer-1"), (2, "peer-0"), (2, "peer-1"),
    ]  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["launcher"]["exited_early"] == []
    # Three well-apart blobs: above chance (1/3) after two short rounds.
    assert summary["final_global_accuracy_mean"] > 0.5
    # Round 2 is a sync round: Eq. 11 fetched experts, gates built on the plug-in embedding.
    assert sum(r["experts_fetched"] for r in records if r["round"] == 2) > 0


def test_local_run_refuses_a_plugin_it_cannot_import(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*FEDMOE, "local", *TINY, "--model", "plugin_examples:tiny_embedding"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        cwd=tmp_path,  # neither the tests' folder nor a module of that name here
    )
    assert proc.returncode == 2
    assert "--model plugin_examples:tiny_embedding: cannot import module" in proc.stderr
    assert "PYTHONPATH" in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started


# ---------------------------------------------------------------- the Python API


def test_api_runs_the_same_path_and_returns_results(
    tmp_path: Path, on_path: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fedmoe.run_local with a dict: a real run (processes, gRPC). The model plug-in is on this
    process's sys.path only, not on PYTHONPATH: the launcher hands its folder to the peers."""
    import fedmoe

    monkeypatch.delenv("PYTHONPATH", raising=False)
    config = {
        "dataset": "digits",
        "model": "plugin_examples:tiny_embedding",
        "peers": 2,
        "rounds": 1,
        "embed_dim": 16,
        "num_experts": 4,
        "expert_hidden": 16,
        "peer_timeout": 20.0,
        "round_timeout": 120.0,
    }
    result = fedmoe.run_local(config, out=tmp_path / "api", quiet=True)
    assert result.run_dir == tmp_path / "api"
    assert sorted(r["peer"] for r in result.records) == ["peer-0", "peer-1"]
    assert result.config["model"] == "plugin_examples:tiny_embedding"
    assert result.config["num_experts"] == 4
    assert 0.0 <= result.summary["final_accuracy_mean"] <= 1.0
    assert result.summary["launcher"]["exited_early"] == []


def test_api_refuses_unknown_keys_before_starting(tmp_path: Path) -> None:
    import fedmoe

    with pytest.raises(ConfigError, match="'experts' \\(did you mean 'num_experts'\\?\\)"):
        fedmoe.run_local({"experts": 4}, out=tmp_path / "run")
    with pytest.raises(ConfigError, match="--top-k must be between 1 and --experts"):
        fedmoe.run_local({"num_experts": 2, "top_k": 3}, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_api_takes_a_run_config(tmp_path: Path) -> None:
    from fedmoe.api import to_config

    cfg = make_config(dataset="synthetic", algorithm="fedavg", data_dir="rel", peers=3)
    again = to_config(cfg)
    assert again.algorithm == cfg.algorithm and again.peers == 3 and again.min_peers == 2
    assert again.data_dir == str(Path("rel").resolve())  # made absolute, as the CLI does


# ---------------------------------------------------------------- the ResNet-18 example


def test_resnet18_example_loads_local_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.models import resnet18

    monkeypatch.syspath_prepend(str(PLUGINS.parents[1] / "examples"))
    spec = "resnet18_embedding:make_embedding"
    torch.manual_seed(3)
    saved = resnet18(weights=None).state_dict()  # a stand-in for the ImageNet file, fc and all
    torch.save(saved, tmp_path / "resnet18.pth")
    net = build_plugin_embedding(
        spec, (3, 32, 32), 24, {"model_weights": str(tmp_path / "resnet18.pth")}
    )
    assert torch.equal(net.state_dict()["conv1.weight"], saved["conv1.weight"])
    assert net(torch.zeros(3, 3, 32, 32)).shape == (3, 24)
    monkeypatch.setenv("FEDMOE_RESNET18_WEIGHTS", str(tmp_path / "resnet18.pth"))
    by_env = build_plugin_embedding(spec, (3, 32, 32), 24, {})
    assert torch.equal(by_env.state_dict()["layer4.1.bn2.weight"], saved["layer4.1.bn2.weight"])
    torch.save({"conv1.weight": saved["conv1.weight"]}, tmp_path / "partial.pth")
    with pytest.raises(PluginError, match="not a ResNet-18 state dict"):
        build_plugin_embedding(
            spec, (3, 32, 32), 24, {"model_weights": str(tmp_path / "partial.pth")}
        )
    monkeypatch.delenv("FEDMOE_RESNET18_WEIGHTS")
    gray = build_plugin_embedding(spec, (1, 28, 28), 8, {})  # Fashion-MNIST's one channel
    assert gray(torch.zeros(2, 1, 28, 28)).shape == (2, 8)


def test_coordinator_schema_needs_no_weights_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator builds the network only for its shapes: without the peers' file. The
    launcher of `fedmoe local`, whose peers run here, loads it and refuses a missing one."""
    monkeypatch.syspath_prepend(str(PLUGINS.parents[1] / "examples"))
    monkeypatch.delenv("FEDMOE_RESNET18_WEIGHTS", raising=False)
    cfg = make_config(
        dataset="cifar10",
        model="resnet18_embedding:make_embedding",
        model_weights="/nonexistent/resnet18.pth",
        embed_dim=32,
    )
    assert model_schema(cfg)["embedding.fc.weight"] == (32, 512)
    assert "embedding.bn1.num_batches_tracked" not in model_schema(cfg)
    cli.check_plugins(cfg)  # as `fedmoe coordinator` does
    with pytest.raises(ConfigError, match="resnet18_embedding:make_embedding raised .*nonexistent"):
        cli.check_plugins(cfg, with_weights=True)


def test_peer_that_cannot_import_the_model_exits_with_the_reason(tmp_path: Path) -> None:
    """A coordinator that has the plug-in, a peer (on another machine, say) that has not: the
    peer stops right after joining, naming the spec, the module and PYTHONPATH."""
    from tests.cluster import free_port

    address = f"127.0.0.1:{free_port()}"
    token = tmp_path / "token"
    token.write_text("t" * 32 + "\n")
    token.chmod(0o600)
    coordinator = subprocess.Popen(
        [*FEDMOE, "coordinator", "--listen", address, "--token-file", str(token)]
        + ["--out", str(tmp_path / "run"), "--peers", "1", "--dataset", "synthetic"]
        + ["--model", "plugin_examples:tiny_embedding", "--embed-dim", "8"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(PYTHONPATH=str(PLUGINS)),
    )
    try:
        peer = subprocess.run(
            [*FEDMOE, "peer", "--coordinator", address, "--index", "0"]
            + ["--token-file", str(token), "--timeout", "60"],
            capture_output=True,
            text=True,
            timeout=200,
            env=_env(),
            cwd=tmp_path,
        )
    finally:
        coordinator.terminate()
        coordinator.wait(timeout=30)
    assert peer.returncode != 0
    assert "peer 0: --model plugin_examples:tiny_embedding: cannot import module" in peer.stderr
    assert "PYTHONPATH" in peer.stderr
