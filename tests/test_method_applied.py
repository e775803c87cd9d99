"""The method's results reach the model: a real run's checkpoints (taken after the merge phase)
show the averaged embedding and the Eq. 11 experts loaded into every peer's model.

Settings that make the expected state exact: every round syncs (I = 1), every expert of every
peer is kept (P = 100 > N*M) and tau is so large that Eq. 10 gives equal weights, so after a sync
round every expert slot of every peer holds the same mean of all N*M trained experts, every peer
holds the same averaged embedding, and the gates (never shared in FedMoE-DA) stay personal. A
peer that skipped loading either would keep its own trained weights, which differ."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

FEDMOE = [sys.executable, "-m", "fedmoe.cli"]
PEERS = 3


# On a machine with a GPU the same run goes through the GPU path too (`--gpus 0`: the peers'
# models on cuda:0, fetched experts decoded on the CPU); CI has none and runs the CPU path.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def models(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, torch.Tensor]]:
    tmp = tmp_path_factory.mktemp(f"method-{request.param}")
    args = ["local", "--peers", str(PEERS), "--rounds", "2", "--dataset", "synthetic"]
    args += ["--gpus", "0"] if request.param == "cuda" else []
    args += ["--sync-every", "1", "--neighbors", "100", "--temperature", "1e6", "--seed", "3"]
    args += ["--state-dir", str(tmp / "state"), "--out", str(tmp / "run")]
    proc = subprocess.run([*FEDMOE, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = []
    for k in range(PEERS):
        saved = torch.load(tmp / "state" / f"peer-{k}.pt", weights_only=True, map_location="cpu")
        assert saved["round"] == 2
        out.append(saved["model"])
    return out


def _group(model: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {n: t for n, t in model.items() if n.startswith(prefix)}


def test_every_peer_loaded_the_averaged_embedding(models) -> None:
    first = _group(models[0], "embedding.")
    assert first
    for other in models[1:]:
        for name, tensor in first.items():
            assert torch.equal(other[name], tensor), name  # the one aggregate, bit for bit


def test_every_peer_loaded_the_merged_experts(models) -> None:
    # Expert parameters by suffix ("fc1.weight"), over every slot of every peer.
    by_suffix: dict[str, list[torch.Tensor]] = {}
    for model in models:
        for name, tensor in _group(model, "experts.").items():
            by_suffix.setdefault(name.split(".", 2)[2], []).append(tensor)
    assert by_suffix
    for suffix, tensors in by_suffix.items():
        assert len(tensors) >= PEERS * 2, suffix
        for t in tensors[1:]:  # the same uniform mean everywhere (summation order aside)
            assert torch.allclose(t, tensors[0], atol=1e-6, rtol=1e-5), suffix
        assert tensors[0].abs().max() > 0  # not a zeroed expert


def test_gates_stay_personal(models) -> None:
    gates = [_group(m, "gate.") for m in models]
    assert gates[0]
    assert any(not torch.equal(gates[0][n], gates[1][n]) for n in gates[0])
