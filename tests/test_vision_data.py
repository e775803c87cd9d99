"""CIFAR-100, Fashion-MNIST and SVHN from --data-dir: small files made here in the exact on-disk
layouts torchvision uses (a few dozen images each), read back, and malformed ones refused."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from fedmoe.common.config import DATASET_NAMES
from fedmoe.common.data import DATASET_SPECS, DATASETS, DataError, load_dataset, load_peer_data

RNG = np.random.default_rng(0)


def test_config_and_data_agree_on_the_builtin_names() -> None:
    assert DATASET_NAMES == DATASETS and set(DATASET_SPECS) == set(DATASETS)


# ---------------------------------------------------------------- CIFAR-100


def _cifar100_part(n: int) -> dict[bytes, object]:
    # As the original files: bytes keys (Python 2 pickles), uint8 rows, fine and coarse labels.
    return {
        b"data": RNG.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"fine_labels": [int(v) for v in RNG.integers(0, 100, size=n)],
        b"coarse_labels": [0] * n,
        b"filenames": [b"x.png"] * n,
        b"batch_label": b"training batch 1 of 1",
    }


def _write_cifar100(root: Path, train: object, test: object, protocol: int = 2) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, part in (("train", train), ("test", test)):
        (folder / name).write_bytes(pickle.dumps(part, protocol=protocol))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"apple"] * 100}))
    return folder


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar100_loads(tmp_path: Path, protocol: int) -> None:
    train_part, test_part = _cifar100_part(40), _cifar100_part(12)
    _write_cifar100(tmp_path, train_part, test_part, protocol)
    train, test = load_dataset("cifar100", str(tmp_path), seed=0)
    assert train.x.shape == (40, 3, 32, 32) and len(test) == 12
    assert train.num_classes == 100 and train.y.tolist() == train_part[b"fine_labels"]
    red = (train_part[b"data"][0, 5] / 255.0 - 0.5071) / 0.2673  # type: ignore[index]
    assert train.x[0, 0, 0, 5] == pytest.approx(red, rel=1e-5)


class _Planted:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo planted",))


def test_cifar_pickles_cannot_run_code(tmp_path: Path) -> None:
    part = _cifar100_part(4)
    part[b"data"] = _Planted()
    _write_cifar100(tmp_path / "c100", part, _cifar100_part(2))
    with pytest.raises(DataError, match="refused global"):
        load_dataset("cifar100", str(tmp_path / "c100"), seed=0)
    # CIFAR-10 goes through the same unpickler.
    batches = tmp_path / "c10" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    (batches / "data_batch_1").write_bytes(pickle.dumps({b"data": _Planted(), b"labels": [0]}))
    with pytest.raises(DataError, match="refused global"):
        load_dataset("cifar10", str(tmp_path / "c10"), seed=0)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({b"fine_labels": [100, 0, 0, 0]}, "0..99"),
        ({b"fine_labels": [0, 0]}, "4 integers"),
        ({b"data": np.zeros((4, 1024), np.uint8)}, "expected \\(n, 3072\\)"),
        ({b"data": np.zeros((4, 3072), np.float32)}, "uint8"),
    ],
)
def test_malformed_cifar100_is_refused(tmp_path: Path, change: dict, match: str) -> None:
    _write_cifar100(tmp_path, {**_cifar100_part(4), **change}, _cifar100_part(2))
    with pytest.raises(DataError, match=match) as info:
        load_dataset("cifar100", str(tmp_path), seed=0)
    assert "cifar-100-python/train" in str(info.value)


# ---------------------------------------------------------------- Fashion-MNIST


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim])
    return header + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()


def _write_fashion(root: Path, n_train: int, n_test: int, gz: bool) -> dict[str, np.ndarray]:
    folder = root / "FashionMNIST" / "raw"
    folder.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": RNG.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": RNG.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        raw = _idx(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_loads(tmp_path: Path, gz: bool) -> None:
    arrays = _write_fashion(tmp_path, 36, 12, gz)
    train, test = load_dataset("fashion-mnist", str(tmp_path), seed=0)
    assert train.x.shape == (36, 1, 28, 28) and test.x.shape == (12, 1, 28, 28)
    assert train.y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    pixel = (arrays["t10k-images-idx3-ubyte"][3, 7, 9] / 255.0 - 0.2860) / 0.3530
    assert test.x[3, 0, 7, 9] == pytest.approx(pixel, rel=1e-5)


def test_fashion_mnist_trains_with_the_builtin_cnn(tmp_path: Path) -> None:
    from fedmoe.common.config import make_config
    from fedmoe.common.model_schema import model_schema
    from fedmoe.peer.trainer import LocalTrainer, build_model

    _write_fashion(tmp_path, 40, 20, gz=False)
    cfg = make_config(dataset="fashion-mnist", data_dir=str(tmp_path), peers=2, embed_dim=16)
    data = load_peer_data("fashion-mnist", str(tmp_path), 2, 0, 5.0, 0)
    trainer = LocalTrainer(build_model(cfg, data), data, cfg, "cpu", 0)
    assert np.isfinite(trainer.train_round(1))
    shapes = {n: tuple(t.shape) for n, t in trainer.tensors(("embedding.", "experts.")).items()}
    assert shapes == {n: s for n, s in model_schema(cfg).items() if not n.startswith("gate.")}


def test_fashion_mnist_bad_files(tmp_path: Path) -> None:
    _write_fashion(tmp_path, 8, 4, gz=False)
    labels = tmp_path / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte"
    labels.write_bytes(_idx(np.zeros(7, np.uint8)))
    with pytest.raises(DataError, match="8 images but 7 labels"):
        load_dataset("fashion-mnist", str(tmp_path), seed=0)
    labels.write_bytes(_idx(np.zeros(8, np.uint8))[:-1])  # truncated
    with pytest.raises(DataError, match="data bytes for shape"):
        load_dataset("fashion-mnist", str(tmp_path), seed=0)
    labels.write_bytes(bytes([0, 0, 0x0D, 1]) + (8).to_bytes(4, "big") + bytes(32))  # floats
    with pytest.raises(DataError, match="expected unsigned bytes"):
        load_dataset("fashion-mnist", str(tmp_path), seed=0)
    labels.unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte\\[.gz\\] is missing"):
        load_dataset("fashion-mnist", str(tmp_path), seed=0)


# ---------------------------------------------------------------- SVHN


def _write_svhn(root: Path, n_train: int, n_test: int) -> dict[str, dict[str, np.ndarray]]:
    from scipy.io import savemat

    parts = {}
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        # As the real files: X is 32 x 32 x 3 x n, y is n x 1 with the digit 0 written as 10.
        part = {
            "X": RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
            "y": RNG.integers(1, 11, (n, 1)).astype(np.uint8),
        }
        savemat(root / name, part)
        parts[name] = part
    return parts


def test_svhn_loads(tmp_path: Path) -> None:
    parts = _write_svhn(tmp_path, 30, 10)
    train, test = load_dataset("svhn", str(tmp_path), seed=0)
    assert train.x.shape == (30, 3, 32, 32) and len(test) == 10
    raw = parts["train_32x32.mat"]
    assert train.y.tolist() == [int(v) % 10 for v in raw["y"][:, 0]]  # 10 -> the digit 0
    assert set(train.y.tolist()) <= set(range(10))
    # Sample 4, channel 2 (blue), row 5, column 6 comes from X[5, 6, 2, 4].
    blue = (raw["X"][5, 6, 2, 4] / 255.0 - 0.4728) / 0.1970
    assert train.x[4, 2, 5, 6] == pytest.approx(blue, rel=1e-5)


def test_svhn_bad_files(tmp_path: Path) -> None:
    from scipy.io import savemat

    with pytest.raises(DataError, match="train_32x32.mat is missing .*nothing is downloaded"):
        load_dataset("svhn", str(tmp_path), seed=0)
    _write_svhn(tmp_path, 4, 2)
    savemat(tmp_path / "train_32x32.mat", {"X": np.zeros((28, 28, 3, 4), np.uint8), "y": [[1]]})
    with pytest.raises(DataError, match="expected uint8 \\(32, 32, 3, n\\)"):
        load_dataset("svhn", str(tmp_path), seed=0)
    savemat(
        tmp_path / "train_32x32.mat",
        {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [3]], np.uint8)},
    )
    with pytest.raises(DataError, match="labels 1..10"):
        load_dataset("svhn", str(tmp_path), seed=0)
    (tmp_path / "train_32x32.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(DataError, match="not a readable MAT file"):
        load_dataset("svhn", str(tmp_path), seed=0)


# ---------------------------------------------------------------- all three


@pytest.mark.parametrize("name", ["cifar100", "fashion-mnist", "svhn"])
def test_missing_files_say_where_to_put_them(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError, match="--data-dir is required"):
        load_dataset(name, None, seed=0)
    with pytest.raises(DataError, match="nothing is downloaded") as info:
        load_dataset(name, str(tmp_path), seed=0)
    where = {"cifar100": "cifar-100-python", "fashion-mnist": "FashionMNIST/raw"}
    assert where.get(name, "train_32x32.mat") in str(info.value)
